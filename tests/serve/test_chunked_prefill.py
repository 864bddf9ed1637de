"""Chunked prefill: a long prompt prefilled a chunk per turn between the running rows' decode steps equals its
prefill in one forward, for every method, and a chunk that fails or a request cancelled mid-prefill touches no
other row."""

from __future__ import annotations

import contextlib
import random
import time

import pytest
import torch
from helpers import WORDS, save_generation_bank, save_tiny

from multitune.methods.adapter import AdapterConfig
from multitune.methods.ia3 import IA3Config
from multitune.methods.lora import LoRAConfig
from multitune.methods.prefix import PrefixConfig
from multitune.methods.prompt import PromptConfig
from multitune.serve.decode import DecodeBatch, Handle, Prefill, RequestError, SamplingParams, sample_tokens
from multitune.serve.engine import Engine
from multitune.serve.scheduler import Scheduler

TASKS = {
    "lora": ("lora", LoRAConfig(rank=4)),
    "prompt": ("prompt", PromptConfig(num_virtual_tokens=5, init="random")),
    "prefix": ("prefix", PrefixConfig(num_virtual_tokens=4, projection=False)),
    "adapter": ("adapter", AdapterConfig(reduction_factor=4)),
    "ia3": ("ia3", IA3Config()),
    "full": ("full", None),
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model = save_tiny("llama", tmp_path_factory.mktemp("llama"))
    bank = save_generation_bank(model, tmp_path_factory.mktemp("bank"), TASKS)
    return Engine.from_folder(bank, device="cpu")


def _long(seed: int, words: int = 30) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def _handle(engine, task: str, prompt: str) -> Handle:
    bank = engine.bank_of(task)
    ids = bank.base.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return Handle(task, task, ids, SamplingParams(max_tokens=4), time.monotonic() + 60, None)


def _greedy(logits: torch.Tensor, handles: list[Handle], generated: list[list[int]]) -> list[int]:
    return sample_tokens(logits, handles)


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("chunk", [1, 7])
def test_a_prompt_prefilled_in_chunks_decodes_as_its_prefill_in_one_forward(engine, task, chunk):
    """The cache, mask and logits a chunked prefill leaves give the same next logits, step after step."""
    prompt = _long(3)
    whole, chunked = DecodeBatch(engine.bank_of(task)), DecodeBatch(engine.bank_of(task))
    first = whole.join([_handle(engine, task, prompt)], _greedy)
    prefill = Prefill(engine.bank_of(task), [_handle(engine, task, prompt)], chunk)
    turns = 0
    while not prefill.advance():
        turns += 1
    assert turns == -(-len(prefill.ids) // chunk) - 1 and len(prefill.ids) > chunk  # really in chunks
    assert chunked.attach(prefill, _greedy) == first
    torch.testing.assert_close(chunked.mask, whole.mask)
    for _ in range(4):
        a, b = whole.step(), chunked.step()
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
        token = a.argmax(-1)
        whole.last, chunked.last = token, token


def _run(engine, chunk: int, jobs: list[tuple[str, str, SamplingParams, int]]) -> tuple[list, list[str]]:
    """The first job starts decoding, then every other one is submitted at once (so they join a batch that is
    decoding); returns each job's answers and the kinds of forwards in order."""
    scheduler = Scheduler(engine, max_batch_size=16, max_wait_ms=1, prefill_chunk=chunk)
    scheduler.start()
    try:
        first = scheduler.submit_many(*jobs[0][:2], jobs[0][2], jobs[0][3])
        next(first[0].tokens())  # the first row is decoding before the others arrive
        rows = [first] + [
            scheduler.submit_many(task, prompt, params, n) for task, prompt, params, n in jobs[1:]
        ]
        for handles in rows:
            for handle in handles:
                list(handle.tokens())
        kinds = [kind for kind, _ in scheduler.stats.drain()]
    finally:
        scheduler.stop()
    return [[(h.text, h.finish_reason) for h in handles] for handles in rows], kinds


def test_long_prompts_of_every_method_join_a_decoding_batch_in_chunks_and_answer_as_in_one_forward(engine):
    jobs = [("lora", "the film", SamplingParams(max_tokens=60), 1)]
    jobs += [(task, _long(i), SamplingParams(max_tokens=6), 1) for i, task in enumerate(TASKS)]
    jobs.append(("prompt", _long(9), SamplingParams(max_tokens=5, temperature=1.0, seed=11), 3))  # n samples
    chunked, kinds = _run(engine, 4, jobs)
    whole, whole_kinds = _run(engine, 0, jobs)
    assert chunked == whole
    assert "prefill_chunk" not in whole_kinds
    # decode steps of the running row ran between the chunks of a prefill
    chunks = [i for i, kind in enumerate(kinds) if kind == "prefill_chunk"]
    assert len(chunks) >= len(TASKS) * 3
    assert any(kind == "decode" for kind in kinds[chunks[0] : chunks[2]])
    assert all(len(answers) == n for answers, (_, _, _, n) in zip(chunked, jobs, strict=True))


def test_a_failing_chunk_fails_its_request_alone_and_a_cancelled_one_leaves(engine, monkeypatch):
    advance = Prefill.advance

    def poisoned(self):
        if self.handles[0].internal == "ia3" and self.filled:
            raise RuntimeError("a chunk that fails")
        if self.handles[0].internal == "prefix" and self.filled >= 6:
            cancelled.cancel()  # its client goes away between two chunks
        return advance(self)

    monkeypatch.setattr(Prefill, "advance", poisoned)
    scheduler = Scheduler(engine, max_batch_size=16, max_wait_ms=1, prefill_chunk=3)
    scheduler.start()
    try:
        running = scheduler.submit_generate("lora", "the film", SamplingParams(max_tokens=40))
        next(running.tokens())
        failing = scheduler.submit_generate("ia3", _long(1), SamplingParams(max_tokens=4))
        cancelled = scheduler.submit_generate("prefix", _long(2, words=80), SamplingParams(max_tokens=4))
        good = scheduler.submit_generate("adapter", _long(3), SamplingParams(max_tokens=4))
        for handle in (failing, cancelled, good, running):
            with contextlib.suppress(RequestError):  # the failing one's error is its answer
                list(handle.tokens())
        kinds = scheduler.stats.drain()
    finally:
        scheduler.stop()
    assert failing.finish_reason == "error" and "a chunk that fails" in str(failing.error)
    assert cancelled.finish_reason == "cancelled" and cancelled.completion_tokens == 0
    chunks = [size for kind, size in kinds if kind == "prefill_chunk"]
    assert 3 <= len(chunks) < 30  # it was cut off after its third chunk, not prefilled to the end
    assert good.finish_reason in ("length", "stop")
    assert good.text.strip() == engine.generate([("adapter", _long(3))], max_new_tokens=4)[0]
    assert running.finish_reason in ("length", "stop")
    assert running.text.strip() == engine.generate([("lora", "the film")], max_new_tokens=40)[0]


def test_prefill_chunk_below_zero_is_one_line(tmp_path):
    from multitune.errors import ConfigError
    from multitune.serve.cli import serve

    with pytest.raises(ConfigError, match=r"--prefill-chunk must be >= 0 \(got -1\)"):
        serve(str(tmp_path), prefill_chunk=-1)
