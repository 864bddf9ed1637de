"""``compare --methods lora,...,merged --merge-with RUN[,RUN...]``: the comparison's own LoRA task merged with
other tasks of the same base (:mod:`multitune.compose.merge`, ``--merge-method``, default ties) and judged in
the same table: its test metric with its interval, what it stores, its latency, and in the record the
retention of every constituent (the user's task and each one it was merged with, on its kept test split).

The row is what a user deciding to serve one merged body instead of several adapters needs to see beside
the methods; it trains nothing (its training time is the LoRA row's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from multitune.compare.settings import CompareConfig

MERGED = "merged"


def merged_problems(config: CompareConfig) -> list[str]:
    """What is wrong with a ``merged`` entry of ``--methods`` (nothing when there is none)."""
    from multitune.compose.merge import MERGE_METHODS

    problems = []
    if MERGED in config.methods:
        methods = list(config.methods)
        if "lora" not in methods or methods.index("lora") > methods.index(MERGED):
            problems.append("--methods merged merges the comparison's LoRA task: list lora before it")
        if not config.merge_with:
            problems.append(
                "--methods merged needs --merge-with RUN[,RUN...]: the tasks to merge the LoRA task with"
            )
    elif config.merge_with:
        problems.append("--merge-with is read by --methods ...,merged; add merged to --methods or drop it")
    if config.merge_method not in MERGE_METHODS:
        problems.append(
            f"--merge-method must be one of {', '.join(MERGE_METHODS)} (got '{config.merge_method}')"
        )
    return problems


def merged_result(
    config: CompareConfig, lora: dict[str, Any], splits: Any, log: Callable[[str], None]
) -> dict[str, Any]:
    """The ``merged`` row: built from the LoRA row's saved task, scored as the other rows are."""
    from multitune.bank import MultiTaskModel
    from multitune.compare.measure import PeakMemory, latency_ms, score_test
    from multitune.compose.merge import MergeSettings, merge_bodies, read_constituents, tensor_bytes
    from multitune.compose.run import kept_rows, primary_metric
    from multitune.methods.lora import LoRAConfig
    from multitune.models import load_base
    from multitune.storage import load_adapter, save_adapter
    from multitune.training.evaluate import evaluate

    own = config.out / str(lora["adapter"])
    tasks = read_constituents([own, *config.merge_with])
    settings = MergeSettings(config.merge_method)
    body, merged_config, record = merge_bodies(tasks, settings)
    with PeakMemory() as memory:
        bank = MultiTaskModel(load_base(config.model, quantize=config.train.quantize))
        for i, c in enumerate(tasks):
            load_adapter(bank, c.folder, f"alone{i}")
            spec = bank.tasks[f"alone{i}"]
            name = MERGED if i == 0 else f"merged{i}"
            bank.add_task(name, spec.kind, "lora", LoRAConfig(**merged_config), spec.labels, spec.pooling)
            bank.load_task_state_dict(name, {**body, **c.head})
    metrics, intervals, throughput = score_test(bank, MERGED, splits.test, config)
    retention = []
    for i, c in enumerate(tasks):
        rows = splits.test if i == 0 else kept_rows(c, "test.jsonl")
        if not rows:
            retention.append({"task": c.name, "rows": 0, "retention": None})
            continue
        key = primary_metric(str(c.meta["task"]["kind"]))
        scored = [
            float(evaluate(bank, t, rows, config.train.max_length, config.train.eval_batch_size)[key])
            for t in (f"alone{i}", MERGED if i == 0 else f"merged{i}")
        ]
        retention.append({
            "task": c.name, "metric": key, "rows": len(rows), "alone": scored[0], "merged": scored[1],
            "retention": scored[1] / scored[0] if scored[0] > 0 else None,
        })  # fmt: skip
        log(f"merged: {c.name} {key} alone {scored[0]:.4f}, merged {scored[1]:.4f}")
    folder = config.out / "bank" / MERGED
    save_adapter(bank, MERGED, folder, extra={"metrics": {"test": metrics}, "merged": record})
    stored = tensor_bytes({**body, **tasks[0].head})
    keep = {
        k: v for k, v in lora.items() if k not in ("seeds", "trials", "rescue", "audit", "search_seconds")
    }
    return {
        **keep,
        "method": MERGED,
        "task": MERGED,
        "best_params": {"merge": settings.method, "with": ",".join(c.name for c in tasks[1:])},
        "stored_bytes": stored,
        "storage_100_tasks_bytes": lora["base_bytes"] + 100 * stored,
        "peak_memory_bytes": max(memory.peak, int(lora.get("peak_memory_bytes") or 0)),
        "latency_ms": latency_ms(bank, MERGED, splits.test, config),
        "throughput_per_s": round(throughput, 2),
        "test": metrics,
        "test_ci": intervals,
        "test_examples": len(splits.test),
        "adapter": f"bank/{MERGED}",
        "merged": {**record, "retention": retention},
    }
