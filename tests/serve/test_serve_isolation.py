"""One bad request never takes its batch with it: a request that makes a classification forward, a prefill, a
decode step, sampling or a seq2seq batch fail is answered with its own error, and every good request batched
with it gets its normal answer (not a 504). Requests the sampler or tokenizer cannot use are refused first."""

from __future__ import annotations

import asyncio
import logging

import pytest
from helpers import WORDS, perturb, save_tiny, word_tokenizer

from multitune.bank import MultiTaskModel
from multitune.methods.lora import LoRAConfig
from multitune.methods.prefix import PrefixConfig
from multitune.methods.prompt import PromptConfig
from multitune.models import load_base
from multitune.serve.decode import RequestError, SamplingParams
from multitune.serve.engine import Engine
from multitune.serve.scheduler import Scheduler
from multitune.storage import save_adapter

POISON = "terrible"  # the marked word of a poisoned request
TIMEOUT = 30.0  # a good request left unanswered would end as a 504 after this


def _bank(tmp_path_factory, family: str, tasks: dict) -> Engine:
    root = tmp_path_factory.mktemp(family)
    bank = MultiTaskModel(load_base(str(save_tiny(family, root / "model")), device="cpu"))
    for seed, (name, (kind, method, config)) in enumerate(tasks.items()):
        bank.add_task(name, kind, method, config, ["neg", "pos"] if kind == "classification" else None)
        perturb(bank, name, seed=seed)
        save_adapter(bank, name, root / "bank" / name)
    return root / "bank"


@pytest.fixture(scope="module")
def llama_bank(tmp_path_factory):
    return _bank(
        tmp_path_factory,
        "llama",
        {
            "lora": ("generation", "lora", LoRAConfig(rank=4)),
            "prompt": ("generation", "prompt", PromptConfig(num_virtual_tokens=3, init="random")),
            "prefix": ("generation", "prefix", PrefixConfig(num_virtual_tokens=2, projection=False)),
            "sent": ("classification", "lora", LoRAConfig(rank=2)),
        },
    )


@pytest.fixture
def engine(llama_bank):
    return Engine.from_folder(llama_bank, device="cpu")


def _prompt(i: int, words: int) -> str:
    return " ".join(WORDS[(3 * i + k) % 13 + 13] for k in range(words))  # never the poison word


def _alone(engine: Engine, task: str, prompt: str, tokens: int) -> str:
    return engine.generate([(task, prompt)], max_new_tokens=tokens)[0]


def _queued_then_started(scheduler: Scheduler, jobs: list[tuple[str, str, SamplingParams]]) -> list:
    """Submit every job while the worker is stopped (so they share one batch), start it, collect the answers:
    (text, finish_reason) or the RequestError."""
    handles = [scheduler.submit_generate(task, prompt, params) for task, prompt, params in jobs]
    scheduler.start()
    out = []
    for handle in handles:
        try:
            list(handle.tokens())
            out.append((handle.text, handle.finish_reason))
        except RequestError as error:
            out.append(error)
    return out


def _marked_forward(module, when):
    """``module``'s forward, raising RuntimeError whenever ``when`` holds of its first argument (or of its
    keywords, when it has none)."""
    forward = module.forward

    def poisoned(*args, **kwargs):
        if when(args[0] if args else kwargs):
            raise RuntimeError("the model broke on a marked row")
        return forward(*args, **kwargs)

    return poisoned


def _failed_alone(caplog) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "multitune.serve.scheduler" and r.levelno == logging.ERROR and r.exc_info
    ]


