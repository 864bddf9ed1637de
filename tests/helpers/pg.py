"""A throwaway PostgreSQL server on loopback, for tests of studies shared through ``--storage postgresql://``.

``start_postgres`` runs ``initdb`` on a fresh data directory and ``pg_ctl start`` on a free TCP port bound to
127.0.0.1 only, with trust authentication (nobody else can reach it) and fsync off (speed; the data is thrown
away). PostgreSQL refuses to run as root, so when the tests run as root its programs run as the ``postgres``
system user through ``runuser``. ``PostgresServer.stop`` stops the server and deletes everything it wrote.

Missing binaries or a missing ``postgres`` user raise ``PostgresUnavailable``, which the ``postgres_url``
fixture turns into a skip; anything else that goes wrong raises ``PostgresError`` with the server log, so a
broken setup fails loudly instead of skipping.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

USER = "mt"
DATABASE = "multitune"
PROGRAMS = ("initdb", "pg_ctl", "createdb")
TIMEOUT_S = 60
INSTALL_HINT = "PostgreSQL server binaries not found; .ci/run installs them with apt-get"


class PostgresUnavailable(RuntimeError):
    """This machine cannot run a PostgreSQL server (no binaries, or root without a ``postgres`` user)."""


class PostgresError(RuntimeError):
    """The server could be run but setting it up failed (the message carries the command output or log)."""


@dataclass
class PostgresServer:
    """A running server; ``stop()`` is idempotent and leaves neither a process nor a file behind."""

    url: str
    port: int
    root: Path
    pg_ctl: Path
    run_as: str | None
    stopped: bool = field(default=False)

    @property
    def data(self) -> Path:
        return self.root / "data"

    def postmaster_pid(self) -> int | None:
        """The server's process id from ``postmaster.pid``, or None when it is not running."""
        try:
            return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        """``pg_ctl stop -m fast``; if that fails, kill the postmaster by its pid. Then remove the folder."""
        if self.stopped:
            return
        self.stopped = True
        pid = self.postmaster_pid()
        try:
            if pid is not None:
                stop = [str(self.pg_ctl), "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop"]
                result = _run(stop, run_as=self.run_as, cwd=self.root, check=False)
                # pg_ctl returns once postmaster.pid is gone, a moment before the process itself exits.
                if result.returncode != 0 or not _wait_exit(pid, 10):
                    _kill(pid)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def find_binaries() -> dict[str, Path]:
    """``initdb``, ``pg_ctl`` and ``createdb`` from the newest /usr/lib/postgresql/*/bin, else from PATH."""

    def version(bin_dir: str) -> tuple[int, ...]:
        name = Path(bin_dir).parent.name
        return tuple(int(part) for part in name.split(".") if part.isdigit())

    for bin_dir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        paths = {name: Path(bin_dir) / name for name in PROGRAMS}
        if all(os.access(path, os.X_OK) for path in paths.values()):
            return paths
    found = {name: shutil.which(name) for name in PROGRAMS}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise PostgresUnavailable(f"{INSTALL_HINT} (missing: {', '.join(missing)})")
    return {name: Path(path) for name, path in found.items() if path is not None}


def start_postgres(folder: Path) -> PostgresServer:
    """Start a server with database ``multitune`` owned by superuser ``mt``; its ``.url`` is for SQLAlchemy.

    As an ordinary user the cluster lives in a new directory inside ``folder``. As root it lives in a new
    ``tempfile.mkdtemp()`` directory owned by ``postgres`` instead: pytest's tmp folders sit under
    /tmp/pytest-of-root (mode 0o700), which the ``postgres`` user cannot enter.
    """
    binaries = find_binaries()
    run_as = _postgres_user() if os.geteuid() == 0 else None
    if run_as is None:
        root = Path(tempfile.mkdtemp(prefix="pg-", dir=folder))
    else:
        root = Path(tempfile.mkdtemp(prefix="multitune-pg-"))
        root.chmod(0o755)
    server = PostgresServer(url="", port=0, root=root, pg_ctl=binaries["pg_ctl"], run_as=run_as)
    try:
        _init_cluster(binaries["initdb"], root, run_as)
        server.port = _start(server)
        _run(
            [str(binaries["createdb"]), "-h", "127.0.0.1", "-p", str(server.port), "-U", USER, DATABASE],
            run_as=None,
            cwd=root,
        )
    except BaseException:
        server.stop()
        raise
    server.url = f"postgresql://{USER}@127.0.0.1:{server.port}/{DATABASE}"
    return server


