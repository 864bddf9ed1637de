"""The HTTP server over a real uvicorn on loopback: OpenAI shapes, streaming, errors, back-pressure,
cancellation on disconnect, admin and metrics (with tests/fake_scheduler.py), and one end-to-end test with the
real scheduler and a tiny Llama (greedy answers over HTTP equal the in-process engine's)."""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from helpers.fake_scheduler import CONTEXT, FakeScheduler
from prometheus_client.parser import text_string_to_metric_families

from multitune.errors import ConfigError
from multitune.serve import cli as server_module
from multitune.serve.app import create_app

KEY = "sekret-key"


@contextmanager
def running(app) -> Iterator[str]:
    """``app`` on a real uvicorn in a background thread, on a free loopback port; yields its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()


@contextmanager
def openai_client(bank: Path, timeout: float = 60, **options: Any) -> Iterator[tuple[Any, Any]]:
    """The official openai client against the real scheduler over the tasks under ``bank``, on a real uvicorn
    on loopback; yields (client, scheduler). ``options`` go to the Scheduler."""
    import openai

    from multitune.serve.engine import Engine
    from multitune.serve.scheduler import Scheduler

    scheduler = Scheduler(Engine.from_folder(bank, device="cpu"), **options)
    scheduler.start()
    try:
        with running(create_app(scheduler, model_name="tiny-llama")) as url:
            yield (
                openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=timeout),
                scheduler,
            )
    finally:
        scheduler.stop()


def wait_for(condition: Callable[[], bool], seconds: float = 1.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


@pytest.fixture(scope="module")
def fake():
    return FakeScheduler(queue_size=64)


@pytest.fixture(scope="module")
def loadable(tmp_path_factory):
    """The one folder the module's server may load from."""
    return tmp_path_factory.mktemp("loadable")


@pytest.fixture(scope="module")
def url(fake, loadable):
    with running(create_app(fake, admin_key=KEY, model_name="tiny-base", load_from=[loadable])) as base:
        yield base


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=10) as client:
        yield client


@pytest.fixture(autouse=True)
def reset(fake):
    """Every test starts from the fake's defaults, whatever the previous test turned."""
    yield
    fake.release()
    fake.delay, fake.queue_size, fake.timeout_s, fake.fail_next = 0.0, 64, 60.0, None


def sse(lines: Iterator[str]) -> list[str]:
    """The data payloads of a server-sent event stream, in order."""
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]


def assert_error(reply: httpx.Response, status: int, *words: str) -> str:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["code"] == status and isinstance(error["type"], str)
    message = error["message"]
    assert "\n" not in message and len(message) < 400
    for word in words:
        assert word in message, message
    return message