def test_a_poisoned_classification_fails_alone(engine, caplog):
    calls = []
    classify_rows = engine.classify_rows

    def marked(requests, *args, **kwargs):
        calls.append(len(requests))
        if any(text == POISON for _, text in requests):
            raise TypeError("the tokenizer cannot read this")
        return classify_rows(requests, *args, **kwargs)

    engine.classify_rows = marked
    scheduler = Scheduler(engine, max_batch_size=32, timeout_s=TIMEOUT)
    texts = [_prompt(i, 2 + i % 4) for i in range(5)]
    expected = [classify_rows([("sent", t)])[0].probabilities for t in texts]

    async def main():
        futures = [asyncio.ensure_future(scheduler.classify("sent", [t])) for t in texts[:3]]
        futures.insert(2, asyncio.ensure_future(scheduler.classify("sent", [POISON])))
        futures += [asyncio.ensure_future(scheduler.classify("sent", [t])) for t in texts[3:]]
        await asyncio.sleep(0)  # every request is queued before the worker starts
        scheduler.start()
        return await asyncio.gather(*futures, return_exceptions=True)

    try:
        with caplog.at_level(logging.WARNING, logger="multitune.serve.scheduler"):
            answers = asyncio.run(main())
    finally:
        scheduler.stop()
    assert calls[0] == 6  # the six shared a forward, which failed
    poisoned = answers.pop(2)
    assert isinstance(poisoned, RequestError) and poisoned.status == 500 and "TypeError" in str(poisoned)
    for answer, want in zip(answers, expected, strict=True):
        assert not isinstance(answer, BaseException), answer
        assert answer[0].probabilities == pytest.approx(want, abs=1e-6) and answer[0].truncated is False
    assert _failed_alone(caplog)  # logged with its traceback


def test_a_poisoned_prefill_fails_alone(engine, caplog):
    marker = word_tokenizer().convert_tokens_to_ids(POISON)
    embed = (
        engine.shared.base.model.get_input_embeddings()
    )  # sees the ids also where the model gets embeddings
    embed.forward = _marked_forward(embed, lambda ids: ids.shape[1] > 1 and bool((ids == marker).any()))
    jobs = [
        (task, _prompt(i, 2 + i % 5), SamplingParams(max_tokens=5))
        for i, task in enumerate(["lora", "prompt", "prefix", "lora", "prefix"])
    ]
    jobs.insert(3, ("lora", f"the {POISON} film", SamplingParams(max_tokens=5)))
    scheduler = Scheduler(engine, max_batch_size=16, timeout_s=TIMEOUT)
    try:
        with caplog.at_level(logging.WARNING, logger="multitune.serve.scheduler"):
            answers = _queued_then_started(scheduler, jobs)
    finally:
        scheduler.stop()
    poisoned = answers.pop(3)
    jobs.pop(3)
    assert isinstance(poisoned, RequestError) and poisoned.status == 500 and "marked row" in str(poisoned)
    del embed.forward  # the real forward again, for the expected answers
    for answer, (task, prompt, params) in zip(answers, jobs, strict=True):
        assert not isinstance(answer, BaseException), answer
        assert answer[0].strip() == _alone(engine, task, prompt, params.max_tokens), task
    assert any("prefill of 6 requests failed" in r.getMessage() for r in caplog.records)
    assert _failed_alone(caplog)


def test_a_poisoned_decode_step_fails_alone(engine):
    """The long prompt's row makes every decode step it is in raise: the first step of all six fails, each row
    then steps alone, and the five others go on together to their normal answers (their caches intact)."""
    long_prompt = _prompt(99, 30)
    model = engine.shared.base.model
    model.forward = _marked_forward(
        model,
        lambda kw: (
            kw.get("input_ids") is not None
            and kw["input_ids"].shape[1] == 1
            and int(kw["position_ids"].max()) >= 25
        ),
    )
    jobs = [
        (task, _prompt(i, 2 + i % 5), SamplingParams(max_tokens=6))
        for i, task in enumerate(["prefix", "lora", "prompt", "lora", "prompt"])
    ]
    jobs.insert(1, ("lora", long_prompt, SamplingParams(max_tokens=6)))
    scheduler = Scheduler(engine, max_batch_size=16, timeout_s=TIMEOUT)
    try:
        answers = _queued_then_started(scheduler, jobs)
        decode_sizes = [size for kind, size in scheduler.stats.drain() if kind == "decode"]
    finally:
        scheduler.stop()
    poisoned = answers.pop(1)
    jobs.pop(1)
    assert isinstance(poisoned, RequestError) and poisoned.status == 500
    assert max(decode_sizes) == 5  # the survivors still shared their decode steps
    del model.forward
    for answer, (task, prompt, params) in zip(answers, jobs, strict=True):
        assert not isinstance(answer, BaseException), answer
        assert answer[0].strip() == _alone(engine, task, prompt, params.max_tokens), task


