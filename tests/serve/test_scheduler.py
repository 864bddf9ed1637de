"""The serving scheduler: continuous batching across tasks and methods equals generating each task alone."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
from helpers import WORDS, save_generation_bank, save_tiny

import multitune.serve.scheduler as scheduler_module
from multitune.methods.adapter import AdapterConfig
from multitune.methods.ia3 import IA3Config
from multitune.methods.lora import LoRAConfig
from multitune.methods.prefix import PrefixConfig
from multitune.methods.prompt import PromptConfig
from multitune.serve.decode import QueueFull, RequestError, SamplingParams
from multitune.serve.engine import Engine
from multitune.serve.scheduler import Scheduler

TASKS = {
    "lora": ("lora", LoRAConfig(rank=4)),
    "lora-all": ("lora", LoRAConfig(rank=2, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])),
    "prompt3": ("prompt", PromptConfig(num_virtual_tokens=3, init="random")),
    "prompt6": ("prompt", PromptConfig(num_virtual_tokens=6, init="random")),
    "prefix": ("prefix", PrefixConfig(num_virtual_tokens=4, projection=False)),
    "adapter": ("adapter", AdapterConfig(reduction_factor=4)),
    "ia3": ("ia3", IA3Config()),
    "full": ("full", None),
}


@pytest.fixture(scope="module")
def bank_dir(tmp_path_factory):
    model = save_tiny("llama", tmp_path_factory.mktemp("llama"))
    return save_generation_bank(model, tmp_path_factory.mktemp("bank"), TASKS)


@pytest.fixture
def engine(bank_dir):
    return Engine.from_folder(bank_dir, device="cpu")


def _prompts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))) for _ in range(n)]


def _alone(engine, task: str, prompt: str, tokens: int) -> str:
    return engine.generate([(task, prompt)], max_new_tokens=tokens, min_new_tokens=tokens)[0]


def test_concurrent_mixed_generation_equals_each_alone(engine):
    """Requests of 8 tasks (every method) arriving at different times share decode steps; greedy text = alone."""
    scheduler = Scheduler(engine, max_batch_size=16, max_wait_ms=2)
    scheduler.start()
    try:
        prompts = _prompts(24)
        jobs = [(list(TASKS)[i % len(TASKS)], p, 3 + i % 5) for i, p in enumerate(prompts)]
        results: dict[int, tuple[str, str]] = {}

        def client(i: int) -> None:
            time.sleep(0.003 * (i % 7))  # staggered arrivals: rows join a batch that is already decoding
            task, prompt, tokens = jobs[i]
            results[i] = scheduler.generate_sync(task, prompt, SamplingParams(max_tokens=tokens))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        decode_sizes = [size for kind, size in scheduler.stats.drain() if kind == "decode"]
    finally:
        scheduler.stop()
    assert max(decode_sizes) > 1  # rows of several requests really shared decode steps
    for i, (task, prompt, tokens) in enumerate(jobs):
        text, reason = results[i]
        expected = engine.generate([(task, prompt)], max_new_tokens=tokens)[0]
        assert text.strip() == expected, (task, prompt)
        assert reason in ("length", "stop")


def test_streamed_pieces_make_the_text_and_stop_strings_cut(engine):
    scheduler = Scheduler(engine)
    scheduler.start()
    try:
        handle = scheduler.submit_generate("lora", "the movie was good", SamplingParams(max_tokens=6))
        pieces = list(handle.tokens())
        assert "".join(pieces) == handle.text and handle.finish_reason == "length"
        assert handle.completion_tokens == 6
        full = handle.text
        stop = full.split()[2] if len(full.split()) > 2 else full.split()[-1]
        text, reason = scheduler.generate_sync(
            "lora", "the movie was good", SamplingParams(max_tokens=6, stop=[stop])
        )
        assert reason == "stop" and text == full[: full.find(stop)]
    finally:
        scheduler.stop()


def test_sampling_is_seeded_and_bounded(engine):
    scheduler = Scheduler(engine)
    scheduler.start()
    try:
        params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
        first = scheduler.generate_sync("prompt3", "a nice film", params)
        again = scheduler.generate_sync("prompt3", "a nice film", SamplingParams(**{**params.__dict__}))
        assert first == again
    finally:
        scheduler.stop()


def test_seeded_sampling_repeats_after_rows_that_ended_on_eos(engine, monkeypatch):
    """Each request samples from its own seeded stream, also when an earlier one left on its stop token (that
    path once skipped dropping the earlier stream, which a later request with a reused id() then continued)."""
    scheduler = Scheduler(engine)
    scheduler.start()
    try:
        tokenizer = engine.bank_of("lora").base.tokenizer
        for seed in range(3, 40):  # a seed whose answer has a few words, one of which becomes the "EOS"
            params = SamplingParams(max_tokens=12, temperature=1.5, seed=seed)
            scheduler.generate_sync("lora", "a nice film", SamplingParams(**params.__dict__))
            probe = scheduler.submit_generate("lora", "a nice film", SamplingParams(**params.__dict__))
            list(probe.tokens())
            ids = tokenizer(probe.text, add_special_tokens=False)["input_ids"]
            if len(ids) >= 3:
                break
        stop_id = ids[len(ids) // 2]
        monkeypatch.setattr(
            scheduler_module, "eos_ids", lambda tokenizer: {stop_id}
        )  # every run ends on "EOS"
        texts = [
            scheduler.generate_sync("lora", "a nice film", SamplingParams(**params.__dict__))
            for _ in range(12)
        ]
        assert texts[0][1] == "stop" and len(set(texts)) == 1
    finally:
        scheduler.stop()


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (SamplingParams(max_tokens=0), "max_tokens"),
        (SamplingParams(temperature=-1), "temperature"),
        (SamplingParams(top_p=0), "top_p"),
        (SamplingParams(stop=[""]), "stop"),
    ],
)
def test_bad_sampling_parameters(engine, params, field):
    scheduler = Scheduler(engine)
    with pytest.raises(RequestError) as error:
        scheduler.submit_generate("lora", "hi", params)
    assert error.value.status == 400 and field in str(error.value)


def test_bad_requests(engine):
    scheduler = Scheduler(engine, queue_size=2)
    with pytest.raises(RequestError, match="unknown task 'nope'; served tasks: ") as error:
        scheduler.submit_generate("nope", "hi", SamplingParams())
    assert error.value.status == 404
    context = engine.bank_of("lora").base.model.config.max_position_embeddings
    with pytest.raises(RequestError, match="context is") as error:
        scheduler.submit_generate("lora", "good " * context, SamplingParams())
    assert error.value.status == 400
    scheduler.submit_generate("lora", "a", SamplingParams())  # not started: requests wait in the queue
    scheduler.submit_generate("ia3", "b", SamplingParams())
    with pytest.raises(QueueFull) as error:
        scheduler.submit_generate("lora", "c", SamplingParams())
    assert error.value.status == 429
    scheduler.stop()


def test_cancelled_rows_leave_and_the_rest_go_on(engine):
    scheduler = Scheduler(engine, max_wait_ms=20)
    scheduler.start()
    try:
        long = scheduler.submit_generate("prefix", "the food", SamplingParams(max_tokens=40))
        other = scheduler.submit_generate("adapter", "the food", SamplingParams(max_tokens=40))
        next(long.tokens())
        long.cancel()
        text, reason = asyncio.run(other.result()) if other._apieces else (None, None)
        if text is None:
            list(other.tokens())
            text, reason = other.text, other.finish_reason
        list(long.tokens())
        assert long.finish_reason == "cancelled" and long.completion_tokens < 40
        assert reason in ("length", "stop") and text == _alone(engine, "adapter", "the food", 40)[: len(text)]
    finally:
        scheduler.stop()


def test_reload_is_atomic(engine, bank_dir):
    """A row admitted before a reload finishes on the old version; later rows use the new one."""
    scheduler = Scheduler(engine, max_wait_ms=1)
    scheduler.start()
    try:
        before = _alone(engine, "lora", "the movie", 12)
        old = scheduler.submit_generate("lora", "the movie", SamplingParams(max_tokens=12))
        next(old.tokens())  # admitted and decoding
        info = asyncio.run(scheduler.reload("lora", str(bank_dir / "ia3")))
        assert info["version"] == 2 and info["method"] == "ia3"
        list(old.tokens())
        assert old.text.strip() == before  # finished on the old version
        new_text, _ = scheduler.generate_sync("lora", "the movie", SamplingParams(max_tokens=12))
        assert new_text.strip() == _alone(engine, "ia3", "the movie", 12)
        time.sleep(0.1)
        assert "lora" not in engine.tasks  # the old version is gone once unused
        asyncio.run(scheduler.unload("lora"))
        assert "lora" not in scheduler.tasks()
        with pytest.raises(RequestError, match="unknown task"):
            scheduler.submit_generate("lora", "x", SamplingParams())
        info = asyncio.run(scheduler.load("lora2", str(bank_dir / "lora")))
        assert info["kind"] == "generation" and info["version"] == 1
        text, _ = scheduler.generate_sync("lora2", "the movie", SamplingParams(max_tokens=12))
        assert text.strip() == before
    finally:
        scheduler.stop()


def test_in_passing_thread_returns_raises_and_ends():
    import threading

    from multitune.serve.scheduler import in_passing_thread

    thread, value = in_passing_thread(lambda: (threading.current_thread(), 42))
    assert value == 42 and thread is not threading.current_thread() and not thread.is_alive()

    def fail():
        raise ValueError("bad bank")

    with pytest.raises(ValueError, match="bad bank"):
        in_passing_thread(fail)