def samples(http: httpx.Client) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as (name, sorted labels) -> value."""
    reply = http.get("/metrics")
    assert reply.status_code == 200
    out = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


# ---- completions ---------------------------------------------------------------------------------------------
def test_completion(http):
    reply = http.post("/v1/completions", json={"model": "echo", "prompt": "one two three", "temperature": 0})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "text_completion" and body["model"] == "echo" and body["id"].startswith("cmpl-")
    assert isinstance(body["created"], int)
    assert body["choices"] == [
        {"index": 0, "text": "three two one", "logprobs": None, "finish_reason": "stop"}
    ]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_completion_honours_max_tokens_stop_and_a_list_prompt(http):
    reply = http.post("/v1/completions", json={"model": "echo", "prompt": ["a b c d"], "max_tokens": 2})
    choice = reply.json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == ("d c", "length")
    reply = http.post(
        "/v1/completions", json={"model": "echo", "prompt": "one two three four", "stop": "two"}
    )
    choice = reply.json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == ("four three ", "stop")
    reply = http.post(
        "/v1/completions",
        json={
            "model": "echo",
            "prompt": "x y z",
            "stop": ["q", "y"],
            "seed": 3,
            "top_p": 0.5,
            "temperature": 0.7,
            "user": "ignored",
        },
    )
    assert reply.json()["choices"][0]["text"] == "z "


def test_streaming_completion(http, fake):
    fake.delay = 0.005
    words = [f"w{i}" for i in range(12)]
    with http.stream(
        "POST", "/v1/completions", json={"model": "echo", "prompt": " ".join(words), "stream": True}
    ) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        payloads = sse(reply.iter_lines())
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "text_completion" and c["model"] == "echo" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == " ".join(reversed(words))
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert len(chunks) >= len(words)  # one piece per word: really streamed, not one blob


def test_streaming_usage_chunk(http):
    with http.stream(
        "POST",
        "/v1/completions",
        json={"model": "echo", "prompt": "a b", "stream": True, "stream_options": {"include_usage": True}},
    ) as reply:
        payloads = sse(reply.iter_lines())
    usage = json.loads(payloads[-2])
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 2,
        "total_tokens": 4,
    }


# ---- chat --------------------------------------------------------------------------------------------------
def test_chat(http):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "red green blue"}]
    reply = http.post("/v1/chat/completions", json={"model": "echo", "messages": messages, "max_tokens": 10})
    body = reply.json()
    assert (
        reply.status_code == 200
        and body["object"] == "chat.completion"
        and body["id"].startswith("chatcmpl-")
    )
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "blue green red"}
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"]["completion_tokens"] == 3
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "left "}, {"type": "text", "text": "right"}]}
    ]
    reply = http.post(
        "/v1/chat/completions", json={"model": "echo", "messages": parts, "max_completion_tokens": 1}
    )
    assert reply.json()["choices"][0]["message"]["content"] == "right"


def test_streaming_chat(http):
    with http.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "model": "echo",
            "messages": [{"role": "user", "content": "up down left right"}],
            "stream": True,
        },
    ) as reply:
        payloads = sse(reply.iter_lines())
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "right left down up"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


# ---- classification, models, health ------------------------------------------------------------------------
def test_classify(http):
    reply = http.post("/v1/classify", json={"model": "sentiment", "input": "a great film"})
    body = reply.json()
    assert reply.status_code == 200 and body["object"] == "classification" and body["model"] == "sentiment"
    assert body["data"][0]["label"] == "pos" and body["data"][0]["index"] == 0
    texts = ["awful food", "good and nice", "bad sad place"]
    data = http.post("/v1/classify", json={"model": "sentiment", "input": texts}).json()["data"]
    assert [d["index"] for d in data] == [0, 1, 2]
    assert [d["label"] for d in data] == ["neg", "pos", "neg"]
    for d in data:
        assert set(d["probabilities"]) == {"neg", "pos"}
        assert abs(sum(d["probabilities"].values()) - 1) < 1e-6


def test_models_and_health(http):
    body = http.get("/v1/models").json()
    assert body["object"] == "list"
    cards = {m["id"]: m for m in body["data"]}
    assert cards["sentiment"]["kind"] == "classification" and cards["sentiment"]["labels"] == ["neg", "pos"]
    assert cards["echo"] | {"created": 0} == {
        "id": "echo",
        "object": "model",
        "created": 0,
        "owned_by": "multitune",
        "kind": "generation",
        "method": "prompt",
        "labels": [],
        "version": 1,
        "task_version": None,  # the fake's tasks come from no folder
        "base": "tiny-base",
    }
    assert http.get("/v1/models/echo").json()["id"] == "echo"
    assert_error(http.get("/v1/models/nope"), 404, "unknown task 'nope'")
    assert http.get("/health").json() == {"status": "ok", "tasks": 2, "model": "tiny-base"}


def test_metrics(http, fake):
    before = samples(http)
    for _ in range(3):
        assert http.post("/v1/completions", json={"model": "echo", "prompt": "a b c d"}).status_code == 200
    assert http.post("/v1/classify", json={"model": "sentiment", "input": ["good", "bad"]}).status_code == 200
    assert http.post("/v1/completions", json={"model": "nope", "prompt": "a"}).status_code == 404
    reply = http.get("/metrics")
    assert reply.headers["content-type"].startswith("text/plain")
    after = samples(http)

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert moved("multitune_requests_total", endpoint="/v1/completions", task="echo", status="200") == 3
    assert moved("multitune_requests_total", endpoint="/v1/classify", task="sentiment", status="200") == 1
    assert moved("multitune_requests_total", endpoint="/v1/completions", task="unknown", status="404") == 1
    assert moved("multitune_generated_tokens_total", task="echo") == 12
    assert moved("multitune_request_seconds_count", endpoint="/v1/completions") == 4
    assert moved("multitune_batch_size_count", kind="decode") == 12  # one piece per word
    assert moved("multitune_batch_size_count", kind="classify") == 1
    assert moved("multitune_batch_size_sum", kind="classify") == 2
    assert ("multitune_queue_depth", ()) in after and ("multitune_tasks", ()) in after
    assert len(fake.stats.batch_sizes) == 0  # drained into the histogram


# ---- admin -------------------------------------------------------------------------------------------------
def test_admin_requires_the_key(http, tmp_path):
    body = {"name": "extra", "path": str(tmp_path)}
    assert_error(http.post("/admin/load", json=body), 401, "Authorization: Bearer")
    assert_error(http.post("/admin/load", json=body, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(http.post("/admin/unload", json={"name": "echo"}, headers={"Authorization": KEY}), 401)
    assert_error(http.post("/admin/reload", content=b"{oops", headers={"Authorization": "Basic x"}), 401)
    assert "extra" not in {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert http.post("/v1/completions", json={"model": "echo", "prompt": "still here"}).status_code == 200


def test_admin_load_reload_unload(http, fake, loadable):
    tmp_path = loadable / "load-reload-unload"
    tmp_path.mkdir()
    auth = {"Authorization": f"Bearer {KEY}"}
    reply = http.post("/admin/load", json={"name": "extra", "path": str(tmp_path)}, headers=auth)
    assert reply.status_code == 200 and reply.json()["version"] == 1 and reply.json()["kind"] == "generation"
    assert "extra" in {m["id"] for m in http.get("/v1/models").json()["data"]}
    assert (
        http.post("/v1/completions", json={"model": "extra", "prompt": "p q"}).json()["choices"][0]["text"]
        == "q p"
    )
    assert_error(
        http.post("/admin/load", json={"name": "extra", "path": str(tmp_path)}, headers=auth),
        409,
        "already served",
    )
    assert_error(
        http.post("/admin/load", json={"name": "x2", "path": str(tmp_path / "no")}, headers=auth), 400
    )
    assert_error(http.post("/admin/load", json={"name": "x3"}, headers=auth), 400, "path is required")
    assert http.post("/admin/reload", json={"name": "extra"}, headers=auth).json()["version"] == 2
    assert http.get("/v1/models/extra").json()["version"] == 2
    reply = http.post("/admin/unload", json={"name": "extra"}, headers=auth)
    assert reply.status_code == 200 and reply.json()["unloaded"] is True
    assert_error(
        http.post("/v1/completions", json={"model": "extra", "prompt": "p"}), 404, "unknown task 'extra'"
    )
    assert_error(http.post("/admin/unload", json={"name": "extra"}, headers=auth), 404)
    assert_error(http.post("/admin/reload", json={"name": "extra"}, headers=auth), 404)


def test_reload_lets_requests_in_flight_finish(http, fake, url, loadable):
    """A generation admitted before a reload finishes (on the version it was admitted under); none is dropped."""
    fake.delay = 0.02
    auth = {"Authorization": f"Bearer {KEY}"}
    words = " ".join(f"w{i}" for i in range(15))
    with httpx.Client(base_url=url, timeout=10) as other, ThreadPoolExecutor(1) as pool:
        running_request = pool.submit(other.post, "/v1/completions", json={"model": "echo", "prompt": words})
        assert wait_for(lambda: any(h.prompt == words for h in fake.handles))
        assert (
            http.post("/admin/reload", json={"name": "echo", "path": str(loadable)}, headers=auth).json()[
                "version"
            ]
            == 2
        )
        reply = running_request.result(timeout=10)
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == " ".join(
        reversed(words.split())
    )
    assert http.post("/v1/completions", json={"model": "echo", "prompt": "after"}).status_code == 200
    versions = {h.prompt: h.version for h in fake.handles}
    assert versions[words] == 1 and versions["after"] == 2


def test_admin_is_open_without_a_key(tmp_path):
    fake = FakeScheduler()
    with running(create_app(fake, load_from=[tmp_path])) as base:
        reply = httpx.post(f"{base}/admin/load", json={"name": "more", "path": str(tmp_path)})
        assert reply.status_code == 200 and "more" in fake.tasks()
        assert fake.started
    assert fake.stopped  # the lifespan stopped the scheduler with the server


# ---- bad input ---------------------------------------------------------------------------------------------
BAD = [
    ("malformed JSON", "/v1/completions", b'{"model": "echo", "prompt": ', 400, ["malformed JSON"]),
    ("not an object", "/v1/completions", [1, 2], 400, ["JSON object"]),
    (
        "wrong type",
        "/v1/completions",
        {"model": "echo", "prompt": "a", "max_tokens": "lots"},
        400,
        ["max_tokens"],
    ),
    (
        "wrong type in a union",
        "/v1/completions",
        {"model": "echo", "prompt": "a", "stop": [1]},
        400,
        ["stop"],
    ),
    (
        "temperature not a number",
        "/v1/chat/completions",
        {"model": "echo", "messages": [{"role": "user", "content": "a"}], "temperature": "hot"},
        400,
        ["temperature"],
    ),
    ("missing model", "/v1/completions", {"prompt": "a"}, 400, ["model is required"]),
    ("missing prompt", "/v1/completions", {"model": "echo"}, 400, ["prompt is required"]),
    (
        "unknown task",
        "/v1/completions",
        {"model": "nope", "prompt": "a"},
        404,
        ["unknown task 'nope'", "echo"],
    ),
    (
        "unknown task, chat",
        "/v1/chat/completions",
        {"model": "nope", "messages": [{"role": "user", "content": "a"}]},
        404,
        ["unknown task"],
    ),
    ("n=0", "/v1/completions", {"model": "echo", "prompt": "a", "n": 0}, 400, ["n must be an integer >= 1"]),
    (
        "logprobs above the maximum",
        "/v1/completions",
        {"model": "echo", "prompt": "a", "logprobs": 21},
        400,
        ["logprobs asks for 21", "0 to 20"],
    ),
    (
        "top_logprobs without logprobs",
        "/v1/chat/completions",
        {"model": "echo", "messages": [{"role": "user", "content": "a"}], "top_logprobs": 3},
        400,
        ["top_logprobs needs logprobs: true"],
    ),
    (
        "temperature -1",
        "/v1/completions",
        {"model": "echo", "prompt": "a", "temperature": -1},
        400,
        ["temperature"],
    ),
    ("top_p 0", "/v1/completions", {"model": "echo", "prompt": "a", "top_p": 0}, 400, ["top_p"]),
    (
        "max_tokens 0",
        "/v1/completions",
        {"model": "echo", "prompt": "a", "max_tokens": 0},
        400,
        ["max_tokens"],
    ),
    (
        "prompt too long",
        "/v1/completions",
        {"model": "echo", "prompt": "w " * (CONTEXT + 1)},
        400,
        ["context"],
    ),
    ("two prompts", "/v1/completions", {"model": "echo", "prompt": ["a", "b"]}, 400, ["one string"]),
    ("empty prompt", "/v1/completions", {"model": "echo", "prompt": ""}, 400, ["prompt"]),
    (
        "echo with logprobs",
        "/v1/completions",
        {"model": "echo", "prompt": "a", "echo": True, "logprobs": 1},
        400,
        ["echo is served without logprobs"],
    ),
    (
        "no user message",
        "/v1/chat/completions",
        {"model": "echo", "messages": [{"role": "system", "content": "x"}]},
        400,
        ["user"],
    ),
    ("no messages", "/v1/chat/completions", {"model": "echo", "messages": []}, 400, ["messages"]),
    (
        "classify on a generation task",
        "/v1/classify",
        {"model": "echo", "input": "a"},
        400,
        ["generation task"],
    ),
    (
        "generate on a classification task",
        "/v1/completions",
        {"model": "sentiment", "prompt": "a"},
        400,
        ["classification task"],
    ),
    ("classify empty list", "/v1/classify", {"model": "sentiment", "input": []}, 400, ["input"]),
    ("classify wrong type", "/v1/classify", {"model": "sentiment", "input": 5}, 400, ["input"]),
    (
        "stream not a bool",
        "/v1/completions",
        {"model": "echo", "prompt": "a", "stream": "maybe"},
        400,
        ["stream"],
    ),
]


@pytest.mark.parametrize(("path", "body", "status", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_a_clear_4xx(http, path, body, status, words):
    if isinstance(body, bytes):
        reply = http.post(path, content=body, headers={"Content-Type": "application/json"})
    else:
        reply = http.post(path, json=body)
    message = assert_error(reply, status, *words)
    if status == 400:
        assert reply.json()["error"]["type"] == "invalid_request_error"
    assert "Traceback" not in message


def test_body_that_is_not_json_and_unknown_routes(http):
    assert_error(
        http.post(
            "/v1/completions",
            content=b"model=echo",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        ),
        400,
        "JSON object",
    )
    assert_error(http.get("/v1/nothing"), 404, "/v1/nothing")
    assert_error(http.get("/v1/completions"), 405, "GET")


def test_an_unexpected_failure_is_a_500_and_the_server_goes_on(http, fake):
    fake.fail_next = RuntimeError("the fake broke")
    assert_error(http.post("/v1/completions", json={"model": "echo", "prompt": "a"}), 500, "the fake broke")
    fake.fail_next = ZeroDivisionError("boom")
    assert_error(
        http.post("/v1/classify", json={"model": "sentiment", "input": "a"}), 500, "ZeroDivisionError"
    )
    assert (
        http.post("/v1/completions", json={"model": "echo", "prompt": "a b"}).json()["choices"][0]["text"]
        == "b a"
    )


# ---- back-pressure, timeouts, cancellation -----------------------------------------------------------------
def test_full_queue_answers_429(http, fake, url):
    fake.queue_size = 3
    fake.hold()
    with ThreadPoolExecutor(3) as pool, httpx.Client(base_url=url, timeout=10) as other:
        waiting = [
            pool.submit(other.post, "/v1/completions", json={"model": "echo", "prompt": f"x{i} y"})
            for i in range(3)
        ]
        assert wait_for(lambda: fake.pending == 3, 5)
        reply = http.post("/v1/completions", json={"model": "echo", "prompt": "one too many"})
        assert_error(reply, 429, "queue is full")
        assert reply.headers["retry-after"] == "1"
        assert_error(http.post("/v1/classify", json={"model": "sentiment", "input": "a"}), 429)
        fake.release()
        replies = [w.result(timeout=10) for w in waiting]
    assert [r.json()["choices"][0]["text"] for r in replies] == [f"y x{i}" for i in range(3)]


def test_timeout_is_a_504(http, fake):
    fake.delay, fake.timeout_s = 0.05, 0.2
    prompt = " ".join(f"t{i}" for i in range(30))
    assert_error(http.post("/v1/completions", json={"model": "echo", "prompt": prompt}), 504, "longer than")
    with http.stream(
        "POST", "/v1/completions", json={"model": "echo", "prompt": prompt, "stream": True}
    ) as reply:
        payloads = sse(reply.iter_lines())
    assert payloads[-1] == "[DONE]"
    assert json.loads(payloads[-2])["error"]["code"] == 504
    assert 0 < len(payloads) - 2 < 30  # a few pieces came before the deadline


def test_client_disconnect_mid_stream_cancels(fake, url):
    fake.delay = 0.05
    prompt = " ".join(f"gone{i}" for i in range(40))
    body = {"model": "echo", "prompt": prompt, "stream": True}
    with (
        httpx.Client(base_url=url, timeout=10) as client,
        client.stream("POST", "/v1/completions", json=body) as reply,
    ):
        first = next(line for line in reply.iter_lines() if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["text"] == "gone39"
    # leaving the block closed the connection with the stream far from done
    assert wait_for(lambda: prompt in fake.cancelled, 1.0), (
        "the server did not cancel the abandoned generation"
    )
    handle = next(h for h in fake.handles if h.prompt == prompt)
    assert (
        wait_for(lambda: handle.done)
        and handle.finish_reason == "cancelled"
        and handle.completion_tokens < 40
    )


def test_client_disconnect_before_the_answer_cancels(fake, url):
    fake.hold()
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"model": "echo", "prompt": "never read"}).encode()
    with socket.create_connection(("127.0.0.1", port)) as raw:
        raw.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        assert wait_for(lambda: any(h.prompt == "never read" for h in fake.handles), 2)
    assert wait_for(lambda: "never read" in fake.cancelled, 1.0), (
        "the server did not cancel the abandoned request"
    )


def test_sixteen_concurrent_clients_mixing_tasks(fake, url):
    fake.delay = 0.002

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=20) as http:
            for j in range(4):
                words = [f"c{i}", f"r{j}", "x", "y"][: 2 + (i + j) % 3]
                kind = (i + j) % 4
                if kind == 0:
                    reply = http.post("/v1/completions", json={"model": "echo", "prompt": " ".join(words)})
                    assert reply.json()["choices"][0]["text"] == " ".join(reversed(words))
                elif kind == 1:
                    reply = http.post(
                        "/v1/chat/completions",
                        json={"model": "echo", "messages": [{"role": "user", "content": " ".join(words)}]},
                    )
                    assert reply.json()["choices"][0]["message"]["content"] == " ".join(reversed(words))
                elif kind == 2:
                    label = "pos" if i % 2 else "neg"
                    text = f"{'good' if i % 2 else 'bad'} {' '.join(words)}"
                    reply = http.post("/v1/classify", json={"model": "sentiment", "input": [text, text]})
                    assert [d["label"] for d in reply.json()["data"]] == [label, label]
                else:
                    with http.stream(
                        "POST",
                        "/v1/completions",
                        json={"model": "echo", "prompt": " ".join(words), "stream": True},
                    ) as reply:
                        payloads = sse(reply.iter_lines())
                    assert payloads[-1] == "[DONE]"
                    text = "".join(json.loads(p)["choices"][0]["text"] for p in payloads[:-1])
                    assert text == " ".join(reversed(words))

    with ThreadPoolExecutor(16) as pool:
        for future in [pool.submit(client, i) for i in range(16)]:
            future.result(timeout=30)


# ---- the command -------------------------------------------------------------------------------------------
def test_serve_arguments_and_early_errors(tmp_path, monkeypatch):
    parser = argparse.ArgumentParser()
    server_module.add_serve_arguments(parser)
    args = parser.parse_args(
        [
            str(tmp_path),
            str(tmp_path / "b"),
            "--port",
            "9123",
            "--max-batch-size",
            "8",
            "--timeout",
            "5",
            "--threads",
            "2",
        ]
    )
    seen = {}
    monkeypatch.setattr(server_module, "serve", lambda paths, **kwargs: seen.update(paths=paths, **kwargs))
    server_module.cmd_serve(args)
    assert (
        seen["paths"] == [str(tmp_path), str(tmp_path / "b")]
        and seen["port"] == 9123
        and seen["max_batch_size"] == 8
    )
    assert seen["timeout_s"] == 5 and seen["host"] == "127.0.0.1" and seen["api_key"] is None
    assert seen["threads"] == 2
    monkeypatch.undo()
    with pytest.raises(ConfigError, match="--threads must be >= 1"):
        server_module.serve(tmp_path, threads=0)
    with pytest.raises(ConfigError, match="is not a folder"):
        server_module.serve(tmp_path / "missing")
    with pytest.raises(ConfigError, match="--queue-size"):
        server_module.serve(tmp_path, queue_size=0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ConfigError, match="cannot listen"):
            server_module.serve(tmp_path, port=taken.getsockname()[1])


def test_serve_loads_the_engine_in_a_thread_that_has_ended(tmp_path, monkeypatch):
    """The scheduler's worker must be the only thread with an OpenMP pool (see in_passing_thread)."""
    from multitune.serve.engine import Engine

    seen = []

    def load(*args, **kwargs):
        seen.append(threading.current_thread())
        raise ConfigError("stop here")

    monkeypatch.setattr(Engine, "from_folder", staticmethod(load))
    with pytest.raises(ConfigError, match="stop here"):
        server_module.serve(tmp_path, port=0)
    assert seen and seen[0] is not threading.main_thread() and not seen[0].is_alive()