def test_a_row_whose_sampling_fails_fails_alone(engine):
    """A seed the generator cannot take (set after the request's checks) fails that row in its prefill only."""
    bad = SamplingParams(max_tokens=4, temperature=1.0, seed=1)
    jobs = [("lora", _prompt(i, 3), SamplingParams(max_tokens=4)) for i in range(3)]
    jobs.insert(1, ("lora", _prompt(7, 3), bad))
    scheduler = Scheduler(engine, max_batch_size=16, timeout_s=TIMEOUT)
    handles = [scheduler.submit_generate(task, prompt, params) for task, prompt, params in jobs]
    bad.seed = 2**70
    scheduler.start()
    try:
        with pytest.raises(RequestError, match="Overflow") as error:
            list(handles[1].tokens())
        assert error.value.status == 500
        for handle, (task, prompt, params) in zip(
            handles[::2] + handles[3:], [jobs[0], jobs[2], jobs[3]], strict=False
        ):
            list(handle.tokens())
            assert handle.text.strip() == _alone(engine, task, prompt, params.max_tokens)
    finally:
        scheduler.stop()


def test_seq2seq_requests_are_answered_and_a_poisoned_one_fails_alone(tmp_path_factory):
    bank = _bank(
        tmp_path_factory,
        "t5",
        {
            "t5-lora": ("generation", "lora", LoRAConfig(rank=4)),
            "t5-other": ("generation", "lora", LoRAConfig(rank=2)),
        },
    )
    engine = Engine.from_folder(bank, device="cpu")
    generate = engine.generate

    def marked(requests, *args, **kwargs):
        if any(POISON in prompt for _, prompt in requests):
            raise RuntimeError("the model broke on a marked row")
        return generate(requests, *args, **kwargs)

    engine.generate = marked
    jobs = [
        (task, _prompt(i, 3 + i % 3), SamplingParams(max_tokens=3 + i % 2))
        for i, task in enumerate(["t5-lora", "t5-other", "t5-lora", "t5-other"])
    ]
    jobs.insert(2, ("t5-lora", f"a {POISON} place", SamplingParams(max_tokens=3)))
    scheduler = Scheduler(engine, max_batch_size=16, timeout_s=TIMEOUT)
    try:
        answers = _queued_then_started(scheduler, jobs)
    finally:
        scheduler.stop()
    poisoned = answers.pop(2)
    jobs.pop(2)
    assert isinstance(poisoned, RequestError) and poisoned.status == 500
    for answer, (task, prompt, params) in zip(answers, jobs, strict=True):
        assert not isinstance(answer, BaseException), answer
        assert answer[0] == generate([(task, prompt)], max_new_tokens=params.max_tokens, max_length=10**6)[0]


def test_seq2seq_refuses_what_only_step_wise_decoding_gives(tmp_path_factory):
    bank = _bank(tmp_path_factory, "t5", {"t5-lora": ("generation", "lora", LoRAConfig(rank=4))})
    scheduler = Scheduler(Engine.from_folder(bank, device="cpu"))
    for params, message in [
        (SamplingParams(temperature=0.7, seed=1), "temperature: sampling is served for decoder models"),
        (SamplingParams(logprobs=2), "logprobs are served for decoder models"),
    ]:
        with pytest.raises(RequestError, match=message) as error:
            scheduler.submit_generate("t5-lora", "a film", params)
        assert error.value.status == 400
    with pytest.raises(RequestError, match="response_format is served for decoder models"):
        scheduler.submit_generate(
            "t5-lora", "a film", SamplingParams(response_format={"type": "json_object"})
        )
    assert scheduler.submit_generate("t5-lora", "a film", SamplingParams(max_tokens=2)) is not None  # greedy


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (SamplingParams(seed=2**64), "seed"),
        (SamplingParams(seed=-1), "seed"),
        (SamplingParams(seed=2**70), "seed"),
        (SamplingParams(temperature=1e-300), "temperature"),
        (SamplingParams(temperature=0.009), "temperature"),
        (SamplingParams(temperature=float("nan")), "temperature"),
        (SamplingParams(top_p=float("nan")), "top_p"),
        (SamplingParams(stop=["ok", "\udc80"]), "stop.1"),
        (SamplingParams(max_tokens=True), "max_tokens"),
    ],
)
def test_what_the_sampler_cannot_use_is_refused_naming_the_field(engine, params, field):
    scheduler = Scheduler(engine)
    with pytest.raises(RequestError) as error:
        scheduler.submit_generate("lora", "a film", params)
    assert error.value.status == 400 and str(error.value).startswith(field)


