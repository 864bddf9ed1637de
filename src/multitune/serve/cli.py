"""``multitune serve PATH...``: start the HTTP server over every task found under the paths.

Checks every setting before the model loads (a port in use, a missing folder, a reachable address without an
admin key: one line each), loads the engine in a thread that ends (:func:`~multitune.serve.scheduler.in_passing_thread`),
and runs the app of :mod:`multitune.serve.app` under uvicorn.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from multitune.cli_commands import Command, add_quantize_argument
from multitune.errors import ConfigError
from multitune.health.store import FeedbackStore, Retention
from multitune.serve.app import create_app
from multitune.serve.decode import PREFILL_CHUNK
from multitune.serve.follow import DEFAULT_INTERVAL_S
from multitune.serve.guard import MAX_INPUT_CHARS, MAX_REQUEST_BYTES

API_KEY_ENV = "MULTITUNE_API_KEY"
ADMIN_KEY_ENV = "MULTITUNE_ADMIN_KEY"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port(host: str, port: int) -> None:
    """Fail before loading the model when the address cannot be listened on."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ConfigError(
                f"cannot listen on {host}:{port} ({error.strerror or error}); pick another --port or --host"
            ) from error


def _check_limits(
    max_batch_size: int,
    queue_size: int,
    max_wait_ms: float,
    threads: int | None,
    max_input_chars: int,
    max_request_bytes: int,
    prefill_chunk: int = 0,
) -> None:
    """Refuse a size or wait the scheduler or the guard could not work with, before the model loads."""
    for name, value, low in (
        ("--max-batch-size", max_batch_size, 1),
        ("--queue-size", queue_size, 1),
        ("--max-wait-ms", max_wait_ms, 0),
        ("--threads", 1 if threads is None else threads, 1),
        ("--max-input-chars", max_input_chars, 1),
        ("--max-request-bytes", max_request_bytes, 1),
        ("--prefill-chunk", prefill_chunk, 0),
    ):
        if value < low:
            raise ConfigError(f"{name} must be >= {low} (got {value})")


def _check_folders(paths: Sequence[str | Path], allow_load_from: Sequence[str | Path]) -> None:
    """Every folder to serve, and every folder /admin/load may read from, exists: a typo is a one-line error
    now, not an empty server or a refused load later."""
    for path in paths:
        if not Path(path).is_dir():
            raise ConfigError(
                f"{path} is not a folder; give a bank folder (BANK/TASK/adapter.json), a folder of "
                "run folders, a run folder or an adapter folder"
            )
    for path in allow_load_from:
        if not Path(path).is_dir():
            raise ConfigError(f"--allow-load-from {path} is not a folder; name an existing folder")


def _keys(
    api_key: str | None, admin_key: str | None, host: str, port: int, insecure_no_admin_key: bool
) -> tuple[str | None, str | None]:
    """(API key, admin key), each from its flag or else its environment variable. Without either key on an
    address other machines can reach, anyone could load and unload tasks: refused, unless
    ``insecure_no_admin_key``, which still warns."""
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    admin_key = admin_key or os.environ.get(ADMIN_KEY_ENV) or None
    if admin_key is None and api_key is None and not _is_loopback(host):
        if not insecure_no_admin_key:
            raise ConfigError(
                f"--host {host} can be reached from other machines and the server has no admin key, "
                f"so anyone could load and unload tasks; set --admin-key (or ${ADMIN_KEY_ENV}, or "
                "--api-key), or pass --insecure-no-admin-key to serve without one"
            )
        print(
            f"warning: no admin key: anyone who reaches {host}:{port} can load and unload tasks "
            "(--insecure-no-admin-key)",
            file=sys.stderr,
        )
    return api_key, admin_key