def test_the_server_still_answers_after_everything(http):
    assert http.get("/health").json()["status"] == "ok"
    reply = http.post("/v1/completions", json={"model": "echo", "prompt": "the end"})
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == "end the"


# ---- with the real scheduler and a tiny model --------------------------------------------------------------
def _real_scheduler():
    try:
        from multitune.serve.scheduler import Scheduler
    except ImportError:
        return None
    return Scheduler


@pytest.mark.skipif(_real_scheduler() is None, reason="scheduler not written yet")
def test_real_scheduler_greedy_answers_equal_the_engine(tmp_path):
    from helpers import WORDS, perturb, save_tiny

    from multitune.bank import MultiTaskModel
    from multitune.methods.lora import LoRAConfig
    from multitune.methods.prompt import PromptConfig
    from multitune.models import load_base
    from multitune.serve.engine import Engine
    from multitune.storage import save_adapter

    folder = save_tiny("llama", tmp_path / "llama")
    bank_dir = tmp_path / "bank"
    bank = MultiTaskModel(load_base(str(folder), device="cpu"))
    bank.add_task("lora", "generation", "lora", LoRAConfig(rank=4))
    bank.add_task("prompt", "generation", "prompt", PromptConfig(num_virtual_tokens=4, init="random"))
    for seed, task in enumerate(["lora", "prompt"]):
        perturb(bank, task, seed=seed)
        save_adapter(bank, task, bank_dir / task)

    engine = Engine.from_folder(bank_dir, device="cpu")
    jobs = [
        (
            ["lora", "prompt"][i % 2],
            " ".join(WORDS[(3 * i + k) % len(WORDS)] for k in range(2 + i % 4)),
            4 + i % 3,
        )
        for i in range(8)
    ]
    expected = [engine.generate([(task, prompt)], max_new_tokens=n)[0] for task, prompt, n in jobs]

    scheduler = _real_scheduler()(engine, max_batch_size=8, max_wait_ms=5)
    with (
        running(create_app(scheduler, model_name="tiny-llama")) as base,
        httpx.Client(base_url=base, timeout=60) as http,
    ):
        tasks = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        assert {tasks["lora"]["method"], tasks["prompt"]["method"]} == {"lora", "prompt"}

        def ask(job):
            task, prompt, n = job
            return http.post(
                "/v1/completions", json={"model": task, "prompt": prompt, "max_tokens": n, "temperature": 0}
            )

        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(ask, jobs))
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        texts = [r.json()["choices"][0]["text"] for r in replies]
        assert [t.strip() for t in texts] == expected and any(expected)
        for reply, (_, _, n) in zip(replies, jobs, strict=True):
            assert reply.json()["usage"]["completion_tokens"] <= n
        # streaming through the real Handle: the pieces make the same text
        task, prompt, n = jobs[1]
        with http.stream(
            "POST", "/v1/completions", json={"model": task, "prompt": prompt, "max_tokens": n, "stream": True}
        ) as reply:
            payloads = sse(reply.iter_lines())
        assert payloads[-1] == "[DONE]"
        streamed = "".join(json.loads(p)["choices"][0]["text"] for p in payloads[:-1])
        assert streamed.strip() == expected[1]
        metrics = samples(http)
        decode = (("kind", "decode"),)
        alone = metrics[("multitune_batch_size_bucket", (("kind", "decode"), ("le", "1.0")))]
        assert (
            metrics[("multitune_batch_size_count", decode)] > alone
        )  # some decode steps served several rows


