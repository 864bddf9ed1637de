"""Decode-sized mixed batches take the concatenated factors of the batch's tasks (methods/stack.concatenated):
the same rows as the per-row factors, chosen only where they pay."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from multitune.methods import stack as stack_module
from multitune.methods.adapter import AdapterLinear
from multitune.methods.lora import LoRALinear
from multitune.routing import Routing


def _lora(ranks: list[int], dora: set[int] = frozenset()) -> tuple[LoRALinear, Routing]:
    torch.manual_seed(0)
    routing = Routing()
    layer = LoRALinear(nn.Linear(24, 40), routing)
    routing.slots = [f"t{i}" for i in range(len(ranks))] + ["plain"]
    for i, rank in enumerate(ranks):
        layer.add_task(f"t{i}", rank, 2.0 / rank, 0.0, dora=i in dora)
        with torch.no_grad():
            nn.init.normal_(layer.lora_B[f"t{i}"])
    return layer.eval(), routing


def _adapter(tasks: int) -> tuple[AdapterLinear, Routing]:
    torch.manual_seed(0)
    routing = Routing()
    layer = AdapterLinear(nn.Linear(24, 40), routing)
    routing.slots = [f"t{i}" for i in range(tasks)] + ["plain"]
    for i in range(tasks):
        for param in layer.add_task(f"t{i}", 4, "relu").values():
            with torch.no_grad():
                param.normal_()
    return layer.eval(), routing


def _rows(routing: Routing) -> torch.Tensor:
    slots = len(routing.slots)
    return torch.tensor([(3 * i) % slots for i in range(11)])  # every task, the plain slot too, out of order


def _run(layer: nn.Module, routing: Routing, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    routing.set_rows(rows.clone())
    try:
        with torch.no_grad():
            return layer(x)
    finally:
        routing.clear()


def _prepared(layer: nn.Module, routing: Routing, rows: torch.Tensor) -> stack_module.Rows:
    """What the layer's stack gathered for ``rows`` at a decode step (one level: no stacked task)."""
    routing.set_rows(rows)
    try:
        with torch.no_grad():
            (found,) = layer.stacked.levels(len(rows), torch.float32)
    finally:
        routing.clear()
    assert found is not None
    return found


def _alone(layer: nn.Module, routing: Routing, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([_run(layer, routing, rows[i : i + 1], x[i : i + 1]) for i in range(len(rows))])


@pytest.mark.parametrize("make", [lambda: _lora([2, 8, 4]), lambda: _adapter(3)], ids=["lora", "adapter"])
def test_a_decode_step_takes_the_concatenated_factors_and_equals_each_row_alone(make) -> None:
    layer, routing = make()
    rows = _rows(routing)
    x = torch.randn(len(rows), 1, 24)
    mixed = _run(layer, routing, rows, x)
    found = _prepared(layer, routing, rows)
    assert isinstance(found.prepared(), stack_module.Dense)
    torch.testing.assert_close(mixed, _alone(layer, routing, rows, x), atol=1e-5, rtol=0)
    plain = rows == len(routing.slots) - 1
    # a row without a task gets exactly the base layer's output on the same batch (its mask adds exact zeros;
    # the base's GEMM on fewer rows may round differently in the last bit, so the batch is the same)
    with torch.no_grad():
        base = layer.base_layer(x)
    torch.testing.assert_close(mixed[plain], base[plain], atol=0, rtol=0)


def test_the_concatenation_leaves_the_padding_of_smaller_ranks_out() -> None:
    layer, routing = _lora([2, 8, 4])
    rows = _rows(routing)
    _run(layer, routing, rows, torch.randn(len(rows), 1, 24))
    found = _prepared(layer, routing, rows)
    assert found.prepared().down.shape == (14, 24) and found.prepared().up.shape == (
        14,
        40,
    )  # 2 + 8 + 4, not 3 x 8
    assert found.prepared().mask.sum(dim=1).tolist() == [[2, 8, 4, 0][int(r)] for r in rows]


def test_prefill_and_over_budget_batches_take_per_row_factors_with_the_same_result(monkeypatch) -> None:
    layer, routing = _lora([2, 8, 4])
    rows = _rows(routing)
    prefill = torch.randn(len(rows), 6, 24)  # 6 positions per row: more than DENSE_POSITIONS
    assert not stack_module.dense_pays(prefill)
    torch.testing.assert_close(
        _run(layer, routing, rows, prefill), _alone(layer, routing, rows, prefill), atol=1e-5, rtol=0
    )
    # 14 columns x (24 + 40) = 896 multiply-adds per row against the layer's 960: a budget of 0.9 refuses them
    monkeypatch.setattr(stack_module, "DENSE_FLOPS", 0.9)
    layer.stacked.invalidate()
    x = torch.randn(len(rows), 1, 24)
    mixed = _run(layer, routing, rows, x)
    found = _prepared(layer, routing, rows)
    assert found.prepared() is None
    torch.testing.assert_close(mixed, _alone(layer, routing, rows, x), atol=1e-5, rtol=0)


def test_a_dora_task_keeps_per_row_factors() -> None:
    layer, routing = _lora([2, 8], dora={1})
    rows = _rows(routing)
    x = torch.randn(len(rows), 1, 24)
    mixed = _run(layer, routing, rows, x)
    found = _prepared(layer, routing, rows)
    assert found.prepared() is None
    torch.testing.assert_close(mixed, _alone(layer, routing, rows, x), atol=1e-5, rtol=0)


def test_a_parameter_written_between_two_routings_is_seen() -> None:
    """What one routing prepared is kept for its forwards only: the next routing checks the versions again."""
    layer, routing = _lora([2, 8, 4])
    rows = _rows(routing)
    x = torch.randn(len(rows), 1, 24)
    before = _run(layer, routing, rows, x)
    with torch.no_grad():
        layer.lora_B["t1"].mul_(2.0)
    after = _run(layer, routing, rows, x)
    changed = rows == 1
    assert not torch.allclose(before[changed], after[changed])
    torch.testing.assert_close(before[~changed], after[~changed], atol=0, rtol=0)
    torch.testing.assert_close(after, _alone(layer, routing, rows, x), atol=1e-5, rtol=0)


def test_a_prefill_never_builds_the_concatenation(monkeypatch) -> None:
    """It is made when a decode-sized input first asks for it, once per routed batch, never for a prefill."""
    import multitune.methods.lora as lora_module

    calls = []
    real = lora_module.concatenated
    monkeypatch.setattr(lora_module, "concatenated", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer, routing = _lora([2, 8, 4])
    rows = _rows(routing)
    routing.set_rows(rows)
    with torch.no_grad():
        layer(torch.randn(len(rows), 6, 24))  # the prefill of a generate
        assert not calls
        for _ in range(3):  # its decode steps: the same routed batch
            layer(torch.randn(len(rows), 1, 24))
    routing.clear()
    assert len(calls) == 1
