"""The live monitor on synthetic streams: no alarm while traffic looks like the reference, one alarm per
episode when it shifts, cleared when it is back, tasks isolated, the accuracy estimate calibrated."""

from __future__ import annotations

import threading

import pytest
import torch

from multitune.health.live import Monitor, TaskMonitor, _Ring, drift_tests, family_p_value
from multitune.health.profile import Profile

H, K = 16, 4


def _profile(n: int = 300, seed: int = 0, temperature: float = 1.0) -> Profile:
    g = torch.Generator().manual_seed(seed)
    pooled = torch.randn(n, H, generator=g)
    components = torch.eye(H)[:, :K].half()
    return Profile(
        task="t",
        kind="classification",
        labels=["neg", "pos"],
        mean=torch.zeros(H),
        components=components,
        features=pooled @ components.float(),
        lengths=torch.randint(5, 30, (n,), generator=g).float(),
        unknown_rates=torch.zeros(n),
        label_counts=torch.tensor([float(n // 2), float(n - n // 2)]),
        confidences=0.5 + 0.5 * torch.rand(n, generator=g),
        temperature=temperature,
        sigma=2.0,
    )


def _batch(g: torch.Generator, n: int, shift: float = 0.0, only: int | None = None):
    """n rows like the reference (shift moves the features; only: every prediction is that label)."""
    pooled = torch.randn(n, H, generator=g) + shift
    conf = 0.5 + 0.5 * torch.rand(n, generator=g)
    label = torch.randint(0, 2, (n,), generator=g) if only is None else torch.full((n,), only)
    probs = torch.stack([torch.where(label == 0, conf, 1 - conf), torch.where(label == 1, conf, 1 - conf)], 1)
    lengths = torch.randint(5, 30, (n,), generator=g).tolist()
    return pooled, probs, lengths, [0.0] * n


OPTIONS = {
    "window": 100,
    "check_every": 25,
    "permutations": 1000,
    "alpha": 1e-3,
}  # few false alarms in 100s of checks


def _feed(monitor: TaskMonitor, g: torch.Generator, rows: int, **shift) -> list[bool]:
    alarms = []
    for _ in range(rows // 25):
        monitor.observe(*_batch(g, 25, **shift))
        alarms.append(monitor.alarm)
    return alarms


def test_an_unshifted_stream_raises_no_alarm_and_a_shift_raises_one_episode() -> None:
    g = torch.Generator().manual_seed(1)
    monitor = TaskMonitor(_profile(), **OPTIONS)
    assert not any(_feed(monitor, g, 2000))
    state = monitor.state()
    assert state["drift"]["alarms"] == 0 and state["drift"]["window"] == 100 and state["requests"] == 2000
    assert set(state["drift"]["tests"]) == {"features", "labels", "confidence", "length"}
    assert _feed(monitor, g, 400, shift=1.0)[-1]  # raised, and held while the shift lasts
    assert monitor.state()["drift"]["alarms"] == 1
    assert monitor.state()["drift"]["tests"]["features"]["p_value"] == 0.0
    back = _feed(monitor, g, 600)
    assert not back[-1] and monitor.alarms == 1  # cleared once the window is normal again, no new episode
    _feed(monitor, g, 300, shift=1.0)
    assert monitor.alarm and monitor.alarms == 2  # a second shift is a second episode
    history = monitor.state()["history"]
    assert history[-1][2] is True and history[0][0] == 100 and len(history) == (3300 - 100) // 25 + 1


def test_a_label_mix_shift_is_caught_by_the_label_test() -> None:
    g = torch.Generator().manual_seed(2)
    monitor = TaskMonitor(_profile(), **OPTIONS)
    _feed(monitor, g, 200)
    _feed(monitor, g, 200, only=0)
    state = monitor.state()
    assert state["drift"]["alarm"] and state["drift"]["tests"]["labels"]["p_value"] < 1e-4
    assert state["label_distribution"]["live"]["neg"] == 1.0
    assert state["label_distribution"]["reference"] == {"neg": 0.5, "pos": 0.5}


def test_no_check_before_the_window_is_full() -> None:
    monitor = TaskMonitor(_profile(), **OPTIONS)
    monitor.observe(*_batch(torch.Generator().manual_seed(3), 60, shift=5.0))
    state = monitor.state()
    assert state["drift"]["score"] is None and not state["drift"]["alarm"] and state["drift"]["window"] == 60


def test_rows_without_a_head_add_no_features() -> None:
    monitor = TaskMonitor(_profile(), **OPTIONS)
    pooled, probs, lengths, rates = _batch(torch.Generator().manual_seed(4), 10)
    pooled[::2] = float("nan")
    monitor.observe(pooled, probs, lengths, rates)
    assert monitor.features.count == 5 and monitor.lengths.count == 10
    assert not torch.isnan(monitor.features.values()).any()


def test_the_estimate_is_the_mean_calibrated_confidence() -> None:
    monitor = TaskMonitor(_profile(temperature=2.0), **OPTIONS)
    probs = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    monitor.observe(None, probs, [5, 6], [0.0, 0.0])
    # softmax(log p / 2) of (0.9, 0.1) is (0.75, 0.25); of (0.2, 0.8), 0.8 -> 2/3
    assert monitor.estimated_accuracy() == pytest.approx((0.75 + 2 / 3) / 2, abs=1e-6)
    assert monitor.state()["estimated_accuracy"] == pytest.approx((0.75 + 2 / 3) / 2, abs=1e-6)


def test_tasks_are_isolated_and_a_task_without_profile_is_reported_unmonitored() -> None:
    g = torch.Generator().manual_seed(5)
    monitor = Monitor({"a": _profile(seed=1), "b": _profile(seed=2), "c": None}, **OPTIONS)
    for _ in range(16):
        monitor.observe("a", *_batch(g, 25, shift=1.0))
        monitor.observe("b", *_batch(g, 25))
        monitor.observe("c", *_batch(g, 25))
    tasks = monitor.state()["tasks"]
    assert tasks["a"]["drift"]["alarm"] and not tasks["b"]["drift"]["alarm"]
    assert tasks["b"]["drift"]["alarms"] == 0 and tasks["b"]["requests"] == 400
    assert tasks["c"] == {
        "requests": 400,
        "monitored": False,
        "reason": "task 'c' has no drift profile; run `multitune profile RUN --data FILE` to build one",
    }
    monitor.remove("a")
    monitor.add("d", _profile())
    assert set(monitor.state()["tasks"]) == {"b", "c", "d"}
    monitor.observe("unknown", *_batch(g, 3))  # a task the monitor was not told about: ignored
    assert "unknown" not in monitor.state()["tasks"]


def test_generation_rows_are_tested_on_response_length_and_log_prob() -> None:
    g = torch.Generator().manual_seed(6)
    profile = _profile()
    profile.kind, profile.label_counts, profile.confidences = "generation", torch.zeros(0), torch.zeros(0)
    profile.features = torch.zeros(0, 0)
    profile.response_lengths = torch.randint(10, 40, (300,), generator=g).float()
    profile.mean_logprobs = -torch.rand(300, generator=g) * 2
    monitor = TaskMonitor(profile, **OPTIONS)
    for _ in range(8):
        monitor.observe_generation(
            torch.randint(10, 40, (25,), generator=g).tolist(), (-torch.rand(25, generator=g) * 2).tolist()
        )
    assert not monitor.alarm and set(monitor.state()["drift"]["tests"]) == {"response_length", "logprob"}
    for _ in range(8):
        monitor.observe_generation([2] * 25, (-torch.rand(25, generator=g) * 2).tolist())
    assert monitor.alarm and monitor.state()["drift"]["tests"]["response_length"]["p_value"] < 1e-6


def test_observe_and_state_from_two_threads() -> None:
    monitor = TaskMonitor(_profile(), **OPTIONS)
    errors: list[BaseException] = []

    def feed() -> None:
        try:
            g = torch.Generator().manual_seed(7)
            for _ in range(40):
                monitor.observe(*_batch(g, 10))
        except BaseException as error:  # noqa: BLE001  (the test reports it)
            errors.append(error)

    thread = threading.Thread(target=feed)
    thread.start()
    while thread.is_alive():
        state = monitor.state()
        assert state["drift"]["window"] <= 100
    thread.join()
    assert not errors and monitor.state()["requests"] == 400


def test_the_ring_keeps_the_last_rows_in_order_of_arrival_modulo_rotation() -> None:
    ring = _Ring(5)
    ring.add(torch.arange(3.0))
    ring.add(torch.arange(3.0, 7.0))
    assert sorted(ring.values().tolist()) == [2.0, 3.0, 4.0, 5.0, 6.0]
    ring.add(torch.arange(10.0, 22.0))
    assert sorted(ring.values().tolist()) == [17.0, 18.0, 19.0, 20.0, 21.0]


def test_family_p_value_is_bonferroni() -> None:
    assert family_p_value({"a": {"p_value": 0.01}, "b": {"p_value": 0.5}}) == 0.02
    assert family_p_value({}) == 1.0
    assert drift_tests(_profile()) == {}