def serve(
    paths: str | Path | Sequence[str | Path],
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    max_batch_size: int = 32,
    max_wait_ms: float = 5,
    queue_size: int = 256,
    timeout_s: float = 60,
    model: str | None = None,
    device: str | None = None,
    quantize: str | None = None,
    log_level: str = "info",
    threads: int | None = None,
    admin_key: str | None = None,
    insecure_no_admin_key: bool = False,
    allow_load_from: Sequence[str | Path] = (),
    max_input_chars: int = MAX_INPUT_CHARS,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    monitor_db: str | None = None,
    log_requests: bool = False,
    request_retention: str | None = None,
    monitor: bool = True,
    watch_versions: float = DEFAULT_INTERVAL_S,
    prefill_chunk: int = PREFILL_CHUNK,
) -> None:
    """Serve every task under ``paths`` (banks, folders of runs, runs, adapter folders; see
    :func:`multitune.serve.engine.find_adapters`) until interrupted.

    Keys default to ``$MULTITUNE_API_KEY`` and ``$MULTITUNE_ADMIN_KEY``. On an address other machines can
    reach, the server refuses to start without an admin key unless ``insecure_no_admin_key``.
    Answers and feedback go to ``monitor_db`` (a SQLite file or ``postgresql://`` URL; default
    ``PATH/monitor.sqlite`` of the first path), inputs too with ``log_requests``. ``monitor``: watch every
    task with a reference profile for drift (docs/monitoring.md); False builds no monitor and observes nothing.
    ``watch_versions``: every so many seconds, a task served from a run or bank task folder whose current
    version moved (``multitune promote``, a rollback) is reloaded, atomically (:mod:`multitune.serve.follow`);
    0 never. ``prefill_chunk``: while rows decode, a longer prompt is prefilled this many tokens per decode step
    (0: in one forward).
    """
    paths = [paths] if isinstance(paths, str | Path) else list(paths)
    _check_limits(
        max_batch_size, queue_size, max_wait_ms, threads, max_input_chars, max_request_bytes, prefill_chunk
    )
    if not timeout_s > 0:
        raise ConfigError(f"--timeout must be > 0 seconds (got {timeout_s})")
    if not watch_versions >= 0:
        raise ConfigError(f"--watch-versions must be >= 0 seconds, 0 to turn it off (got {watch_versions})")
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be between 0 and 65535 (got {port})")
    _check_folders(paths, allow_load_from)
    api_key, admin_key = _keys(api_key, admin_key, host, port, insecure_no_admin_key)
    _check_port(host, port)
    retention = Retention.parse(request_retention)
    store = FeedbackStore.open(
        monitor_db or FeedbackStore.default_path(paths), log_requests=log_requests, retention=retention
    )

    import uvicorn

    from multitune.serve.engine import Engine
    from multitune.serve.scheduler import Scheduler, in_passing_thread

    if threads:
        import torch

        torch.set_num_threads(threads)  # read by every thread that starts a parallel region
    try:
        engine = in_passing_thread(lambda: Engine.from_folder(paths, model, device, quantize))
    except BaseException:  # the app would have closed the store: nothing else will
        store.close()
        raise
    scheduler = Scheduler(
        engine,
        max_batch_size=max_batch_size,
        max_wait_ms=max_wait_ms,
        queue_size=queue_size,
        timeout_s=timeout_s,
        monitor=monitor,
        prefill_chunk=prefill_chunk,
    )
    app = create_app(
        scheduler,
        api_key=api_key,
        model_name=str(engine.base.source),
        admin_key=admin_key,
        load_from=[*paths, *allow_load_from],
        max_input_chars=max_input_chars,
        max_request_bytes=max_request_bytes,
        store=store,
        watch_versions=watch_versions,
    )
    names = ", ".join(sorted(engine.tasks))
    print(
        f"serving {len(engine.tasks)} task(s) ({names}) on {engine.base.source} at http://{host}:{port}",
        file=sys.stderr,
    )
    print(_monitoring_line(scheduler), file=sys.stderr)
    if watch_versions > 0:
        print(
            f"following each task's current version (pointer read every {watch_versions:g} s)",
            file=sys.stderr,
        )
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)


