"""Domain adaptation on SMS Spam: the raw messages, and a linear probe of what each domain adapter gives.

    python benchmarks/domain_sms.py split OUT            # OUT/domain.txt, OUT/labelled.jsonl, OUT/test.jsonl
    multitune train --kind domain --data OUT/domain.txt --model minilm --output OUT/mlm ...   # (docs/composition.md)
    python benchmarks/domain_sms.py probe OUT RUN [RUN ...] [--shots 32,128] [--seeds 5]

``split``: the messages of the shared SMSSpamCollection.tsv, shuffled with seed 0; 20% are the held-out test
messages (with their labels, for the probe only), the other 80% are the labelled pool and, labels dropped,
the domain text (one message per line, without the pool's copies of test messages: SMS Spam repeats some),
so the domain adapters never see a test message.

``probe``: one bank on the base of the runs, every run's domain task loaded into it (they share the frozen
base), and the bare base (``bank.disabled()``). For each, the mean-pooled last hidden state of every message
(what an encoder classifier of this package reads, bank.default_pooling) and, for each number of shots K and
seed, an L2-regularised logistic regression fitted on K labelled pool messages (class-balanced, as far as
the pool's 13% spam allows: K/2 of each) and scored on the test messages: accuracy and macro-F1, mean and
sample standard deviation over the seeds. This measures the representation a domain adapter leaves for a
downstream task without training one on top (benchmarks/stack_sms.py trains one, --stack-on). Writes
OUT/probe.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SMS = (
    Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "sms_spam" / "SMSSpamCollection.tsv"
)


def split(out: Path) -> None:
    from multitune.data import Columns, load_examples

    examples = load_examples(SMS, "classification", Columns(text="SMS", label="Label"))
    random.Random(0).shuffle(examples)
    n_test = len(examples) // 5
    test, pool = examples[:n_test], examples[n_test:]
    out.mkdir(parents=True, exist_ok=True)
    held_out = {ex.text for ex in test}  # SMS Spam repeats messages: a test message's twin is no domain text
    domain = [" ".join(ex.text.split()) for ex in pool if ex.text not in held_out]
    (out / "domain.txt").write_text("".join(text + "\n" for text in domain))
    for name, rows in (("labelled", pool), ("test", test)):
        (out / f"{name}.jsonl").write_text(
            "".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in rows)
        )
    print(f"{len(domain)} domain messages, {len(pool)} labelled pool, {n_test} test messages in {out}")


@torch.no_grad()
def features(bank, task: str | None, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    from multitune.bank import pool
    from multitune.encode import collate

    tokenizer = bank.base.tokenizer
    slot = bank.slots.index(task) if task is not None else 0
    out = []
    for start in range(0, len(texts), batch_size):
        ids = [
            tokenizer(t, truncation=True, max_length=128).input_ids for t in texts[start : start + batch_size]
        ]
        batch = collate([{"input_ids": i} for i in ids], tokenizer.pad_token_id, slot)
        if task is None:
            with bank.disabled():
                hidden = bank.hidden_states(batch["input_ids"], batch["attention_mask"], batch["task_ids"])
        else:
            hidden = bank.hidden_states(batch["input_ids"], batch["attention_mask"], batch["task_ids"])
        out.append(pool(hidden, batch["attention_mask"], "mean", bank.base.arch).float())
    return torch.cat(out)


def logistic(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-2) -> tuple[torch.Tensor, torch.Tensor]:
    """Standardised features, weights by L-BFGS on the mean cross-entropy + l2 |w|^2 (binary: one logit)."""
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y.float()) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (w.detach() / std), (b.detach() - (w.detach() / std) @ mean)


def scores(pred: torch.Tensor, gold: torch.Tensor) -> dict[str, float]:
    f1 = []
    for c in (0, 1):
        tp = int(((pred == c) & (gold == c)).sum())
        fp, fn = int(((pred == c) & (gold != c)).sum()), int(((pred != c) & (gold == c)).sum())
        f1.append(2 * tp / max(2 * tp + fp + fn, 1))
    return {"accuracy": float((pred == gold).float().mean()), "macro_f1": sum(f1) / 2}


def probe(out: Path, runs: list[str], shots: list[int], seeds: int) -> None:
    from multitune.bank import MultiTaskModel
    from multitune.models import load_base
    from multitune.storage import load_adapter, read_adapter_config

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    read = [json.loads(line) for line in (out / "labelled.jsonl").read_text().splitlines()]
    test = [json.loads(line) for line in (out / "test.jsonl").read_text().splitlines()]
    model = read_adapter_config(Path(runs[0]) / "adapter")["base_model"]
    bank = MultiTaskModel(load_base(model, device="cpu"))
    tasks: dict[str, str | None] = {"bare base": None}
    for folder in runs:
        spec = load_adapter(bank, Path(folder) / "adapter", name=Path(folder).name)
        tasks[f"{spec.name} ({spec.objective})"] = spec.name
    pool_y = torch.tensor([r["label"] == "spam" for r in read], dtype=torch.long)
    test_y = torch.tensor([r["label"] == "spam" for r in test], dtype=torch.long)
    spam, ham = pool_y.nonzero().flatten().tolist(), (pool_y == 0).nonzero().flatten().tolist()
    result: dict[str, dict[str, dict[str, float]]] = {}
    for label, task in tasks.items():
        x_pool, x_test = (
            features(bank, task, [r["text"] for r in read]),
            features(bank, task, [r["text"] for r in test]),
        )
        result[label] = {}
        for k in shots:
            runs_ = []
            for seed in range(seeds):
                rng = random.Random(seed)
                chosen = rng.sample(spam, k // 2) + rng.sample(ham, k - k // 2)
                w, b = logistic(x_pool[chosen], pool_y[chosen])
                runs_.append(scores((x_test @ w + b > 0).long(), test_y))
            result[label][str(k)] = {
                f"{m}_{s}": f(v[m] for v in runs_)
                for m in ("accuracy", "macro_f1")
                for s, f in (("mean", statistics.mean), ("std", statistics.stdev))
            }
            print(label, k, result[label][str(k)], flush=True)
    (out / "probe.json").write_text(json.dumps(result, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["split", "probe"])
    parser.add_argument("out", type=Path)
    parser.add_argument("runs", nargs="*")
    parser.add_argument("--shots", default="16,64,256")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    if args.what == "split":
        split(args.out)
    else:
        probe(args.out, args.runs, [int(k) for k in args.shots.split(",")], args.seeds)


if __name__ == "__main__":
    main()