@pytest.mark.skipif(_real_scheduler() is None, reason="scheduler not written yet")
def test_real_scheduler_mixed_methods_and_hot_reload_under_load(tmp_path):
    """Classification and generation tasks of four methods served together: answers equal the in-process
    engine's, and reloads during a steady load of requests lose none of them."""
    from helpers import WORDS, perturb, save_tiny

    from multitune.bank import MultiTaskModel
    from multitune.methods.ia3 import IA3Config
    from multitune.methods.lora import LoRAConfig
    from multitune.methods.prefix import PrefixConfig
    from multitune.models import load_base
    from multitune.serve.engine import Engine
    from multitune.storage import save_adapter

    folder = save_tiny("llama", tmp_path / "llama")
    bank_dir, spare = tmp_path / "bank", tmp_path / "spare"
    bank = MultiTaskModel(load_base(str(folder), device="cpu"))
    bank.add_task("sent-lora", "classification", "lora", LoRAConfig(rank=4), ["neg", "pos"])
    bank.add_task("sent-ia3", "classification", "ia3", IA3Config(), ["neg", "pos"])
    bank.add_task("gen-prefix", "generation", "prefix", PrefixConfig(num_virtual_tokens=3, projection=False))
    bank.add_task("gen-adapter", "generation", "adapter", None)
    for seed, task in enumerate(list(bank.tasks)):
        perturb(bank, task, seed=seed)
        save_adapter(bank, task, bank_dir / task)
    perturb(bank, "gen-adapter", seed=99)
    save_adapter(bank, "gen-adapter", spare)  # a second version of gen-adapter

    engine = Engine.from_folder(bank_dir, device="cpu")
    texts = [" ".join(WORDS[(5 * i + k) % len(WORDS)] for k in range(3 + i % 3)) for i in range(6)]
    expected = {task: engine.classify([(task, t) for t in texts]) for task in ("sent-lora", "sent-ia3")}
    versions = {"v1": engine.generate([("gen-adapter", "the film")], max_new_tokens=5)[0]}
    reference = Engine.from_folder(bank_dir, device="cpu")
    reference.remove("gen-adapter")
    reference.load(spare, "gen-adapter")
    versions["v2"] = reference.generate([("gen-adapter", "the film")], max_new_tokens=5)[0]
    assert versions["v1"] != versions["v2"]

    scheduler = _real_scheduler()(engine, max_batch_size=16, max_wait_ms=5)
    with (
        running(create_app(scheduler, admin_key=KEY, load_from=[bank_dir, spare])) as base,
        httpx.Client(base_url=base, timeout=60) as http,
    ):
        for task, probs in expected.items():
            reply = http.post("/v1/classify", json={"model": task, "input": texts})
            assert reply.status_code == 200
            for row, want in zip(reply.json()["data"], probs, strict=True):
                assert row["probabilities"] == pytest.approx(want, abs=1e-5)

        stop = threading.Event()
        answers: list[tuple[int, str]] = []

        def client(i: int) -> None:
            with httpx.Client(base_url=base, timeout=60) as own:
                while not stop.is_set():
                    if i % 2:
                        r = own.post("/v1/classify", json={"model": "sent-ia3", "input": texts[i % 6]})
                        answers.append((r.status_code, ""))
                    else:
                        r = own.post(
                            "/v1/completions",
                            json={"model": "gen-adapter", "prompt": "the film", "max_tokens": 5},
                        )
                        answers.append(
                            (
                                r.status_code,
                                r.json()["choices"][0]["text"].strip() if r.status_code == 200 else r.text,
                            )
                        )

        threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        headers = {"Authorization": f"Bearer {KEY}"}
        for path in (spare, bank_dir / "gen-adapter", spare):
            assert (
                http.post(
                    "/admin/reload", json={"name": "gen-adapter", "path": str(path)}, headers=headers
                ).status_code
                == 200
            )
            time.sleep(0.3)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert len(answers) > 20
        assert all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200][:3]
        generated = {text for status, text in answers if text}
        assert generated <= {versions["v1"], versions["v2"]} and versions["v2"] in generated
        assert http.get("/v1/models/gen-adapter").json()["version"] == 4