def _monitoring_line(scheduler: Any) -> str:
    """What the server watches, said once at start: the tasks without a profile are named with the fix."""
    if scheduler.monitor is None:
        return "drift monitoring is off (--no-monitor)"
    tasks = scheduler.monitor.state()["tasks"]
    bare = sorted(name for name, state in tasks.items() if not state.get("monitored"))
    line = f"watching {len(tasks) - len(bare)} of {len(tasks)} task(s) for drift: /monitor, /v1/monitor"
    if bare:
        line += f"; no profile for {', '.join(bare)} (build one: multitune profile RUN --data FILE)"
    return line


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="what to serve: bank folders (BANK/TASK/adapter.json), folders of run folders "
        "(BANK/RUN/adapter), run folders or adapter folders; a task is named after its folder",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    parser.add_argument(
        "--api-key",
        help=f"key every endpoint but /health requires as 'Authorization: Bearer KEY' "
        f"(default: ${API_KEY_ENV}; none: open)",
    )
    parser.add_argument(
        "--admin-key",
        help=f"key /admin/* requires (default: ${ADMIN_KEY_ENV}, else the API key; "
        "required on a --host other machines can reach)",
    )
    parser.add_argument(
        "--insecure-no-admin-key",
        action="store_true",
        help="serve on a non-loopback --host without an admin key: anyone may load and unload tasks",
    )
    parser.add_argument(
        "--allow-load-from",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder /admin/load and /admin/reload may read from, besides the served ones (repeatable)",
    )
    parser.add_argument(
        "--max-input-chars",
        type=int,
        default=MAX_INPUT_CHARS,
        help=f"characters of one text (prompt, message, input); beyond it 413 (default: {MAX_INPUT_CHARS})",
    )
    parser.add_argument(
        "--max-request-bytes",
        type=int,
        default=MAX_REQUEST_BYTES,
        help=f"bytes of one request body; beyond it 413 (default: {MAX_REQUEST_BYTES})",
    )
    parser.add_argument(
        "--monitor-db",
        metavar="URL_OR_FILE",
        help="where answers and feedback are stored: a SQLite file, or postgresql://... shared by several "
        "replicas (needs pip install 'multitune[postgres]'; default: monitor.sqlite in the first PATH)",
    )
    parser.add_argument(
        "--log-requests",
        action="store_true",
        help="also store each request's input text, so that `multitune feedback export` can write training "
        "data (default: inputs are not stored)",
    )
    parser.add_argument(
        "--request-retention",
        metavar="ROWS_OR_DAYS",
        help="keep the newest ROWS answers (100000) or those of the last DAYS (30d); answers that got "
        "feedback are kept (default: 1000000 rows)",
    )
    parser.add_argument(
        "--no-monitor",
        action="store_true",
        help="do not watch the tasks for drift (no statistics kept; /v1/monitor reports monitoring off)",
    )
    parser.add_argument(
        "--watch-versions",
        type=float,
        default=DEFAULT_INTERVAL_S,
        metavar="SECONDS",
        help="how often to read each served folder's current version (versions/current); a task whose "
        f"version moved is reloaded atomically (default: {DEFAULT_INTERVAL_S:g}; 0: never)",
    )
    parser.add_argument("--max-batch-size", type=int, default=32, help="rows in one forward (default: 32)")
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=5.0,
        help="how long an idle server waits for a batch to fill (default: 5)",
    )
    parser.add_argument(
        "--prefill-chunk",
        type=int,
        default=PREFILL_CHUNK,
        metavar="TOKENS",
        help="while other rows decode, a longer prompt is prefilled this many tokens per decode step, so that "
        f"it never stalls them for its whole prefill (default: {PREFILL_CHUNK}; 0: in one forward)",
    )
    parser.add_argument(
        "--queue-size",
        type=int,
        default=256,
        help="requests that may wait; beyond it the server answers 429 (default: 256)",
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="seconds a request may take (default: 60)"
    )
    parser.add_argument("--model", help="base model to load the adapters onto (default: the one they record)")
    add_quantize_argument(parser, "as the adapters' runs had it")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--threads", type=int, help="CPU threads for the model's forwards (default: torch's, one per core)"
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="server log level (default: info)",
    )


def cmd_serve(args: argparse.Namespace) -> None:
    serve(
        args.paths,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        max_batch_size=args.max_batch_size,
        max_wait_ms=args.max_wait_ms,
        prefill_chunk=args.prefill_chunk,
        queue_size=args.queue_size,
        timeout_s=args.timeout,
        model=args.model,
        device=args.device,
        quantize=args.quantize,
        log_level=args.log_level,
        threads=args.threads,
        admin_key=args.admin_key,
        insecure_no_admin_key=args.insecure_no_admin_key,
        allow_load_from=args.allow_load_from,
        max_input_chars=args.max_input_chars,
        max_request_bytes=args.max_request_bytes,
        monitor_db=args.monitor_db,
        log_requests=args.log_requests,
        request_retention=args.request_retention,
        monitor=not args.no_monitor,
        watch_versions=args.watch_versions,
    )


def commands() -> list[Command]:
    return [
        Command(
            "serve",
            "serve tasks over an OpenAI-compatible HTTP API (mixed batches)",
            add_serve_arguments,
            cmd_serve,
        )
    ]