def _postgres_user() -> str:
    """The system user that runs the server when we are root (PostgreSQL refuses to run as root)."""
    if shutil.which("runuser") is None:
        raise PostgresUnavailable("running as root needs `runuser` to start PostgreSQL as the postgres user")
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresUnavailable(f"running as root and no `postgres` system user; {INSTALL_HINT}") from None
    return "postgres"


def _init_cluster(initdb: Path, root: Path, run_as: str | None) -> None:
    """initdb (C locale, no sync) and a config that listens on 127.0.0.1 only, trusting loopback alone."""
    sockets = root / "sock"
    sockets.mkdir()
    if run_as is not None:
        owner = pwd.getpwnam(run_as)
        for path in (root, sockets):
            os.chown(path, owner.pw_uid, owner.pw_gid)
        if _run(["test", "-w", str(root)], run_as=run_as, cwd="/", check=False).returncode != 0:
            raise PostgresError(f"the {run_as} user cannot write to {root}; set TMPDIR to one it reaches")
    _run(
        [
            str(initdb),
            "-D",
            str(root / "data"),
            "-U",
            USER,
            "--auth=trust",
            "--no-sync",
            "--locale=C",
            "--encoding=UTF8",
        ],
        run_as=run_as,
        cwd=root,
    )
    data = root / "data"
    (data / "pg_hba.conf").write_text(
        "# loopback only: the server listens on 127.0.0.1 and its socket dir is private to the test\n"
        "local all all trust\n"
        "host all all 127.0.0.1/32 trust\n"
    )
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(
            "\n# multitune tests: loopback only, no durability (the data is thrown away)\n"
            "listen_addresses = '127.0.0.1'\n"
            f"unix_socket_directories = '{sockets}'\n"
            "fsync = off\n"
            "synchronous_commit = off\n"
            "full_page_writes = off\n"
            "max_connections = 50\n"
        )


def _start(server: PostgresServer, attempts: int = 3) -> int:
    """``pg_ctl -w start`` on a free port; another process can grab the port in between, so retry."""
    log = server.root / "server.log"
    output = ""
    for _ in range(attempts):
        port = _free_port()
        result = _run(
            [
                str(server.pg_ctl),
                "-D",
                str(server.data),
                "-l",
                str(log),
                "-w",
                "-t",
                "30",
                "-o",
                f"-p {port}",
                "start",
            ],
            run_as=server.run_as,
            cwd=server.root,
            check=False,
        )
        if result.returncode == 0:
            return port
        output = result.stdout + result.stderr
        pid = server.postmaster_pid()
        if pid is not None and process_alive(pid):
            _kill(pid)
    log_text = log.read_text(errors="replace")[-3000:] if log.exists() else "(no log)"
    raise PostgresError(f"pg_ctl start failed {attempts} times:\n{output}\n--- server log ---\n{log_text}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(
    command: list[str], run_as: str | None, cwd: Path | str, check: bool = True
) -> subprocess.CompletedProcess:
    """Run a PostgreSQL program (as ``run_as`` through runuser when given); raise PostgresError on failure."""
    if run_as is not None:
        command = ["runuser", "-u", run_as, "--", *command]
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL
    )
    if check and result.returncode != 0:
        output = result.stdout + result.stderr
        raise PostgresError(f"{' '.join(command)} failed ({result.returncode}):\n{output}")
    return result


def process_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (exited, not yet reaped by its parent) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _wait_exit(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while process_alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def _kill(pid: int) -> None:
    """Last resort when pg_ctl cannot stop the server: SIGQUIT (immediate shutdown), then SIGKILL."""
    for sig in (signal.SIGQUIT, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        if _wait_exit(pid, 5):
            return
