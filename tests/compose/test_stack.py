"""Stacked tasks (train --stack-on): a task whose rows run on top of a frozen component task.

A stacked task is one task to the bank: in a batch with any other tasks each of its rows equals the row run
alone (fp32, atol 1e-5) for every pair of stackable methods; a fresh one starts exactly at its component
(for the methods whose fresh task is the identity); LoRA on LoRA is the hand-computed sum of both deltas;
training moves only its own tensors; saving keeps only them plus a reference that loading follows.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import perturb, tiny_base

from multitune.bank import MultiTaskModel
from multitune.compose.stack import stackable
from multitune.errors import ConfigError
from multitune.methods import METHODS as REGISTRY
from multitune.methods.adapter import AdapterConfig
from multitune.methods.ia3 import IA3Config
from multitune.methods.lora import LoRAConfig
from multitune.methods.prefix import PrefixConfig
from multitune.methods.prompt import PromptConfig
from multitune.storage import load_adapter, save_adapter

TEXTS = ["good movie", "the film was very bad and not nice", "what", "so happy and great", "it is", "not bad"]
STACKABLE = sorted(n for n in REGISTRY if stackable(n))
CONFIGS: dict[str, list[Any]] = {
    "lora": [LoRAConfig(rank=2), LoRAConfig(rank=4, target_modules=["all-linear"])],
    "ia3": [IA3Config(), IA3Config(target_modules=["all-linear"], feedforward_modules=[])],
    "adapter": [
        AdapterConfig(reduction_factor=8, train_layer_norms=True),
        AdapterConfig(placement="pfeiffer"),
    ],
    "prompt": [
        PromptConfig(num_virtual_tokens=2, init="random"),
        PromptConfig(num_virtual_tokens=3, init="random"),
    ],
    "prefix": [PrefixConfig(num_virtual_tokens=3), PrefixConfig(num_virtual_tokens=2, projection=False)],
}
IDENTITY_AT_START = {"lora", "ia3", "adapter"}  # a fresh task of these adds exactly nothing


def config(method: str, i: int) -> Any:
    return CONFIGS.get(method, [None, None])[i]


def logits(bank: MultiTaskModel, texts: list[str], tasks: list[str]) -> torch.Tensor:
    enc = bank.base.tokenizer(texts, padding=True, return_tensors="pt")
    rows = torch.tensor([bank.slots.index(t) for t in tasks])
    with torch.no_grad():
        return bank.classify(enc.input_ids, enc.attention_mask, rows)


def check_rows_alone(bank: MultiTaskModel, texts: list[str], tasks: list[str]) -> None:
    mixed = logits(bank, texts, tasks)
    for i, task in enumerate(tasks):
        alone = logits(bank, [texts[i]], [task])
        torch.testing.assert_close(mixed[i : i + 1, : alone.shape[1]], alone, atol=1e-5, rtol=0, msg=task)


def stacked_bank(family: str, under: str, over: str) -> MultiTaskModel:
    """A bank with a component d, t stacked on it, a plain task p of t's method, and a second stacked task."""
    bank = MultiTaskModel(tiny_base(family))
    bank.add_task("d", "classification", under, config(under, 0), ["neg", "pos"])
    perturb(bank, "d", 1, scale=0.15)
    bank.add_task("t", "classification", over, config(over, 1), ["neg", "pos", "x"], stack_on="d")
    perturb(bank, "t", 2, scale=0.15)
    bank.add_task("p", "classification", over, config(over, 0), ["a", "b"])
    perturb(bank, "p", 3, scale=0.15)
    bank.add_task("t2", "classification", over, config(over, 0), ["a", "b"], stack_on="d")
    perturb(bank, "t2", 4, scale=0.15)
    return bank


@pytest.mark.parametrize("family", ["llama", "bert", "t5"])
@pytest.mark.parametrize(("under", "over"), list(itertools.product(STACKABLE, STACKABLE)))
def test_a_stacked_task_mixed_with_others_equals_each_row_alone(family: str, under: str, over: str) -> None:
    bank = stacked_bank(family, under, over)
    check_rows_alone(bank, TEXTS, ["t", "d", "p", "t2", "t", "p"])
    if under == "base":  # no parameters: nothing acts under the stacked task
        return
    # the component really acts under the stacked task: without it the stacked rows differ
    with_d = logits(bank, TEXTS[:2], ["t", "t"])
    components = bank.routing.components.pop("t")
    bank.routing.version += 1
    try:
        assert not torch.allclose(logits(bank, TEXTS[:2], ["t", "t"]), with_d, atol=1e-4)
    finally:
        bank.routing.components["t"] = components
        bank.routing.version += 1


