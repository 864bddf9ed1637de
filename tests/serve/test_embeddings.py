"""POST /v1/embeddings through the official openai client, against the real scheduler on a real uvicorn on loopback:
the bare base's embeddings are sentence-transformers' recipe (mean pooling, then L2 normalisation), a task's go
through its adapter, rows of several tasks and the base share the batches, and bad requests are one-line 4xx."""

from __future__ import annotations

import base64
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import WORDS, perturb, save_tiny
from test_server import running
from transformers import AutoModel

from multitune.bank import MultiTaskModel
from multitune.methods.lora import LoRAConfig
from multitune.methods.prompt import PromptConfig
from multitune.models import load_base
from multitune.serve.app import create_app
from multitune.serve.engine import Engine
from multitune.serve.scheduler import Scheduler
from multitune.storage import save_adapter

openai = pytest.importorskip("openai")
TEXTS = ["good great film", "the plot was bad but fun", "boring", "a film of great fun and good acting"]


def recipe(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """sentence-transformers' all-MiniLM-L6-v2 recipe, as its model card writes it with plain transformers."""
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed")
    folder = save_tiny("bert", root / "bert")
    bank = MultiTaskModel(load_base(str(folder), device="cpu"))
    bank.add_task("sent-lora", "classification", "lora", LoRAConfig(rank=4), ["neg", "pos"])
    bank.add_task("sent-prompt", "classification", "prompt", PromptConfig(num_virtual_tokens=3, init="random"), ["neg", "pos"])  # fmt: skip
    for seed, task in enumerate(["sent-lora", "sent-prompt"]):
        perturb(bank, task, seed=seed)
        save_adapter(bank, task, root / "bank" / task)
    scheduler = Scheduler(Engine.from_folder(root / "bank", device="cpu"), max_batch_size=16, max_wait_ms=5)
    scheduler.start()
    try:
        with running(create_app(scheduler, model_name="tiny-bert")) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
            yield client, folder, bank
    finally:
        scheduler.stop()


def test_the_base_s_embeddings_are_sentence_transformers_recipe(served) -> None:
    client, folder, bank = served
    expected = recipe(AutoModel.from_pretrained(folder).eval(), bank.base.tokenizer, TEXTS)
    reply = client.embeddings.create(model="tiny-bert", input=TEXTS)  # the client asks for base64
    got = torch.tensor([row.embedding for row in reply.data])
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert [row.index for row in reply.data] == [0, 1, 2, 3] and reply.model == "tiny-bert"
    lengths = [len(bank.base.tokenizer(t).input_ids) for t in TEXTS]
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == sum(lengths)
    floats = client.embeddings.create(model="tiny-bert", input=TEXTS[0], encoding_format="float")
    torch.testing.assert_close(torch.tensor(floats.data[0].embedding), expected[0], atol=1e-5, rtol=0)
    assert torch.linalg.vector_norm(got, dim=1).sub(1).abs().max() < 1e-5


def test_a_task_s_embeddings_go_through_its_adapter(served) -> None:
    client, _, bank = served
    base = torch.tensor([r.embedding for r in client.embeddings.create(model="tiny-bert", input=TEXTS).data])
    for task in ("sent-lora", "sent-prompt"):
        reply = client.embeddings.create(model=task, input=TEXTS)
        got = torch.tensor([row.embedding for row in reply.data])
        batch = bank.base.tokenizer(TEXTS, padding=True, return_tensors="pt")
        with torch.no_grad():
            hidden = bank.hidden_states(
                batch["input_ids"], batch["attention_mask"], bank.task_ids(task, len(TEXTS))
            )
        mask = batch["attention_mask"].unsqueeze(-1).float()
        expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=1)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
        assert (got - base).abs().max() > 1e-3  # the adapter changed them


def test_concurrent_requests_of_tasks_and_base_each_get_their_own_rows(served) -> None:
    client, _, _ = served
    jobs = [
        (["tiny-bert", "sent-lora", "sent-prompt"][i % 3], [" ".join(WORDS[i : i + 3 + i % 4])])
        for i in range(12)
    ]
    alone = [client.embeddings.create(model=m, input=t).data[0].embedding for m, t in jobs]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda job: client.embeddings.create(model=job[0], input=job[1]), jobs))
    for reply, vector in zip(together, alone, strict=True):
        torch.testing.assert_close(
            torch.tensor(reply.data[0].embedding), torch.tensor(vector), atol=1e-5, rtol=0
        )


def test_the_base64_encoding_is_little_endian_float32(served) -> None:
    client, _, _ = served
    raw = client.with_raw_response.embeddings.create(
        model="tiny-bert", input="good", encoding_format="base64"
    )
    encoded = raw.http_response.json()["data"][0]["embedding"]
    decoded = struct.unpack(f"<{len(base64.b64decode(encoded)) // 4}f", base64.b64decode(encoded))
    floats = (
        client.embeddings.create(model="tiny-bert", input="good", encoding_format="float").data[0].embedding
    )
    assert len(decoded) == 32 and max(abs(a - b) for a, b in zip(decoded, floats, strict=True)) < 1e-7


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"model": "nope", "input": "x"}, "NotFoundError", ["unknown task 'nope'"]),
        ({"model": "tiny-bert", "input": [[1, 2, 3]]}, "BadRequestError", ["token-id arrays"]),
        ({"model": "tiny-bert", "input": []}, "BadRequestError", ["non-empty"]),
        (
            {"model": "tiny-bert", "input": "x", "dimensions": 8},
            "BadRequestError",
            ["dimensions 8", "embeds in 32"],
        ),
    ],  # fmt: skip
)
def test_bad_requests_are_one_line_4xx(served, kwargs, error, words) -> None:
    client, _, _ = served
    with pytest.raises(getattr(openai, error)) as caught:
        client.embeddings.create(**kwargs)
    message = caught.value.body["message"] if isinstance(caught.value.body, dict) else str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, message


def test_minilm_embeddings_equal_the_sentence_transformers_recipe() -> None:
    from multitune.models import resolve_source

    try:
        folder, _ = resolve_source("minilm")
    except Exception as error:  # noqa: BLE001 - the model package is optional here
        pytest.skip(f"minilm not available: {error}")
    engine = Engine(load_base("minilm", device="cpu"))
    texts = [
        "A man is eating food.",
        "The new movie is awesome",
        "a",
        "Two dogs run across a snowy field " * 5,
    ]
    ours = torch.tensor([vector for vector, _ in engine.embed_rows([(None, t) for t in texts])])
    expected = recipe(AutoModel.from_pretrained(folder).eval(), engine.base.tokenizer, texts)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
