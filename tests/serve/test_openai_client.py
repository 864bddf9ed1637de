"""The official openai client against the real scheduler on a real uvicorn on loopback (tiny Llama, LoRA and prompt
tasks): logprobs and top_logprobs equal the model's log-softmax, n samples share one prefill and repeat with a
seed, streaming gives the same text, bad parameters are one-line 400s."""

from __future__ import annotations

import pytest
import torch
from helpers import perturb, save_tiny
from test_server import openai_client

from multitune.bank import MultiTaskModel
from multitune.methods.lora import LoRAConfig
from multitune.methods.prompt import PromptConfig
from multitune.models import load_base
from multitune.serve.decode import DecodeBatch, Handle, SamplingParams, sample_tokens
from multitune.serve.engine import Engine
from multitune.storage import save_adapter

openai = pytest.importorskip("openai")
PROMPT = "bad plot but great acting"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("client")
    folder = save_tiny("llama", root / "llama")
    bank = MultiTaskModel(load_base(str(folder), device="cpu"))
    torch.manual_seed(0)
    bank.add_task("lora", "generation", "lora", LoRAConfig(rank=4))
    bank.add_task("prompt", "generation", "prompt", PromptConfig(num_virtual_tokens=3, init="random"))
    for seed, task in enumerate(["lora", "prompt"]):
        perturb(bank, task, seed=seed)
        save_adapter(bank, task, root / "bank" / task)
    with openai_client(root / "bank", max_batch_size=8, max_wait_ms=5) as (client, scheduler):
        yield client, scheduler.engine


def _reference(engine: Engine, task: str, prompt: str, tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy ids of the task's answer and the log-softmax at each generated position (teacher-forced)."""
    bank = engine.bank_of(task)
    features, slots = engine.features(bank, [(task, prompt)], [0], 10**6, False)
    ids = torch.tensor([features[0]["input_ids"]])
    rows = torch.tensor(slots)
    out = bank.generate(ids, torch.ones_like(ids), rows, max_new_tokens=tokens, do_sample=False)
    generated = out[0]  # bank.generate returns the new tokens
    eos = bank.base.tokenizer.eos_token_id
    generated = generated[: (generated == eos).nonzero()[0, 0]] if (generated == eos).any() else generated
    full = torch.cat([ids[0], generated])[None]
    with torch.no_grad():
        routed = bank.run(full, torch.ones_like(full), rows)
        logits = routed.out.logits[0, routed.width :]
    return generated.tolist(), torch.log_softmax(logits[ids.shape[1] - 1 : -1].float(), dim=-1)


@pytest.mark.parametrize("task", ["lora", "prompt"])
def test_completion_logprobs_are_the_model_s_log_softmax(served, task) -> None:
    client, engine = served
    reply = client.completions.create(model=task, prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    choice = reply.choices[0]
    ids, logp = _reference(engine, task, PROMPT, 6)
    tokenizer = engine.base.tokenizer
    assert choice.logprobs.tokens == [tokenizer.decode([i]) for i in ids]
    assert ids, "the reference answer is empty: nothing would be compared"
    expected = logp[torch.arange(len(ids)), torch.tensor(ids, dtype=torch.long)]
    torch.testing.assert_close(torch.tensor(choice.logprobs.token_logprobs), expected, atol=1e-4, rtol=0)
    for position, top in enumerate(choice.logprobs.top_logprobs):
        values, alternatives = logp[position].topk(3)
        assert list(top) == [tokenizer.decode([int(i)]) for i in alternatives]
        torch.testing.assert_close(torch.tensor(list(top.values())), values, atol=1e-4, rtol=0)
    offsets = choice.logprobs.text_offset
    assert offsets[0] == 0 and all(b > a for a, b in zip(offsets, offsets[1:], strict=False))


def test_chat_logprobs_in_openai_s_shape(served) -> None:
    client, _ = served
    reply = client.chat.completions.create(
        model="lora", messages=[{"role": "user", "content": PROMPT}], max_tokens=5, temperature=0,
        logprobs=True, top_logprobs=2,
    )  # fmt: skip
    content = reply.choices[0].logprobs.content
    assert content and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.bytes == list(t.token.encode()) and t.logprob <= 0 for t in content)
    assert all(
        t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content
    )  # greedy: the top one is chosen
    plain = client.chat.completions.create(model="lora", messages=[{"role": "user", "content": PROMPT}], max_tokens=5, temperature=0)  # fmt: skip
    assert (
        plain.choices[0].logprobs is None
        and plain.choices[0].message.content == reply.choices[0].message.content
    )


def test_n_samples_repeat_with_a_seed_and_share_one_prefill(served) -> None:
    client, _ = served
    ask = {"model": "lora", "prompt": PROMPT, "max_tokens": 8, "temperature": 1.0, "n": 4, "seed": 11}
    first, again = client.completions.create(**ask), client.completions.create(**ask)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2, 3]
    assert texts == [c.text for c in again.choices] and len(set(texts)) > 1
    assert first.usage.prompt_tokens == client.completions.create(model="lora", prompt=PROMPT, max_tokens=1).usage.prompt_tokens  # fmt: skip
    assert first.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in client.completions.create(**ask, logprobs=0).choices)  # fmt: skip
    greedy = client.completions.create(model="lora", prompt=PROMPT, max_tokens=8, temperature=0, n=3)
    alone = client.completions.create(model="lora", prompt=PROMPT, max_tokens=8, temperature=0)
    assert [c.text for c in greedy.choices] == [alone.choices[0].text] * 3


