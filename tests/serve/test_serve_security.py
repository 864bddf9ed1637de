"""Who may use the server and what it may read: API and admin keys (as vLLM checks them), the refusal to serve
admin to other machines without a key, /admin/load confined to the served folders and --allow-load-from,
limits on a body's bytes and a text's characters, texts a tokenizer cannot read, and the admin bodies'
documented fields. Over a real uvicorn on loopback with tests/fake_scheduler.py (and the real scheduler where
files are read)."""

from __future__ import annotations

import json
import os
import socket

import httpx
import pytest
from helpers.fake_scheduler import MAX_LENGTH, FakeScheduler
from test_server import assert_error, running

from multitune.cli import main as cli_main
from multitune.errors import ConfigError
from multitune.serve import cli as server_module
from multitune.serve.app import create_app
from multitune.serve.guard import digest, key_matches

API, ADMIN = "api-key-1", "admin-key-2"
PROTECTED = [
    ("GET", "/v1/models"),
    ("GET", "/v1/models/echo"),
    ("GET", "/metrics"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("GET", "/redoc"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/classify"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/nothing"),
]
BODIES = {
    "/v1/completions": {"model": "echo", "prompt": "a b"},
    "/v1/classify": {"model": "sentiment", "input": "a"},
    "/v1/chat/completions": {"model": "echo", "messages": [{"role": "user", "content": "a b"}]},
}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def call(http: httpx.Client, method: str, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return http.request(method, path, json=BODIES.get(path), headers=headers)


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """(a folder the server may load from, a folder it may not)."""
    return tmp_path_factory.mktemp("allowed"), tmp_path_factory.mktemp("elsewhere")


@pytest.fixture(scope="module")
def keyed(roots):
    """A server with an API key and its own admin key."""
    with (
        running(
            create_app(
                FakeScheduler(),
                api_key=API,
                admin_key=ADMIN,
                load_from=[roots[0]],
                max_input_chars=50,
                max_request_bytes=2000,
            )
        ) as base,
        httpx.Client(base_url=base, timeout=10) as http,
    ):
        yield http


# ---- keys -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "path"), PROTECTED, ids=[p for _, p in PROTECTED])
def test_the_api_key_guards_every_endpoint_but_health(keyed, method, path):
    assert_error(call(keyed, method, path), 401, "Authorization: Bearer KEY", "--api-key")
    for wrong in ("Bearer nope", f"Bearer  {API}", f"Bearer {API}x", API, f"Basic {API}", f"Bearer {ADMIN}"):
        assert call(keyed, method, path, {"Authorization": wrong}).status_code == 401, wrong
    reply = call(keyed, method, path, bearer(API))
    assert reply.status_code == (404 if path == "/v1/nothing" else 200), reply.text
    assert (
        call(keyed, method, path, {"Authorization": f"bearer {API}"}).status_code != 401
    )  # the scheme's case


def test_health_stays_open(keyed):
    assert keyed.get("/health").json()["status"] == "ok"


def test_admin_needs_the_admin_key_not_the_api_key(keyed, roots):
    body = {"model": "extra", "path": str(roots[0])}
    assert_error(keyed.post("/admin/load", json=body), 401, "admin key", "--admin-key")
    assert_error(keyed.post("/admin/load", json=body, headers=bearer(API)), 401)
    assert_error(keyed.post("/admin/load", json=body, headers={"Authorization": f"Bearer  {ADMIN}"}), 401)
    assert keyed.post("/admin/load", json=body, headers=bearer(ADMIN)).status_code == 200
    assert keyed.post("/admin/unload", json={"model": "extra"}, headers=bearer(ADMIN)).status_code == 200


def test_the_admin_key_defaults_to_the_api_key_and_alone_leaves_v1_open(roots):
    with running(create_app(FakeScheduler(), api_key=API, load_from=[roots[0]])) as base:
        body = {"model": "more", "path": str(roots[0])}
        assert httpx.post(f"{base}/admin/load", json=body).status_code == 401
        assert httpx.post(f"{base}/admin/load", json=body, headers=bearer(API)).status_code == 200
    with running(create_app(FakeScheduler(), admin_key=ADMIN, load_from=[roots[0]])) as base:
        assert httpx.get(f"{base}/v1/models").status_code == 200
        assert httpx.get(f"{base}/metrics").status_code == 200
        assert httpx.post(f"{base}/admin/unload", json={"model": "echo"}).status_code == 401


def test_the_key_is_the_header_exactly_as_sent():
    """HTTP servers drop a header's trailing whitespace before the app sees it; what reaches the check is
    compared as is, never stripped."""
    key = digest(API)

    def scope(value: bytes) -> dict:
        return {"headers": [(b"authorization", value)]}

    assert key_matches(scope(f"Bearer {API}".encode()), key)
    assert key_matches(scope(f"BEARER {API}".encode()), key)
    for value in (
        f"Bearer {API} ",
        f"Bearer  {API}",
        f" Bearer {API}",
        f"Bearer\t{API}",
        f"Bearer {API}\n",
        API,
    ):
        assert not key_matches(scope(value.encode()), key), value
    assert not key_matches({"headers": []}, key)


# ---- refusing to serve admin to the network -------------------------------------------------------------------
@pytest.fixture
def no_engine(monkeypatch, tmp_path):
    """serve() stops where it would load the engine; returns the folder to serve."""
    from multitune.serve.engine import Engine

    def stop(*args, **kwargs):
        raise ConfigError("stopped before loading")

    monkeypatch.setattr(Engine, "from_folder", staticmethod(stop))
    monkeypatch.delenv("MULTITUNE_API_KEY", raising=False)
    monkeypatch.delenv("MULTITUNE_ADMIN_KEY", raising=False)
    return tmp_path


def test_a_reachable_host_without_an_admin_key_is_refused(no_engine, capsys):
    with pytest.raises(ConfigError, match="--host 0.0.0.0 can be reached from other machines") as error:
        server_module.serve(no_engine, host="0.0.0.0", port=0)
    message = str(error.value)
    assert "--admin-key" in message and "--insecure-no-admin-key" in message and "\n" not in message
    # the CLI says it in one line and exits 2, and each way out it names works as printed
    assert cli_main(["serve", str(no_engine), "--host", "0.0.0.0", "--port", "0"]) == 2
    assert capsys.readouterr().err.startswith("error: --host 0.0.0.0 can be reached")
    for flags in (["--admin-key", "k"], ["--api-key", "k"], ["--insecure-no-admin-key"]):
        assert cli_main(["serve", str(no_engine), "--host", "0.0.0.0", "--port", "0", *flags]) == 2
        assert "stopped before loading" in capsys.readouterr().err, flags


def test_the_refusal_honours_the_environment_and_loopback(no_engine, monkeypatch, capsys):
    for host in ("127.0.0.1", "localhost"):
        with pytest.raises(ConfigError, match="stopped before loading"):
            server_module.serve(no_engine, host=host, port=0)
    monkeypatch.setenv("MULTITUNE_ADMIN_KEY", "from-env")
    with pytest.raises(ConfigError, match="stopped before loading"):
        server_module.serve(no_engine, host="0.0.0.0", port=0)
    monkeypatch.delenv("MULTITUNE_ADMIN_KEY")
    with pytest.raises(ConfigError, match="stopped before loading"):
        server_module.serve(no_engine, host="0.0.0.0", port=0, insecure_no_admin_key=True)
    assert "warning: no admin key" in capsys.readouterr().err


def test_serve_passes_keys_and_folders_to_the_app(no_engine, monkeypatch, tmp_path_factory):
    """The CLI's flags reach create_app: admin key, the served folders and --allow-load-from as load roots."""
    extra = tmp_path_factory.mktemp("extra")
    seen = {}

    class Reached(Exception):
        """create_app was called: the command got as far as building the app."""

    def app(*args, **kwargs):
        seen.update(kwargs)
        raise Reached

    from multitune.serve.engine import Engine

    class Loaded:
        tasks: dict = {}
        base = type("B", (), {"source": "tiny"})()

    monkeypatch.setattr(server_module, "create_app", app)
    monkeypatch.setattr(Engine, "from_folder", staticmethod(lambda *a, **k: Loaded()))
    monkeypatch.setattr(server_module, "_check_port", lambda *a: None)
    with pytest.raises(Reached):
        cli_main(
            [
                "serve",
                str(no_engine),
                "--admin-key",
                "a",
                "--allow-load-from",
                str(extra),
                "--max-input-chars",
                "9",
                "--max-request-bytes",
                "99",
            ]
        )
    assert seen["admin_key"] == "a" and seen["load_from"] == [str(no_engine), str(extra)]
    assert seen["max_input_chars"] == 9 and seen["max_request_bytes"] == 99
    with pytest.raises(ConfigError, match="--allow-load-from .* is not a folder"):
        server_module.serve(no_engine, allow_load_from=[str(extra / "missing")])


# ---- confinement -------------------------------------------------------------------------------------------
def test_admin_loads_only_from_the_allowed_folders(keyed, roots):
    allowed, elsewhere = roots
    (allowed / "task").mkdir(exist_ok=True)
    (allowed / "link").symlink_to(elsewhere, target_is_directory=True)
    auth = bearer(ADMIN)
    for path in (
        str(elsewhere),
        f"{allowed}/../{elsewhere.name}",
        str(allowed / "link"),
        "/",
        "relative/x",
        str(allowed) + "-sibling",
    ):
        message = assert_error(
            keyed.post("/admin/load", json={"model": "x", "path": path}, headers=auth),
            403,
            "outside the folders",
            "--allow-load-from",
        )
        assert path in message
        assert (
            keyed.post("/admin/load", json={"model": "x", "path": path}, headers=auth).json()["error"]["type"]
            == "permission_error"
        )
        assert_error(keyed.post("/admin/reload", json={"model": "echo", "path": path}, headers=auth), 403)
    assert (
        keyed.post(
            "/admin/load", json={"model": "inside", "path": str(allowed / "task")}, headers=auth
        ).status_code
        == 200
    )
    assert (
        keyed.post(
            "/admin/load",
            json={"model": "inside2", "path": f"{elsewhere}/../{allowed.name}/task"},
            headers=auth,
        ).status_code
        == 200
    )


def test_a_server_with_no_load_folders_loads_no_path(tmp_path):
    with running(create_app(FakeScheduler())) as base:
        assert_error(
            httpx.post(f"{base}/admin/load", json={"model": "x", "path": str(tmp_path)}), 403, "(none)"
        )
        assert httpx.post(f"{base}/admin/reload", json={"model": "echo"}).status_code == 200  # its own source


# ---- admin bodies --------------------------------------------------------------------------------------------
def test_admin_bodies_take_model_or_name_and_are_documented(keyed, roots):
    auth = bearer(ADMIN)
    (roots[0] / "named").mkdir(exist_ok=True)
    reply = keyed.post("/admin/load", json={"name": "by-name", "path": str(roots[0] / "named")}, headers=auth)
    assert reply.status_code == 200 and reply.json()["model"] == "by-name"
    assert keyed.post("/admin/reload", json={"model": "by-name"}, headers=auth).json()["version"] == 2
    assert keyed.post("/admin/unload", json={"model": "by-name"}, headers=auth).json()["unloaded"] is True
    assert_error(keyed.post("/admin/unload", json={}, headers=auth), 400, "model is required")
    schemas = keyed.get("/openapi.json", headers=bearer(API)).json()["components"]["schemas"]
    for name in ("LoadRequest", "UnloadRequest", "ReloadRequest"):
        schema = schemas[name]
        assert schema.get("description"), name
        assert "model" in schema["properties"] and schema["properties"]["model"].get("description"), name
    assert "run folder" in schemas["LoadRequest"]["properties"]["path"]["description"]


# ---- limits --------------------------------------------------------------------------------------------------
def test_a_text_over_max_input_chars_is_a_413_naming_the_field(keyed):
    auth = bearer(API)
    cases = [
        ("/v1/completions", {"model": "echo", "prompt": "w" * 51}, "prompt"),
        ("/v1/classify", {"model": "sentiment", "input": ["ok", "w" * 51]}, "input.1"),
        (
            "/v1/chat/completions",
            {"model": "echo", "messages": [{"role": "user", "content": "w" * 51}]},
            "messages.0.content",
        ),
        (
            "/v1/chat/completions",
            {
                "model": "echo",
                "messages": [{"role": "user", "content": [{"type": "text", "text": "w" * 51}]}],
            },
            "messages.0.content.0.text",
        ),
        ("/v1/completions", {"model": "echo", "prompt": "a", "stop": ["x" * 51]}, "stop.0"),
    ]
    for path, body, field in cases:
        assert_error(
            keyed.post(path, json=body, headers=auth),
            413,
            f"{field} holds 51 characters",
            "at most 50",
            "--max-input-chars",
        )
    assert (
        keyed.post("/v1/completions", json={"model": "echo", "prompt": "w" * 50}, headers=auth).status_code
        == 200
    )


def test_a_body_over_the_limit_is_a_413(keyed):
    auth = bearer(API)
    message = assert_error(
        keyed.post("/v1/classify", json={"model": "sentiment", "input": ["a b"] * 500}, headers=auth),
        413,
        "2000 bytes",
        "--max-request-bytes",
    )
    assert "body" in message
    assert (
        keyed.post(
            "/v1/classify", json={"model": "sentiment", "input": ["a b"] * 100}, headers=auth
        ).status_code
        == 200
    )


def _raw(url: str, request: bytes) -> bytes:
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(request)
        out = b""
        while b"\r\n\r\n" not in out or not out.rstrip().endswith(b"}"):
            chunk = raw.recv(65536)
            if not chunk:
                break
            out += chunk
    return out


def test_the_body_limit_holds_before_reading_and_for_a_streamed_body(keyed):
    url = str(keyed.base_url).rstrip("/")
    head = (
        b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
        + API.encode()
        + b"\r\nContent-Type: application/json\r\n"
    )
    # a Content-Length over the limit: refused before a byte of the body is sent
    reply = _raw(url, head + b"Content-Length: 50000000\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 413") and b"2000 bytes" in reply
    # no Content-Length: chunked, counted as it comes
    body = json.dumps({"model": "sentiment", "input": ["a b"] * 500}).encode()
    chunks = b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + 100]), body[i : i + 100]) for i in range(0, len(body), 100)
    )
    reply = _raw(url, head + b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 413") and b"max-request-bytes" in reply
    small = json.dumps({"model": "sentiment", "input": "good"}).encode()
    reply = _raw(url, head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(small), small))
    assert reply.startswith(b"HTTP/1.1 200") and b'"pos"' in reply


