"""Merging task adapters (issue 19): cat is exact, linear/cat/svd are PEFT's, TIES and DARE are their papers'
(hand computations and peft.utils.merge_utils), the merged bank loads, serves and keeps each task's head, and
every bad input is one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "health"))
from helpers import save_tiny  # noqa: E402
from test_update import train_run, write_rows  # noqa: E402

from multitune.cli import main  # noqa: E402
from multitune.compose.merge import (  # noqa: E402
    Constituent,
    MergeSettings,
    drop,
    merge_bodies,
    merge_vectors,
    trim,
)
from multitune.errors import ConfigError  # noqa: E402


def lora_task(
    name: str, rank: int, seed: int, layers=("l0", "l1"), alpha: float = 16.0, **config
) -> Constituent:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for layer in layers:
        state[f"{layer}.lora_A.weight"] = torch.randn(rank, 6, generator=g)
        state[f"{layer}.lora_B.weight"] = torch.randn(5, rank, generator=g)
    state["head.weight"] = torch.randn(2, 5, generator=g)
    meta = {
        "base": {"fingerprint": "same"},
        "task": {"name": name, "kind": "classification", "method": "lora",
                 "config": {"rank": rank, "alpha": alpha, "dropout": 0.0, **config}},
    }  # fmt: skip
    return Constituent(name, Path(name), meta, state)


def delta(c: Constituent, layer: str) -> torch.Tensor:
    a, b = c.state[f"{layer}.lora_A.weight"], c.state[f"{layer}.lora_B.weight"]
    return c.scaling() * b @ a


def merged_delta(body: dict, config: dict, layer: str) -> torch.Tensor:
    assert config["alpha"] == config["rank"] and not config["rslora"]  # scale 1
    return body[f"{layer}.lora_B.weight"] @ body[f"{layer}.lora_A.weight"]


def test_cat_is_exact_for_any_ranks_weights_and_missing_layers() -> None:
    a = lora_task("a", 2, 0)
    b = lora_task("b", 3, 1, layers=("l0",), rslora=True)
    body, config, record = merge_bodies([a, b], MergeSettings("cat", weights=(0.7, -1.3)))
    assert config["rank"] == 5 and record["rank"] == 5
    expected = 0.7 * delta(a, "l0") - 1.3 * delta(b, "l0")
    assert torch.allclose(merged_delta(body, config, "l0"), expected, atol=1e-5)
    assert torch.allclose(merged_delta(body, config, "l1"), 0.7 * delta(a, "l1"), atol=1e-5)  # b has no l1
    assert body["l1.lora_A.weight"].shape == (5, 6)  # padded to the one rank a task has everywhere


def test_svd_keeps_the_top_of_the_sum_and_reports_the_energy() -> None:
    a, b = lora_task("a", 2, 0), lora_task("b", 2, 1)
    body, config, record = merge_bodies([a, b], MergeSettings("svd", rank=4))
    assert torch.allclose(merged_delta(body, config, "l0"), delta(a, "l0") + delta(b, "l0"), atol=1e-4)
    assert record["energy_kept"]["min"] == pytest.approx(1.0, abs=1e-6)  # rank 4 holds the sum of two rank 2
    body, config, record = merge_bodies([a, b], MergeSettings("svd"))  # default: the largest rank, 2
    s = torch.linalg.svdvals(delta(a, "l0") + delta(b, "l0"))
    error = torch.linalg.matrix_norm(merged_delta(body, config, "l0") - delta(a, "l0") - delta(b, "l0"))
    assert float(error) == pytest.approx(float(s[2:].square().sum().sqrt()), rel=1e-4)  # Eckart-Young
    assert record["energy_kept"]["min"] < 1.0


def test_ties_is_trim_elect_by_mass_and_disjoint_mean_by_hand() -> None:
    v1, v2 = torch.tensor([3.0, -1.0, 0.5, -2.0]), torch.tensor([-1.0, -2.0, 1.0, 4.0])
    assert torch.equal(trim(v1, 0.5), torch.tensor([3.0, 0.0, 0.0, -2.0]))
    got = merge_vectors([v1, v2], [1.0, 1.0], "ties", 0.5, torch.Generator())
    # trimmed: [3, 0, 0, -2] and [0, -2, 0, 4]; signs of the sum [3, -2, 0, 2]: + - + +; agreeing means:
    assert torch.equal(got, torch.tensor([3.0, -2.0, 0.0, 4.0]))
    from peft.utils.merge_utils import ties

    x, y = torch.randn(7, 9), torch.randn(7, 9)
    ours = merge_vectors([x, y], [0.6, 1.2], "ties", 0.3, torch.Generator())
    assert torch.allclose(ours, ties([x, y], torch.tensor([0.6, 1.2]), 0.3), atol=1e-6)


def test_dare_drops_with_the_seeded_generator_and_rescales() -> None:
    v1, v2 = torch.randn(4, 5), torch.randn(4, 5)
    got = merge_vectors([v1, v2], [1.0, 0.5], "dare_linear", 0.25, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    m1, m2 = torch.rand(4, 5, generator=g) < 0.25, torch.rand(4, 5, generator=g) < 0.25
    assert torch.allclose(got, v1 * m1 / 0.25 + 0.5 * v2 * m2 / 0.25, atol=1e-6)
    big = torch.ones(200_000)
    assert float(drop(big, 0.3, torch.Generator().manual_seed(0)).mean()) == pytest.approx(1.0, abs=0.02)
    ties_of_dare = merge_vectors([v1, v2], [1.0, 1.0], "dare_ties", 0.5, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    d1, d2 = drop(v1, 0.5, g), drop(v2, 0.5, g)
    sign = torch.where(d1 + d2 >= 0, 1.0, -1.0)  # elected on the unweighted vectors
    a1, a2 = d1.sign() == sign, d2.sign() == sign
    expected = (d1 * a1 + d2 * a2) / (a1.float() + a2.float()).clamp(min=1)
    assert torch.allclose(ties_of_dare, expected, atol=1e-6)


@pytest.mark.parametrize("method", ["cat", "linear", "svd"])
def test_cat_linear_and_svd_are_peft_add_weighted_adapter(method, tmp_path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    model = AutoModel.from_pretrained(save_tiny("bert", tmp_path / "bert"))
    targets = ["query", "value"]
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets), adapter_name="one")
    peft.add_adapter("two", LoraConfig(r=4, lora_alpha=16, target_modules=targets))
    torch.manual_seed(0)
    tasks = []
    for name in ("one", "two"):
        state = {}
        for path, module in peft.base_model.model.named_modules():
            if hasattr(module, "lora_A") and name in module.lora_A:
                torch.nn.init.normal_(module.lora_B[name].weight)
                state[f"{path}.lora_A.weight"] = module.lora_A[name].weight.detach().clone()
                state[f"{path}.lora_B.weight"] = module.lora_B[name].weight.detach().clone()
        alpha = 8.0 if name == "one" else 16.0
        meta = {"base": 1, "task": {"name": name, "kind": "generation", "method": "lora",
                                    "config": {"rank": 4, "alpha": alpha}}}  # fmt: skip
        tasks.append(Constituent(name, Path(name), meta, state))
    peft.add_weighted_adapter(["one", "two"], [0.8, 0.5], "m", combination_type=method)
    body, config, _ = merge_bodies(tasks, MergeSettings(method, weights=(0.8, 0.5)))
    compared = 0
    for path, module in peft.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "m" in module.lora_A:
            theirs = module.get_delta_weight("m")
            assert torch.allclose(merged_delta(body, config, path), theirs, atol=1e-5), path
            compared += 1
    assert compared == 4  # query and value of two layers


def test_bad_groups_name_the_tasks_and_the_fix() -> None:
    a, b = lora_task("a", 2, 0), lora_task("b", 4, 1)
    with pytest.raises(ConfigError, match="use --method cat .* or --method svd"):
        merge_bodies([a, b], MergeSettings("linear"))
    other = lora_task("c", 2, 2)
    other.meta["base"] = {"fingerprint": "another"}
    with pytest.raises(ConfigError, match="different base models"):
        merge_bodies([a, other], MergeSettings("cat"))
    ia3 = Constituent("d", Path("d"), {"base": a.meta["base"], "task": {"method": "ia3", "config": {}}}, {})
    with pytest.raises(ConfigError, match=r"different methods \(a \(lora\), d \(ia3\)\)"):
        merge_bodies([a, ia3], MergeSettings("ties"))
    prefix = Constituent(
        "p", Path("p"), {"base": a.meta["base"], "task": {"method": "prefix", "config": {}}}, {}
    )
    with pytest.raises(ConfigError, match="p \\(prefix\\) cannot merge"):
        merge_bodies([a, prefix], MergeSettings("ties"))
    for density in (0.0, 1.5, -0.1):
        with pytest.raises(ConfigError, match=r"--density must be in \(0, 1\]"):
            merge_bodies([a, b], MergeSettings("ties", density=density))
    with pytest.raises(ConfigError, match="--weights has 3 values for 2 tasks"):
        merge_bodies([a, b], MergeSettings("cat", weights=(1, 1, 1)))
    dora = lora_task("e", 2, 3, use_dora=True)
    with pytest.raises(ConfigError, match="e use DoRA"):
        merge_bodies([a, dora], MergeSettings("cat"))
    stacked = lora_task("s", 2, 4)
    stacked.meta["stack_on"] = {"task": "dom"}
    with pytest.raises(ConfigError, match=r"s \(on dom\) run on top of another task \(--stack-on\)"):
        merge_bodies([a, stacked], MergeSettings("cat"))


def test_ia3_vectors_merge_as_task_vectors_and_refuse_cat() -> None:
    meta = {"base": 1, "task": {"method": "ia3", "config": {}}}
    x = Constituent(
        "x", Path("x"), meta, {"l.ia3_l": torch.tensor([1.5, 1.0, 0.5]), "head.weight": torch.ones(2, 3)}
    )
    y = Constituent(
        "y", Path("y"), meta, {"l.ia3_l": torch.tensor([1.2, 0.8, 1.0]), "head.weight": torch.zeros(2, 3)}
    )
    body, _, _ = merge_bodies([x, y], MergeSettings("linear"))
    assert torch.allclose(
        body["l.ia3_l"], torch.tensor([1.7, 0.8, 0.5])
    )  # 1 + (0.5 + 0.2, 0 - 0.2, -0.5 + 0)
    with pytest.raises(ConfigError, match="\\(IA\\)\\^3 vectors merge with linear, ties"):
        merge_bodies([x, y], MergeSettings("cat"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[str, Path, Path]:
    root = tmp_path_factory.mktemp("merge")
    model = str(save_tiny("bert", root / "bert"))
    learn = ("--epochs", "4", "--learning-rate", "0.01")
    a = train_run(model, root / "sent", write_rows(root / "a.csv", 80, 0), extra=learn)
    b = train_run(
        model, root / "topic", write_rows(root / "b.csv", 90, 1, labels=("pos", "neg", "neu")), extra=learn
    )
    return model, a, b


def test_merge_writes_a_bank_whose_tasks_keep_their_heads_and_prints_retention(
    runs, tmp_path, capsys
) -> None:
    from multitune.api import load
    from multitune.serve.engine import Engine

    _, a, b = runs
    out = tmp_path / "bank"
    assert main(["merge", str(a), str(b), "--method", "ties", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "merged 2 tasks with ties (weights sent 1, topic 1, density 0.5)" in printed
    assert "retention" in printed and "storage: 2 task bodies" in printed
    record = json.loads((out / "merge.json").read_text())
    rows = {r["task"]: r for r in record["retention"]}
    assert (
        set(rows) == {"sent", "topic"} and rows["sent"]["rows"] == 8 and rows["topic"]["metric"] == "accuracy"
    )
    assert rows["sent"]["retention"] == pytest.approx(rows["sent"]["merged"] / rows["sent"]["alone"])
    low, high = rows["topic"]["change_ci_points"]  # a paired bootstrap of merged - alone per row
    assert low <= rows["topic"]["change_points"] <= high
    assert rows["topic"]["change_points"] == pytest.approx(
        100 * (rows["topic"]["merged"] - rows["topic"]["alone"])
    )
    merged_topic = load(out / "topic")
    assert merged_topic.labels == load(b).labels  # its own head and labels over the merged body
    assert main(["eval", str(out / "sent")]) == 0  # the kept test split travelled with it
    engine = Engine.from_folder(out)
    assert set(engine.tasks) == {"sent", "topic"}


def test_cat_with_a_zero_weight_reproduces_the_task_exactly(runs, tmp_path, capsys) -> None:
    from multitune.api import load

    _, a, b = runs
    out = tmp_path / "exact"
    assert main(["merge", str(a), str(b), "--method", "cat", "--weights", "1,0", "--output", str(out)]) == 0
    record = json.loads((out / "merge.json").read_text())
    assert record["retention"][0]["retention"] == pytest.approx(1.0)
    texts = ["good great fine", "bad awful sad"]
    assert torch.allclose(load(out / "sent").predict_proba(texts), load(a).predict_proba(texts), atol=1e-5)


def test_search_chooses_on_the_validation_split_and_bad_cli_inputs_are_one_line(
    runs, tmp_path, capsys
) -> None:
    _, a, b = runs
    out = tmp_path / "searched"
    assert (
        main(["merge", str(a), str(b), "--method", "dare_ties", "--search", "3", "--output", str(out)]) == 0
    )
    record = json.loads((out / "merge.json").read_text())
    assert record["search"]["trials"] == 3 and len(record["weights"]) == 2
    assert (a / "data" / "validation.jsonl").is_file()
    capsys.readouterr()
    for argv, words in [
        (["merge", str(a), "--output", str(tmp_path / "one")], "two or more tasks"),
        (
            ["merge", str(a), str(b), "--density", "0", "--output", str(tmp_path / "d")],
            "--density must be in",
        ),
        (["merge", str(a), str(b), "--output", str(out)], "already exists"),
        (["merge", str(a), str(a), "--output", str(tmp_path / "same")], "--names a,b"),
        (
            ["merge", str(a), str(b), "--weights", "1,x", "--output", str(tmp_path / "w")],
            "comma-separated numbers",
        ),
        (
            ["merge", str(a), str(b), "--test", "nope=f.csv", "--output", str(tmp_path / "t")],
            "not a task being merged",
        ),
        (["merge", str(a), str(tmp_path / "missing"), "--output", str(tmp_path / "m")], "does not exist"),
    ]:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], (argv, err)
    assert not (tmp_path / "d").exists() and not (tmp_path / "one").exists()  # nothing written on refusal