def test_a_prompt_s_rows_are_prefilled_once(served) -> None:
    _, engine = served
    bank = engine.bank_of("lora")
    features, _ = engine.features(bank, [("lora", PROMPT)], [0], 10**6, False)
    ids = list(features[0]["input_ids"])
    handles = [Handle("lora", "lora", ids, SamplingParams(max_tokens=4), 1e18, None) for _ in range(3)]
    other = Handle("prompt", "prompt", ids, SamplingParams(max_tokens=4), 1e18, None)
    seen = []
    run = bank.run

    def counting(input_ids, *args, **kwargs):
        seen.append(input_ids.shape[0])
        return run(input_ids, *args, **kwargs)

    bank.run = counting
    try:
        batch = DecodeBatch(bank)
        shared = batch.join([*handles, other], lambda logits, hs, gen: sample_tokens(logits, hs))
    finally:
        del bank.run
    assert seen == [2]  # one row per (task, prompt), not four
    alone = DecodeBatch(bank).join([Handle("prompt", "prompt", ids, SamplingParams(max_tokens=4), 1e18, None)],
                                   lambda logits, hs, gen: sample_tokens(logits, hs))  # fmt: skip
    assert shared[:3] == [shared[0]] * 3 and shared[3] == alone[0]
    assert len(batch) == 4 and batch.cache.layers[0].keys.shape[0] == 4
    logits = batch.step()  # each copy of the prompt's cache continues as the prompt alone would
    torch.testing.assert_close(logits[1], logits[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(logits[2], logits[0], atol=1e-6, rtol=0)


def test_echo_puts_the_prompt_before_the_completion(served) -> None:
    client, _ = served
    plain = (
        client.completions.create(model="lora", prompt=PROMPT, max_tokens=4, temperature=0).choices[0].text
    )
    echoed = client.completions.create(model="lora", prompt=PROMPT, max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain and plain


def test_streaming_through_the_client_gives_the_same_text(served) -> None:
    client, _ = served
    whole = (
        client.completions.create(model="prompt", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    )
    pieces = [c.choices[0].text for c in client.completions.create(model="prompt", prompt=PROMPT, max_tokens=8, temperature=0, stream=True) if c.choices]  # fmt: skip
    assert "".join(pieces) == whole and len(pieces) > 1
    messages = [{"role": "user", "content": PROMPT}]
    chat = client.chat.completions.create(model="lora", messages=messages, max_tokens=8, temperature=0)
    streamed = client.chat.completions.create(model="lora", messages=messages, max_tokens=8, temperature=0, stream=True)  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == chat.choices[0].message.content


def test_streamed_n_samples_with_logprobs_equal_the_whole_answer(served) -> None:
    client, _ = served
    ask = {
        "model": "lora",
        "prompt": PROMPT,
        "max_tokens": 8,
        "temperature": 1.0,
        "n": 3,
        "seed": 5,
        "logprobs": 2,
    }
    whole = client.completions.create(**ask)
    texts, tokens, logprobs, offsets = ([[] for _ in range(3)] for _ in range(4))
    finished = {}
    for chunk in client.completions.create(**ask, stream=True):
        for choice in chunk.choices:
            texts[choice.index].append(choice.text)
            if choice.logprobs is not None:
                tokens[choice.index] += choice.logprobs.tokens
                logprobs[choice.index] += choice.logprobs.token_logprobs
                offsets[choice.index] += choice.logprobs.text_offset
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    for i, choice in enumerate(whole.choices):
        assert "".join(texts[i]) == choice.text and finished[i] == choice.finish_reason
        assert tokens[i] == choice.logprobs.tokens and offsets[i] == choice.logprobs.text_offset
        torch.testing.assert_close(torch.tensor(logprobs[i]), torch.tensor(choice.logprobs.token_logprobs))
    assert len({"".join(t) for t in texts}) > 1  # three samples, not one thrice


def test_streamed_chat_logprobs_equal_the_whole_answer(served) -> None:
    client, _ = served
    ask = {"model": "lora", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6, "temperature": 0, "logprobs": True, "top_logprobs": 2, "n": 2}  # fmt: skip
    whole = client.chat.completions.create(**ask)
    streamed: dict[int, list] = {0: [], 1: []}
    roles = set()
    for chunk in client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}):
        if not chunk.choices:
            assert chunk.usage.completion_tokens == whole.usage.completion_tokens
            continue
        choice = chunk.choices[0]
        if choice.delta.role:
            roles.add(choice.index)
        if choice.logprobs is not None:
            streamed[choice.index] += [
                (t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in choice.logprobs.content
            ]
    assert roles == {0, 1}
    for choice in whole.choices:
        expected = [(t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in choice.logprobs.content]
        assert [(t, a) for t, _, a in streamed[choice.index]] == [(t, a) for t, _, a in expected]
        torch.testing.assert_close(
            torch.tensor([lp for _, lp, _ in streamed[choice.index]]),
            torch.tensor([lp for _, lp, _ in expected]),
        )


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"logprobs": 21}, ["logprobs asks for 21", "0 to 20"]),
        ({"n": 9}, ["n is 9", "at most 8 rows", "--max-batch-size"]),
    ],  # fmt: skip
)
def test_bad_parameters_are_one_line_400s(served, kwargs, words) -> None:
    client, _ = served
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="lora", prompt=PROMPT, max_tokens=2, **kwargs)
    message = caught.value.body["message"]
    assert "\n" not in message
    for word in words:
        assert word in message, message