@pytest.mark.parametrize("family", ["llama", "gpt2", "t5"])
@pytest.mark.parametrize(
    ("under", "over"),
    [("lora", "lora"), ("prompt", "prefix"), ("prefix", "prefix"), ("adapter", "prompt"), ("ia3", "ia3")],
)
def test_stacked_tasks_generate_in_a_mixed_batch_as_alone(family: str, under: str, over: str) -> None:
    bank = MultiTaskModel(tiny_base(family))
    bank.add_task("d", "generation", under, config(under, 0), None)
    perturb(bank, "d", 1, scale=0.3)
    bank.add_task("t", "generation", over, config(over, 1), None, stack_on="d")
    perturb(bank, "t", 2, scale=0.3)
    bank.add_task("p", "generation", over, config(over, 0), None)
    perturb(bank, "p", 3, scale=0.3)
    tasks = ["t", "d", "p", "t"]
    tokenizer = bank.base.tokenizer
    side = "left" if family != "t5" else "right"
    enc = tokenizer(TEXTS[:4], padding=True, return_tensors="pt", padding_side=side)
    rows = torch.tensor([bank.slots.index(t) for t in tasks])
    kwargs = {"max_new_tokens": 5, "do_sample": False, "eos_token_id": None}
    mixed = bank.generate(enc.input_ids, enc.attention_mask, rows, **kwargs)
    for i, task in enumerate(tasks):
        one = tokenizer([TEXTS[i]], return_tensors="pt")
        alone = bank.generate(one.input_ids, one.attention_mask, bank.task_ids(task, 1), **kwargs)
        assert mixed[i].tolist() == alone[0].tolist(), task
    own = {"prompt": 3, "prefix": 2}.get(over, 0)  # config(over, 1)'s length
    assert bank.virtual_positions("t") == bank.virtual_positions("d") + own


@pytest.mark.parametrize("family", ["llama", "bert"])
@pytest.mark.parametrize("method", sorted(IDENTITY_AT_START))
def test_a_fresh_stacked_task_starts_exactly_at_its_component(family: str, method: str) -> None:
    bank = MultiTaskModel(tiny_base(family))
    bank.add_task("d", "classification", method, config(method, 0), ["neg", "pos"])
    perturb(bank, "d", 1, scale=0.15)
    bank.add_task("t", "classification", method, config(method, 1), ["neg", "pos"], stack_on="d")
    with torch.no_grad():  # the same head, so that the logits compare the bodies
        for key in ("weight", "bias"):
            getattr(bank.heads["t"], key).copy_(getattr(bank.heads["d"], key))
    for tasks in (["t"] * 3, ["t", "d", "t"]):
        torch.testing.assert_close(
            logits(bank, TEXTS[:3], tasks), logits(bank, TEXTS[:3], ["d"] * 3), atol=1e-5, rtol=0
        )


def test_lora_on_lora_adds_both_deltas_as_a_hand_computation() -> None:
    bank = MultiTaskModel(tiny_base("llama"))
    bank.add_task("d", "generation", "lora", LoRAConfig(rank=2, alpha=4), None)
    perturb(bank, "d", 1, scale=0.2)
    bank.add_task("t", "generation", "lora", LoRAConfig(rank=3, alpha=3), None, stack_on="d")
    perturb(bank, "t", 2, scale=0.2)
    layer = next(m for m in bank.model.modules() if type(m).__name__ == "LoRALinear")
    x = torch.randn(2, 5, layer.in_features)
    inner = layer.base_layer
    expected = inner(x)
    for task, scale in (("d", 4 / 2), ("t", 3 / 3)):
        expected = expected + scale * x @ layer.lora_A[task].T @ layer.lora_B[task].T
    for rows in ([1, 1], [1, 0]):  # t alone (the fast path) and t beside d (the batched path)
        with bank.routed(torch.tensor(rows)), torch.no_grad():
            got = layer(x)
        torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("over", ["lora", "adapter", "prompt"])
