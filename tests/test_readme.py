"""Every command and snippet of the README runs as written, in the README's order.

Only names are adapted: the models (``minilm``, ``smollm2-135m``) become tiny local folders of the same
architectures, the data files the README names are written here with toy content, ports are free ones, and
``--trials 8`` is 1 (a search of eight trials per method proves nothing more and costs a minute). ``make demo``
(the README's first command) is stood in for by ``multitune demo`` on the tiny encoder with two methods, so that
the bank the later commands serve exists. ``curl`` lines are sent with httpx exactly as curl would send them.
Each command must exit 0 (the servers must answer 200).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from helpers import save_tiny, toy_generation, toy_sentiment

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)

pytestmark = pytest.mark.usefixtures("one_thread")


def blocks() -> list[tuple[str, str]]:
    """(language, text) of every code block after the set-up block (``make demo`` / ``make test``)."""
    found = [(m.group(1), m.group(2)) for m in BLOCK.finditer(README.read_text())]
    assert found and "make demo" in found[0][1]
    return found[1:]


def commands(text: str) -> list[list[str]]:
    """The shell commands of a block: continuation lines joined, comments dropped."""
    joined = text.replace("\\\n", " ")
    return [
        shlex.split(line, comments=True) for line in joined.splitlines() if shlex.split(line, comments=True)
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_inputs(folder: Path, encoder: str) -> None:
    stars = {"pos": "5", "neg": "1"}
    sentiment = toy_sentiment(60)
    (folder / "reviews.csv").write_text(
        "review,stars\n" + "".join(f"{e.text},{stars[e.label]}\n" for e in sentiment)
    )
    (folder / "new.csv").write_text("review\n" + "".join(f"{e.text}\n" for e in sentiment[:5]))
    (folder / "topics.csv").write_text(
        "text,label\n"
        + "".join(f"{e.text},{'food' if 'food' in e.text else 'other'}\n" for e in toy_sentiment(40, seed=3))
    )
    few = toy_sentiment(16, seed=5) + toy_sentiment(
        30, seed=6
    )  # compose's few examples and its held-out rows
    for name, rows in (("few.csv", few[:16]), ("held-out.csv", few[16:])):
        (folder / name).write_text("text,label\n" + "".join(f"{e.text},{e.label}\n" for e in rows))
    (folder / "notes.txt").write_text("".join(e.text + "\n" for e in toy_sentiment(40, seed=7)))  # raw text
    (folder / "answers.jsonl").write_text(
        "".join(json.dumps({"prompt": e.text, "response": e.response}) + "\n" for e in toy_generation(24))
    )
    pairs = [
        {"prompt": f"the {w} was", "chosen": "very good", "rejected": "very bad"}
        for w in ("movie", "food", "place", "service")
    ] * 4
    (folder / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    (folder / "prompts.jsonl").write_text(
        "".join(json.dumps({"prompt": p["prompt"]}) + "\n" for p in pairs[:8])
    )
    (folder / "multi.yaml").write_text(
        yaml.safe_dump(
            {  # as the README describes it
                "model": encoder,
                "train": {"epochs": 2},
                "tasks": [
                    {
                        "name": "reviews",
                        "method": "lora",
                        "data": "reviews.csv",
                        "text_column": "review",
                        "label_column": "stars",
                    },
                    {"name": "topics", "method": "prompt", "data": "topics.csv"},
                ],
            }
        )
    )


class Readme:
    """Runs the README's commands in one folder, with the tiny models in place of the real ones."""

    def __init__(self, folder: Path, models: dict[str, str]) -> None:
        self.folder, self.models = folder, models
        self.servers: dict[str, tuple[subprocess.Popen, int]] = {}  # README port -> (process, our port)
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def adapt(self, argv: list[str]) -> list[str]:
        out = [self.models.get(a, a) for a in argv]
        for i, a in enumerate(out[:-1]):
            if a == "--trials" and out[i + 1] == "8":
                out[i + 1] = "1"
        return out

    def run(self, argv: list[str]) -> None:
        if argv[0] == "curl":
            return self.curl(argv)
        assert argv[0] == "multitune", argv
        argv = self.adapt(argv)
        if argv[1] == "serve":
            return self.serve(argv)
        from multitune.cli import main  # in this process: a fresh interpreter per command costs seconds each

        previous = Path.cwd()
        os.chdir(self.folder)
        try:
            assert main(argv[1:]) == 0, f"{' '.join(argv)} failed"
        finally:
            os.chdir(previous)
        return None

    def serve(self, argv: list[str]) -> None:
        port = argv[argv.index("--port") + 1]
        ours = _free_port()
        argv[argv.index("--port") + 1] = str(ours)
        process = subprocess.Popen(
            [sys.executable, "-m", *argv, "--threads", "1"],
            cwd=self.folder,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.servers[port] = (process, ours)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert process.poll() is None, f"{' '.join(argv)} died: {process.stderr.read()[-2000:]}"
            try:
                if httpx.get(f"http://127.0.0.1:{ours}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise AssertionError(f"{' '.join(argv)} did not start")

    def curl(self, argv: list[str]) -> None:
        url, headers, body = argv[1], {}, None
        for flag, value in zip(argv[2::2], argv[3::2], strict=True):
            if flag == "-H":
                name, _, content = value.partition(":")
                headers[name.strip()] = content.strip()
            elif flag == "-d":
                body = value
        match = re.match(r"localhost:(\d+)(/.*)", url)
        assert match, url
        port = self.servers[match.group(1)][1]
        response = httpx.post(
            f"http://127.0.0.1:{port}{match.group(2)}", headers=headers, content=body, timeout=120
        )
        assert response.status_code == 200, response.text

    def close(self) -> None:
        for process, _ in self.servers.values():
            process.terminate()
            process.wait(timeout=30)


def test_every_readme_command_and_snippet_runs_as_written(tmp_path, monkeypatch) -> None:
    models = {
        "minilm": str(save_tiny("bert", tmp_path / "tiny-bert")),
        "smollm2-135m": str(save_tiny("llama", tmp_path / "tiny-llama")),
    }
    work = tmp_path / "work"
    work.mkdir()
    _write_inputs(work, models["minilm"])
    readme = Readme(work, models)
    # what `make demo` leaves: runs/demo/compare/bank with the support-lora and support-prompt tasks
    readme.run(
        [
            "multitune",
            "demo",
            "--model",
            "minilm",
            "--examples",
            "80",
            "--trials",
            "1",
            "--methods",
            "lora,prompt",
            "--quiet",
        ]
    )
    monkeypatch.chdir(work)
    per_block: list[int] = []
    try:
        for language, text in blocks():
            if language == "python":
                code = text
                for name, folder in models.items():
                    code = code.replace(f'"{name}"', repr(folder))
                exec(compile(code, "README.md", "exec"), {})  # noqa: S102  (the README's own snippet)
                per_block.append(1)
                continue
            argvs = commands(text)
            for argv in argvs:
                readme.run(argv)
            per_block.append(len(argvs))
    finally:
        readme.close()
    # every block ran something: a README whose blocks the parser missed would pass empty
    assert len(per_block) >= 8 and all(per_block), per_block
