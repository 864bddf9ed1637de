"""What ``multitune compare`` measures of a trained task: peak memory, latency, the test split's scores with
bootstrap intervals, bytes on disk."""

from __future__ import annotations

import os
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

from multitune.compare.settings import CompareConfig


class PeakMemory:
    """Peak resident memory while in the block (sampled every 10 ms), or the CUDA allocator's peak."""

    def __init__(self) -> None:
        self.cuda = torch.cuda.is_available()
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        elif os.path.exists("/proc/self/statm"):
            self.peak = self._rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.peak = torch.cuda.max_memory_allocated()
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())
        else:  # no /proc: the process's lifetime peak (kB on Linux, bytes on macOS)
            scale = 1 if sys.platform == "darwin" else 1024
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def latency_ms(bank: Any, task: str, examples: list[Any], config: CompareConfig) -> float | None:
    """Median milliseconds to answer one example alone (batch 1)."""
    from multitune.training.evaluate import generate_texts, predict_proba

    sample = examples[: config.latency_examples if config.kind == "classification" else 8]
    if not sample:
        return None
    times = []
    for ex in sample:
        start = time.perf_counter()
        if config.kind == "classification":
            predict_proba(bank, task, [ex], config.train.max_length, 1)
        else:
            generate_texts(bank, task, [ex], config.train.max_length, config.train.max_new_tokens, 1)
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 3)


def score_test(
    bank: Any, task: str, examples: list[Any], config: CompareConfig
) -> tuple[dict[str, float], dict[str, list[float]], float]:
    """(test metrics, bootstrap 95% intervals, examples per second batched)."""
    import numpy as np

    from multitune.metrics import (
        bootstrap_interval,
        generation_metrics,
        rouge_l_sentence,
    )
    from multitune.training.evaluate import generate_texts, lm_nll, predict_proba, scores_of_probabilities

    spec = bank.tasks[task]
    t = config.train
    start = time.perf_counter()
    if config.kind == "classification":
        probs = predict_proba(bank, task, examples, t.max_length, t.eval_batch_size)
        seconds = time.perf_counter() - start
        metrics, predictions = scores_of_probabilities(probs, examples, spec.labels)
        references = [ex.label or "" for ex in examples]
        correct = [float(p == r) for p, r in zip(predictions, references, strict=True)]
        intervals = {"accuracy": list(bootstrap_interval(correct, config.bootstrap, seed=config.seed))}
        if config.metric() == "macro_f1":
            from multitune.metrics import macro_f1

            rng = np.random.default_rng(config.seed)
            n = len(examples)
            draws = [
                macro_f1([predictions[i] for i in idx], [references[i] for i in idx], spec.labels)
                for idx in rng.integers(0, n, size=(config.bootstrap, n))
            ]
            intervals["macro_f1"] = [float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))]
    else:
        texts = generate_texts(
            bank, task, examples, t.max_length, t.max_new_tokens, max(1, t.eval_batch_size // 4)
        )
        seconds = time.perf_counter() - start
        references = [ex.response or "" for ex in examples]
        metrics = generation_metrics(texts, references)
        total, count = lm_nll(bank, task, examples, t.max_length, max(1, t.eval_batch_size // 4))
        metrics["loss"] = total / max(count, 1)
        per_example = [rouge_l_sentence(p, r) for p, r in zip(texts, references, strict=True)]
        intervals = {"rouge_l": list(bootstrap_interval(per_example, config.bootstrap, seed=config.seed))}
    return metrics, intervals, len(examples) / max(seconds, 1e-9)