def test_classification_answers_say_which_inputs_were_truncated(keyed):
    long = " ".join(["good"] * 3 + ["bad"] * (MAX_LENGTH + 5))
    with running(create_app(FakeScheduler())) as base:
        data = httpx.post(f"{base}/v1/classify", json={"model": "sentiment", "input": ["good", long]}).json()[
            "data"
        ]
    assert [d["truncated"] for d in data] == [False, True]


# ---- texts a tokenizer cannot read ---------------------------------------------------------------------------
LONE = "\udc80"
SURROGATES = [
    ("/v1/classify", {"model": "sentiment", "input": ["fine", f"{LONE} x"]}, "input.1"),
    ("/v1/classify", {"model": "sentiment", "input": f"x{LONE}"}, "input"),
    ("/v1/completions", {"model": "echo", "prompt": f"a {LONE}"}, "prompt"),
    ("/v1/completions", {"model": "echo", "prompt": "a", "stop": [LONE]}, "stop.0"),
    (
        "/v1/chat/completions",
        {"model": "echo", "messages": [{"role": "user", "content": LONE}]},
        "messages.0.content",
    ),
    (
        "/v1/chat/completions",
        {"model": "echo", "messages": [{"role": LONE, "content": "a"}]},
        "messages.0.role",
    ),
    ("/v1/completions", {"model": f"echo{LONE}", "prompt": "a"}, "model"),
]