def test_training_a_stacked_task_moves_only_its_own_tensors(over: str) -> None:
    bank = MultiTaskModel(tiny_base("bert"))
    bank.add_task("d", "classification", "lora", LoRAConfig(rank=2), ["neg", "pos"])
    perturb(bank, "d", 1, scale=0.15)
    bank.add_task("t", "classification", over, config(over, 0), ["neg", "pos"], stack_on="d")
    before_d = {k: v.clone() for k, v in bank.task_state_dict("d").items()}
    before_t = {k: v.clone() for k, v in bank.task_state_dict("t").items()}
    assert not any(p.requires_grad for p in bank.task_parameters("d").values())
    bank.train()
    enc = bank.base.tokenizer(TEXTS, padding=True, return_tensors="pt")
    batch = {
        "input_ids": enc.input_ids,
        "attention_mask": enc.attention_mask,
        "task_ids": bank.task_ids("t", len(TEXTS)),
        "class_labels": torch.tensor([1, 0, 0, 1, 0, 1]),
    }
    optimizer = torch.optim.AdamW(bank.task_parameters("t").values(), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        bank(batch).backward()
        optimizer.step()
    assert all(p.grad is None for p in bank.task_parameters("d").values())
    assert all(torch.equal(before_d[k], v) for k, v in bank.task_state_dict("d").items())
    assert any(not torch.equal(before_t[k], v) for k, v in bank.task_state_dict("t").items())


def test_the_component_cannot_be_removed_while_a_task_stands_on_it() -> None:
    bank = stacked_bank("llama", "lora", "adapter")
    with pytest.raises(
        ConfigError, match=r"'d' is the base component of stacked task\(s\) t, t2; remove them"
    ):
        bank.remove_task("d")
    assert "d" in bank.tasks
    bank.remove_task("t")
    bank.remove_task("t2")
    bank.remove_task("d")
    bank.remove_task("p")
    assert not bank.tasks and not bank.routing.components


@pytest.mark.parametrize(
    ("under", "over", "config_over", "message"),
    [
        ("lora", "full", None, "full, which cannot be part of a stack"),
        ("full", "lora", None, "full, which cannot be part of a stack"),
        ("lora", "prompting", None, "prompting, which cannot be part of a stack"),
        ("lora", "lora", LoRAConfig(use_dora=True), "DoRA"),
    ],
)
def test_stacks_that_cannot_run_are_refused(under: str, over: str, config_over: Any, message: str) -> None:
    bank = MultiTaskModel(tiny_base("llama"))
    bank.add_task("d", "classification", under, None, ["neg", "pos"])
    with pytest.raises(ConfigError, match=message):
        bank.add_task("t", "classification", over, config_over, ["neg", "pos"], stack_on="d")
    assert list(bank.tasks) == ["d"] and not bank.routing.components
    with pytest.raises(ConfigError, match="'nowhere', which is not in the bank"):
        bank.add_task("u", "classification", "lora", None, ["neg", "pos"], stack_on="nowhere")


def saved_stack(tmp_path: Path) -> tuple[MultiTaskModel, Path, Path]:
    bank = MultiTaskModel(tiny_base("llama"))
    bank.add_task("d", "classification", "lora", LoRAConfig(rank=2), ["neg", "pos"])
    perturb(bank, "d", 1, scale=0.15)
    d_folder = save_adapter(bank, "d", tmp_path / "runs" / "dom" / "adapter")
    loaded = MultiTaskModel(tiny_base("llama"))  # as train --stack-on: the component comes from its folder
    load_adapter(loaded, d_folder)
    loaded.add_task("t", "classification", "adapter", AdapterConfig(), ["a", "b", "c"], stack_on="d")
    perturb(loaded, "t", 2, scale=0.15)
    t_folder = save_adapter(loaded, "t", tmp_path / "runs" / "task" / "adapter")
    return loaded, d_folder, t_folder


def test_a_saved_stacked_task_keeps_only_its_tensors_and_loads_its_component(tmp_path: Path) -> None:
    trained, d_folder, t_folder = saved_stack(tmp_path)
    meta = json.loads((t_folder / "adapter.json").read_text())
    assert meta["stack_on"]["task"] == "d" and meta["stack_on"]["relative"] == "../../dom/adapter"
    assert meta["task"]["stack_on"] == "d"
    from safetensors.torch import load_file

    assert set(load_file(str(t_folder / "adapter.safetensors"))) == set(trained.task_parameters("t"))
    expected = logits(trained, TEXTS, ["t"] * len(TEXTS))
    fresh = MultiTaskModel(tiny_base("llama"))
    spec = load_adapter(fresh, t_folder, "served")
    assert spec.stack_on == "d" and fresh.slots == ["d", "served"]
    torch.testing.assert_close(logits(fresh, TEXTS, ["served"] * len(TEXTS)), expected, atol=1e-6, rtol=0)
    # a second task on the same component reuses it
    load_adapter(fresh, t_folder, "again")
    assert fresh.slots == ["d", "served", "again"]
    # both runs moved together: found by the relative path
    shutil.move(str(tmp_path / "runs"), str(tmp_path / "moved"))
    moved = MultiTaskModel(tiny_base("llama"))
    load_adapter(moved, tmp_path / "moved" / "task" / "adapter")
    torch.testing.assert_close(logits(moved, TEXTS, ["t"] * len(TEXTS)), expected, atol=1e-6, rtol=0)


def test_a_stacked_task_whose_component_is_missing_or_changed_is_refused(tmp_path: Path) -> None:
    trained, d_folder, t_folder = saved_stack(tmp_path)
    perturb(trained, "d", 9, scale=0.1)  # another version of the component, saved over it
    save_adapter(trained, "d", d_folder)
    bank = MultiTaskModel(tiny_base("llama"))
    with pytest.raises(ConfigError, match="has other weights now .*train 't' again with --stack-on"):
        load_adapter(bank, t_folder)
    assert not bank.tasks  # nothing half-loaded
    shutil.rmtree(d_folder)
    with pytest.raises(ConfigError, match=r"stacked on 'd', whose adapter .* is missing; restore"):
        load_adapter(bank, t_folder)
    assert not bank.tasks
    meta = json.loads((t_folder / "adapter.json").read_text())
    del meta["stack_on"]  # a damaged document: it names a component but not where it is
    (t_folder / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="'task.stack_on' names a component but 'stack_on' is missing"):
        load_adapter(bank, t_folder)
    other = MultiTaskModel(tiny_base("llama"))
    other.add_task("d", "classification", "ia3", None, ["x", "y"])
    meta["stack_on"] = {"task": "d", "folder": "/x", "relative": "x", "sha256": "0" * 64}
    (t_folder / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="already holds another task of that name"):
        load_adapter(other, t_folder)
    assert list(other.tasks) == ["d"]


def _documents(path: Path) -> Path:
    from helpers import toy_sentiment

    path.write_text("\n".join(ex.text for ex in toy_sentiment(48, seed=5)) + "\n")
    return path


def _labelled(path: Path) -> Path:
    from helpers import toy_sentiment

    rows = toy_sentiment(48, seed=1)
    path.write_text("text,label\n" + "".join(f"{ex.text},{ex.label}\n" for ex in rows))
    return path


FLAGS = ["--epochs", "2", "--batch-size", "8", "--learning-rate", "1e-2", "--device", "cpu", "--quiet"]


def test_train_stack_on_a_domain_run_then_predict_and_serve_it(tmp_path: Path, one_thread: None) -> None:
    from helpers import save_tiny

    import multitune
    from multitune.cli import main
    from multitune.serve.engine import Engine

    model = str(save_tiny("llama", tmp_path / "tiny"))
    domain_run, task_run = tmp_path / "dom", tmp_path / "spam"
    docs = _documents(tmp_path / "docs.txt")
    assert (
        main(
            [
                "train",
                "--kind",
                "domain",
                "--data",
                str(docs),
                "--model",
                model,
                "--output",
                str(domain_run),
                *FLAGS,
            ]
        )
        == 0
    )
    data = _labelled(tmp_path / "labelled.csv")
    args = ["train", "--data", str(data), "--model", model, "--method", "adapter", "--output", str(task_run)]
    assert main([*args, "--stack-on", str(domain_run), *FLAGS]) == 0
    meta = json.loads((task_run / "adapter" / "adapter.json").read_text())
    assert meta["stack_on"]["task"] == "dom" and meta["task"]["stack_on"] == "dom"
    assert "stack-on" in (task_run / "config.yaml").read_text().replace("_", "-")
    summary = json.loads((task_run / "result.json").read_text())
    trained = multitune.load(task_run)
    labels = trained.predict(["good movie", "bad film"])
    assert all(label in ("pos", "neg") for label in labels)
    engine = Engine.from_folder(task_run, device="cpu")
    assert list(engine.tasks) == ["spam"]  # its component is loaded, not served
    served = engine.classify([("spam", "good movie"), ("spam", "bad film")])
    assert [max(p, key=p.get) for p in served] == labels
    engine.load(domain_run, "dom")  # served itself too: the same weights, so the same task
    assert sorted(engine.tasks) == ["dom", "spam"] and engine.shared.slots == ["dom", "spam"]
    engine.remove("dom")  # no longer served, still under spam
    assert list(engine.tasks) == ["spam"] and "dom" in engine.shared.tasks
    engine.remove("spam")
    assert not engine.shared.tasks  # the component went with the last task on it
    assert summary["test"]


def test_stack_on_bad_inputs_say_what_to_do(tmp_path: Path, one_thread: None, capsys: Any) -> None:
    from helpers import save_tiny

    from multitune.cli import main

    model = str(save_tiny("llama", tmp_path / "tiny"))
    data = _labelled(tmp_path / "labelled.csv")
    out = tmp_path / "out"
    args = ["train", "--data", str(data), "--model", model, "--output", str(out), *FLAGS]
    assert main([*args, "--stack-on", str(tmp_path / "nothing")]) != 0
    assert "--stack-on" in capsys.readouterr().err and not (out / "adapter").exists()
    assert (
        main(["train", "--data", str(data), "--model", model, "--output", str(tmp_path / "lp"), *FLAGS]) == 0
    )
    assert main([*args, "--stack-on", str(tmp_path / "lp"), "--task", "lp"]) != 0
    assert "both called 'lp'; pass --task with another name" in capsys.readouterr().err
    assert main([*args, "--stack-on", str(tmp_path / "lp"), "--method", "full"]) != 0
    assert "cannot be part of a stack" in capsys.readouterr().err


def test_lora_on_lora_exports_as_the_one_peft_lora_it_equals_and_other_stacks_are_refused(
    tmp_path: Path,
) -> None:
    peft = pytest.importorskip("peft")
    from helpers import tiny_model

    from multitune.interop.peft import export_peft

    bank = MultiTaskModel(tiny_base("llama"))
    bank.add_task("d", "generation", "lora", LoRAConfig(rank=2, alpha=4), None)
    perturb(bank, "d", 1, scale=0.2)
    bank.add_task(
        "t",
        "generation",
        "lora",
        LoRAConfig(rank=3, alpha=6, target_modules=["all-linear"]),
        None,
        stack_on="d",
    )
    perturb(bank, "t", 2, scale=0.2)
    export_peft(bank, "t", tmp_path / "peft")
    assert bank.slots == ["d", "t"]  # the flattened copy is gone again
    exported = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "peft").eval()
    enc = bank.base.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        want = bank.run(enc.input_ids, enc.attention_mask, bank.task_ids("t", len(TEXTS))).out.logits
        got = exported(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
    mask = enc.attention_mask.bool()
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=0)
    bank.add_task("a", "generation", "adapter", None, None, stack_on="d")
    with pytest.raises(ConfigError, match="a stack of adapter on lora; a PEFT adapter holds one method"):
        export_peft(bank, "a", tmp_path / "no")
    assert not (tmp_path / "no").exists()


def test_a_stacked_task_mixes_with_prompting_rows() -> None:
    from helpers import toy_sentiment

    from multitune.methods import get_method

    bank = stacked_bank("llama", "lora", "prompt")
    bank.add_task("ask", "classification", "prompting", None, ["neg", "pos"])
    fit = get_method("prompting").fit
    assert fit is not None
    fit(bank, "ask", toy_sentiment(8))
    check_rows_alone(bank, TEXTS, ["t", "ask", "d", "t2", "ask", "t"])