def test_the_largest_seed_and_smallest_temperature_work(engine):
    scheduler = Scheduler(engine)
    scheduler.start()
    try:
        for params in (
            SamplingParams(max_tokens=3, temperature=0.01, seed=2**64 - 1),
            SamplingParams(max_tokens=3, temperature=2.0, seed=0),
        ):
            text, reason = scheduler.generate_sync("lora", "a film", params)
            assert reason in ("length", "stop")
    finally:
        scheduler.stop()


def test_texts_a_tokenizer_cannot_read_are_refused_naming_the_field(engine):
    scheduler = Scheduler(engine)
    with pytest.raises(
        RequestError, match=r"^prompt holds a lone surrogate \(U\+DC80\) at character 2"
    ) as error:
        scheduler.submit_generate("lora", "a \udc80 film", SamplingParams())
    assert error.value.status == 400
    with pytest.raises(RequestError, match=r"^messages\.1\.content holds a lone surrogate"):
        scheduler.chat_prompt(
            "lora", [{"role": "system", "content": "x"}, {"role": "user", "content": "\ud800"}]
        )
    with pytest.raises(RequestError, match=r"^input\.1 holds a lone surrogate"):
        asyncio.run(scheduler.classify("sent", ["fine", "\udc80 x"]))


def test_over_http_a_poisoned_classification_among_concurrent_good_ones(engine):
    """Six classify requests sent at once, one of them poisoned: the five good ones get their normal answer (the
    issue's reproduction had all six time out), the poisoned one a 500; a lone surrogate is a 400 up front."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from test_server import running

    from multitune.serve.app import create_app

    classify_rows = engine.classify_rows
    texts = [_prompt(i, 2 + i % 4) for i in range(5)]
    expected = [classify_rows([("sent", t)])[0].probabilities for t in texts]

    def marked(requests, *args, **kwargs):
        if any(text == POISON for _, text in requests):
            raise TypeError("the tokenizer cannot read this")
        return classify_rows(requests, *args, **kwargs)

    engine.classify_rows = marked
    scheduler = Scheduler(engine, max_batch_size=32, max_wait_ms=200, timeout_s=TIMEOUT)
    with running(create_app(scheduler)) as base, httpx.Client(base_url=base, timeout=60) as http:

        def ask(text):
            return http.post("/v1/classify", json={"model": "sent", "input": text})

        with ThreadPoolExecutor(6) as pool:
            replies = list(pool.map(ask, [*texts[:2], POISON, *texts[2:]]))
        assert replies.pop(2).status_code == 500
        for reply, want in zip(replies, expected, strict=True):
            assert reply.status_code == 200, reply.text
            assert reply.json()["data"][0]["probabilities"] == pytest.approx(want, abs=1e-6)
        reply = http.post(
            "/v1/classify",
            content=b'{"model": "sent", "input": ["\\udc80 x"]}',
            headers={"Content-Type": "application/json"},
        )
        assert (
            reply.status_code == 400 and "input.0 holds a lone surrogate" in reply.json()["error"]["message"]
        )
        long = " ".join(["good"] * 200)
        data = http.post("/v1/classify", json={"model": "sent", "input": [long, "fine"]}).json()["data"]
        assert [d["truncated"] for d in data] == [True, False]


def test_a_fault_of_the_scheduler_itself_answers_every_request_it_held(engine, caplog):
    """The safety net: whatever fails in a turn outside a forward, each request taken from a queue in it gets
    a 500 (before, it waited for an answer that never came), and the next requests are served."""
    scheduler = Scheduler(engine, max_batch_size=16, timeout_s=TIMEOUT)
    handles = [
        scheduler.submit_generate("lora", _prompt(i, 3), SamplingParams(max_tokens=3)) for i in range(3)
    ]
    bank_of = engine.bank_of
    engine.bank_of = lambda task: (_ for _ in ()).throw(RuntimeError("lookup broke"))
    with caplog.at_level(logging.ERROR, logger="multitune.serve.scheduler"):
        scheduler.start()
        try:
            for handle in handles:
                with pytest.raises(RequestError, match="lookup broke") as error:
                    list(handle.tokens())
                assert error.value.status == 500
            engine.bank_of = bank_of
            text, _ = scheduler.generate_sync("lora", "a film", SamplingParams(max_tokens=3))
            assert text.strip() == _alone(engine, "lora", "a film", 3)
        finally:
            scheduler.stop()
    assert any("turn failed" in r.getMessage() and r.exc_info for r in caplog.records)