@pytest.mark.parametrize(("path", "body", "field"), SURROGATES, ids=[s[2] + s[0] for s in SURROGATES])
def test_a_lone_surrogate_is_a_400_naming_the_field(keyed, path, body, field):
    content = json.dumps(body).encode()  # ensure_ascii: "\udc80" travels as an escape, as a client sends it
    reply = keyed.post(path, content=content, headers={**bearer(API), "Content-Type": "application/json"})
    assert_error(reply, 400, f"{field} holds a lone surrogate (U+DC80)")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"seed": 2**70}, "seed"),
        ({"seed": -3}, "seed"),
        ({"temperature": 1e-300}, "temperature"),
        ({"temperature": 0.001}, "temperature"),
    ],
)
def test_seeds_and_temperatures_the_sampler_cannot_use_are_a_400(keyed, body, field):
    reply = keyed.post("/v1/completions", json={"model": "echo", "prompt": "a", **body}, headers=bearer(API))
    assert_error(reply, 400, field)


# ---- the real scheduler reading files ------------------------------------------------------------------------
def test_load_errors_never_quote_the_file(tmp_path, llama_dir):
    from helpers import perturb

    from multitune.bank import MultiTaskModel
    from multitune.methods.lora import LoRAConfig
    from multitune.models import load_base
    from multitune.serve.engine import Engine
    from multitune.serve.scheduler import Scheduler
    from multitune.storage import save_adapter

    bank = MultiTaskModel(load_base(str(llama_dir), device="cpu"))
    bank.add_task("gen", "generation", "lora", LoRAConfig(rank=2))
    perturb(bank, "gen", seed=0)
    served = tmp_path / "bank"
    save_adapter(bank, "gen", served / "gen")
    run = tmp_path / "runs" / "later"
    save_adapter(bank, "gen", run / "adapter")
    secret = "SECRET-1234"
    (served / "bad-format").mkdir()
    (served / "bad-format" / "adapter.json").write_text(json.dumps({"format": secret, "task": secret}))
    (served / "bad-bytes").mkdir()
    (served / "bad-bytes" / "adapter.json").write_bytes(b'{"format": "\xff' + secret.encode() + b'"}')
    (served / "bad-config").mkdir()
    meta = json.loads((served / "gen" / "adapter.json").read_text())
    meta["task"]["config"] = {"rank": 2, "bogus": secret}
    (served / "bad-config" / "adapter.json").write_text(json.dumps(meta))
    os.link(served / "gen" / "adapter.safetensors", served / "bad-config" / "adapter.safetensors")

    engine = Engine.from_folder(served / "gen", device="cpu")
    scheduler = Scheduler(engine)
    with running(create_app(scheduler, load_from=[served, tmp_path / "runs"])) as base:
        for name in ("bad-format", "bad-bytes", "bad-config"):
            reply = httpx.post(
                f"{base}/admin/load", json={"model": name, "path": str(served / name)}, timeout=30
            )
            assert reply.status_code in (400, 500), reply.text
            assert secret not in reply.text and "\\xff" not in reply.text, reply.text
        # a run folder loads as the CLI's serve takes it
        reply = httpx.post(f"{base}/admin/load", json={"model": "later", "path": str(run)}, timeout=30)
        assert reply.status_code == 200, reply.text
        reply = httpx.post(
            f"{base}/v1/completions", json={"model": "later", "prompt": "a film", "max_tokens": 3}, timeout=30
        )
        assert reply.status_code == 200
