"""``multitune compose``: a new task from a few labelled examples as a weighted combination of existing LoRA
tasks (LoraHub, Huang et al. 2023, "LoraHub: Efficient Cross-Task Generalization via Dynamic LoRA
Composition", section 3).

The composed update of a layer is ``sum_i w_i dW_i`` (:func:`multitune.compose.merge.merge_lora`'s ``cat``:
exact, rank = the sum of the ranks). The weights are found without gradients, as LoraHub does, by Optuna's
TPE over ``w_i`` in [-1.5, 1.5] (LoraHub's range; it uses CMA-ES through nevergrad, Optuna's CMA-ES needs the
``cmaes`` package, which we do not add for this), minimising

    loss(w) + alpha * sum_i |w_i|          (LoraHub's L1 term, alpha = --l1, default 0.05)

where the loss is, for a generation task, the mean token NLL of the examples' responses (LoraHub's choice);
for a classification task, whose label set the constituents' heads do not share, the cross-validated
cross-entropy of a logistic-regression head fitted on the composed body's pooled features (``--folds``
folds; the head of every candidate is fitted on its own features, so a candidate is judged by how well its
features separate the new labels, not by a head trained for another body). The final head is fitted on all
the examples. The trial with every weight 0 (the bare base: a linear probe) is enqueued first, so the search
never returns worse, on the examples, than the base alone.

The result is an ordinary LoRA run folder (``OUT/adapter``, ``OUT/result.json``) that every command loads.
``--test-data`` scores it, and the bare-base probe beside it, on held-out rows.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F

from multitune.compose.merge import Constituent, MergeSettings, check_mergeable, merge_lora, read_constituents
from multitune.data import Columns, Example, load_examples, task_kind
from multitune.errors import ConfigError, DataError

TASK = "composed"
RANGE = 1.5  # LoraHub's bound on each weight


def fit_head(
    features: torch.Tensor, labels: torch.Tensor, classes: int, l2: float = 1e-3, steps: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression (W (C, d), b (C,)) on ``features`` (n, d) by L-BFGS, L2 ``l2``."""
    w = torch.zeros(classes, features.shape[1], requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    optimiser = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(features @ w.T + b, labels) + l2 * w.square().sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    return w.detach(), b.detach()


def cv_loss(features: torch.Tensor, labels: torch.Tensor, classes: int, folds: int, seed: int) -> float:
    """Mean held-out cross-entropy of :func:`fit_head` over ``folds`` folds (features standardised on each
    fold's training rows)."""
    n = features.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    total = 0.0
    for k in range(folds):
        held = order[k::folds]
        keep = torch.ones(n, dtype=torch.bool)
        keep[held] = False
        mean, std = features[keep].mean(0), features[keep].std(0).clamp(min=1e-6)
        w, b = fit_head((features[keep] - mean) / std, labels[keep], classes)
        logits = ((features[held] - mean) / std) @ w.T + b
        total += float(F.cross_entropy(logits, labels[held], reduction="sum"))
    return total / n


class Composer:
    """A bank with the composed task (a cat-LoRA of the constituents, rank = sum) whose weights are set per trial."""

    def __init__(
        self, tasks: Sequence[Constituent], kind: str, labels: list[str], device: str | None, max_length: int
    ) -> None:
        from multitune.bank import MultiTaskModel
        from multitune.methods.lora import LoRAConfig
        from multitune.models import load_base

        meta = tasks[0].meta
        base = load_base(str(meta["base_model"]), device=device, quantize=meta.get("base_quantize"))
        self.bank, self.tasks, self.kind, self.labels = MultiTaskModel(base), list(tasks), kind, labels
        self.max_length = max_length
        _, config, _ = merge_lora(tasks, MergeSettings("cat"))
        config["dropout"] = 0.0
        self.config = config
        self.bank.add_task(TASK, task_kind(kind), "lora", LoRAConfig(**config), labels)
        self.bank.eval()

    def set_weights(self, weights: Sequence[float]) -> None:
        body, _, _ = merge_lora(self.tasks, MergeSettings("cat", weights=tuple(weights)))
        own = self.bank.task_parameters(TASK)
        with torch.no_grad():
            for key, value in body.items():
                own[key].copy_(value)

    @torch.no_grad()
    def features(self, examples: Sequence[Example]) -> torch.Tensor:
        from multitune.encode import collate, encode_task, to_device

        pad = self.bank.base.tokenizer.pad_token_id
        slot = self.bank.slots.index(TASK)
        out = []
        for start in range(0, len(examples), 32):
            chunk = encode_task(self.bank, TASK, examples[start : start + 32], self.max_length)
            batch = to_device(collate(chunk, pad, slot), self.bank.base.device)
            pooled: list[torch.Tensor | None] = []
            self.bank.classify(batch["input_ids"], batch["attention_mask"], batch["task_ids"], pooled)
            assert pooled[0] is not None  # a classification task with a head: its pooled vectors
            out.append(pooled[0].cpu())
        return torch.cat(out)

    def label_ids(self, examples: Sequence[Example]) -> torch.Tensor:
        return torch.tensor([self.labels.index(str(e.label)) for e in examples])

    def loss(self, examples: Sequence[Example], folds: int, seed: int) -> float:
        if self.kind == "classification":
            return cv_loss(self.features(examples), self.label_ids(examples), len(self.labels), folds, seed)
        from multitune.training.evaluate import lm_nll

        total, count = lm_nll(self.bank, TASK, examples, self.max_length)
        return total / max(count, 1)

    def fit_final_head(self, examples: Sequence[Example]) -> None:
        """The head on every example, the standardisation folded into it: ``W' = W / std``, ``b' = b - W' mean``."""
        if self.kind != "classification":
            return
        features = self.features(examples)
        mean, std = features.mean(0), features.std(0).clamp(min=1e-6)
        w, b = fit_head((features - mean) / std, self.label_ids(examples), len(self.labels))
        head = cast(torch.nn.Linear, self.bank.heads[TASK])
        with torch.no_grad():
            head.weight.copy_(w / std)
            head.bias.copy_(b - (w / std) @ mean)

    def score(self, examples: Sequence[Example]) -> dict[str, float]:
        from multitune.training.evaluate import evaluate

        return evaluate(self.bank, TASK, examples, self.max_length)


def compose(
    sources: Sequence[str | Path],
    data: str | Path,
    output: str | Path,
    test_data: str | Path | None = None,
    columns: Columns | None = None,
    trials: int = 40,
    l1: float = 0.05,
    folds: int = 4,
    seed: int = 0,
    device: str | None = None,
    max_length: int = 128,
    progress: bool = True,
) -> dict[str, Any]:
    """Find the weights, write ``output`` (a LoRA run folder) and return its record (``result.json``)."""
    import optuna

    from multitune.storage import describe_folder, output_lock, save_adapter, write_json_atomic

    if trials < 1 or folds < 2 or not l1 >= 0:
        raise ConfigError("--trials must be at least 1, --folds at least 2 and --l1 0 or more")
    tasks = read_constituents(sources)
    check_mergeable(tasks, "cat")
    if tasks[0].method != "lora":
        raise ConfigError("compose weighs LoRA tasks (LoraHub); these are (IA)^3 tasks: use multitune merge")
    kinds = {str(c.meta["task"]["kind"]) for c in tasks}
    kind = "classification" if "classification" in kinds else "generation"
    columns = columns or Columns()
    few = load_examples(data, task_kind(kind), columns)
    test = load_examples(test_data, task_kind(kind), columns) if test_data else []
    labels = sorted({str(e.label) for e in few}) if kind == "classification" else []
    if kind == "classification":
        counts = {label: sum(str(e.label) == label for e in few) for label in labels}
        if len(labels) < 2 or min(counts.values()) < 2 or len(few) < folds:
            raise DataError(
                f"{data} has {len(few)} rows over labels {counts}; composing a classifier needs two or more "
                f"labels with at least 2 rows each and at least --folds ({folds}) rows"
            )
        unknown = sorted({str(e.label) for e in test} - set(labels))
        if unknown:
            raise DataError(f"--test-data has labels the examples lack: {', '.join(unknown[:5])}")
    out = Path(output)
    with output_lock(out, "multitune compose"):
        if out.exists() and any(out.iterdir()):
            raise ConfigError(
                f"output folder {out} already exists and is {describe_folder(out)}; choose another --output"
            )
        started = time.perf_counter()
        composer = Composer(tasks, kind, labels, device, max_length)
        optuna.logging.set_verbosity(optuna.logging.WARNING)

        def objective(trial: optuna.Trial) -> float:
            weights = [trial.suggest_float(f"w_{c.name}", -RANGE, RANGE) for c in tasks]
            composer.set_weights(weights)
            loss = composer.loss(few, folds, seed)
            value = loss + l1 * sum(abs(w) for w in weights)
            trial.set_user_attr("loss", loss)
            if progress:
                shown = ", ".join(f"{w:+.2f}" for w in weights)
                print(
                    f"  trial {trial.number}: weights {shown} -> loss {loss:.4f}, objective {value:.4f}",
                    flush=True,
                )
            return value

        study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed))
        study.enqueue_trial({f"w_{c.name}": 0.0 for c in tasks})  # the bare base: the probe baseline
        study.optimize(objective, n_trials=trials)
        zero_loss = float(study.trials[0].user_attrs["loss"])
        best = [study.best_params[f"w_{c.name}"] for c in tasks]
        record: dict[str, Any] = {
            "kind": kind,
            "constituents": [{"name": c.name, "folder": str(c.folder)} for c in tasks],
            "weights": dict(zip((c.name for c in tasks), best, strict=True)),
            "examples": len(few),
            "trials": trials,
            "l1": l1,
            "objective": "cross-validated cross-entropy of a fitted head"
            if kind == "classification"
            else "token NLL",
            "loss": float(study.best_trial.user_attrs["loss"]),
            "base_loss": zero_loss,
        }
        if test:  # the bare base (every weight 0) with its own head: what composition must beat
            composer.set_weights([0.0] * len(tasks))
            composer.fit_final_head(few)
            record["test_base"] = composer.score(test)
        composer.set_weights(best)
        composer.fit_final_head(few)
        if test:
            record["test"] = composer.score(test)
        record["seconds"] = time.perf_counter() - started
        save_adapter(composer.bank, TASK, out / "adapter", extra={"composed": record})
        (out / "config.yaml").write_text(f"train:\n  max_length: {max_length}\n")
        write_json_atomic(out / "result.json", record)
    return record


def compose_lines(record: dict[str, Any]) -> list[str]:
    shown = ", ".join(f"{name} {w:+.3f}" for name, w in record["weights"].items())
    lines = [
        f"composed from {len(record['weights'])} LoRA tasks on {record['examples']} examples ({record['trials']} "
        f"trials): weights {shown}",
        f"  loss on the examples ({record['objective']}): {record['loss']:.4f} (bare base {record['base_loss']:.4f})",
    ]
    metric = "accuracy" if record["kind"] == "classification" else "rouge_l"
    if "test" in record:
        lines.append(
            f"  test {metric}: composed {record['test'][metric]:.4f}, bare base with the same head fit "
            f"{record['test_base'][metric]:.4f}"
        )
    return lines
