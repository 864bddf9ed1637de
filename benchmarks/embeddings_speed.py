"""Embeddings per second: ``/v1/embeddings`` of ``multitune serve`` against sentence-transformers' recipe.

    python benchmarks/embeddings_speed.py [--texts 512] [--batch 32] [--clients 8] [--per-request 8] [--serve-args ...]

MiniLM (all-MiniLM-L6-v2) with two classification tasks saved beside it (LoRA r8 on query/value and (IA)^3,
their tensors perturbed away from the identity so that their embeddings differ from the base's). The texts are
the first ``--texts`` sentences of ../shared/datasets/sst2/test.csv (the built-in sentences repeated with a
number when ../shared is absent), in their file order.

(a) the baseline, in this process: sentence-transformers' recipe for MiniLM with plain transformers
    (``AutoModel``, mean pooling over the attention mask, L2 normalisation), ``--batch`` texts per forward.
(b) multitune's engine in this process, no HTTP (``Engine.embed_rows``), the same batches: the base's rows, then
    rows of the base and both tasks mixed (a third each) in every batch.
(c) ``multitune serve BANK`` in its own process, the official openai client over loopback: ``--clients``
    concurrent clients, each sending requests of ``--per-request`` texts until the texts are used up, the
    base (``model`` = the base's name) and, in a second pass, the three models drawn at random per request.

Reported: embeddings/s of each, (b) / (a) and (c) / (a), p50 and p99 request latency of (c), the share of the
machine's cores the clients (this process) and the server used during (c), and the largest difference between
the base's vectors of (b), (c) and (a) (the same recipe: it should be float rounding).
Every pass is timed after a warm-up; run it alone on the machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import SENTENCES, free_port, wait_ready  # noqa: E402  (the same server helpers)

SST2 = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "sst2" / "test.csv"
TASKS = ["sent-lora", "sent-ia3"]
CORES = len(os.sched_getaffinity(0))


def texts_of(n: int) -> tuple[list[str], str]:
    if SST2.exists():
        with SST2.open(newline="") as f:
            rows = [row["sentence"] for row in csv.DictReader(f)]
        return rows[:n], f"SST-2 test ({min(n, len(rows))} sentences)"
    return [f"{SENTENCES[i % len(SENTENCES)]} {i}" for i in range(n)], "built-in sentences"


def build_bank(folder: Path) -> Path:
    """MiniLM with the two perturbed tasks saved as a bank folder; returns the base's folder."""
    import torch

    from multitune.bank import MultiTaskModel
    from multitune.methods.ia3 import IA3Config
    from multitune.methods.lora import LoRAConfig
    from multitune.models import load_base
    from multitune.storage import save_adapter

    bank = MultiTaskModel(load_base("minilm", device="cpu"))
    generator = torch.Generator().manual_seed(0)
    for task, method, config in [
        ("sent-lora", "lora", LoRAConfig(rank=8, alpha=16)),
        ("sent-ia3", "ia3", IA3Config()),
    ]:
        bank.add_task(task, "classification", method, config, ["negative", "positive"])
        with torch.no_grad():
            for param in bank.task_parameters(task).values():
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
        save_adapter(bank, task, folder / task)
    from multitune.models import resolve_source

    return resolve_source("minilm")[0]


def recipe(base: Path, texts: list[str], batch: int) -> tuple[Any, float]:
    """(a): the vectors and the seconds, after one warm-up batch."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(base), AutoModel.from_pretrained(base).eval()

    def embed(chunk: list[str]) -> torch.Tensor:
        encoded = tokenizer(chunk, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1)

    embed(texts[:batch])
    start = time.perf_counter()
    vectors = torch.cat([embed(texts[i : i + batch]) for i in range(0, len(texts), batch)])
    return vectors, time.perf_counter() - start


def engine_pass(engine: Any, rows: list[tuple[str | None, str]], batch: int) -> tuple[Any, float]:
    """(b): ``Engine.embed_rows`` over ``rows`` in batches, after one warm-up batch."""
    import torch

    engine.embed_rows(rows[:batch])
    start = time.perf_counter()
    out = []
    for i in range(0, len(rows), batch):
        out += [vector for vector, _ in engine.embed_rows(rows[i : i + batch])]
    return torch.tensor(out), time.perf_counter() - start


def _cpu_seconds(pid: int) -> float:
    """The CPU seconds process ``pid`` has used (user + system, from /proc; 0 where there is none)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client_pass(url: str, jobs: list[tuple[str, list[str]]], clients: int, pid: int) -> dict[str, Any]:
    """(c): ``clients`` threads, each taking the next request (model, texts) until none is left; with the CPU
    seconds the clients (this process) and the server (``pid``) used meanwhile."""
    import openai
    import torch

    answers: dict[int, list[list[float]]] = {}
    latencies: list[float] = []
    lock, position = threading.Lock(), [0]
    errors: list[BaseException] = []

    def client() -> None:
        api = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
        while True:
            with lock:
                if position[0] >= len(jobs):
                    return
                index = position[0]
                position[0] += 1
            model, texts = jobs[index]
            start = time.perf_counter()
            try:
                reply = api.embeddings.create(model=model, input=texts)
            except BaseException as error:  # noqa: BLE001  (reported after the pass)
                errors.append(error)
                return
            latencies.append(time.perf_counter() - start)
            answers[index] = [row.embedding for row in reply.data]

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start, cpu, served = time.perf_counter(), time.process_time(), _cpu_seconds(pid)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    cpu, served = time.process_time() - cpu, _cpu_seconds(pid) - served
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed, the first: {errors[0]!r}")
    vectors = torch.tensor([v for i in range(len(jobs)) for v in answers[i]])
    latencies.sort()
    return {
        "vectors": vectors,
        "seconds": wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
        "client_cpu_share": cpu / wall / CORES,
        "server_cpu_share": served / wall / CORES,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32, help="texts per forward of (a) and (b)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-request", type=int, default=8, help="texts per request of (c)")
    parser.add_argument("--serve-args", default="", help="more flags for multitune serve, e.g. '--threads 1'")
    args = parser.parse_args(argv)

    import torch

    from multitune.serve.engine import Engine

    texts, source = texts_of(args.texts)
    folder = Path(tempfile.mkdtemp(prefix="embeddings-speed-"))
    base = build_bank(folder / "bank")
    print(f"MiniLM, {source}, batches of {args.batch}, {torch.get_num_threads()} threads", file=sys.stderr)
    reference, seconds = recipe(base, texts, args.batch)
    results: dict[str, Any] = {"(a) recipe, plain transformers": {"embeddings_per_s": len(texts) / seconds}}

    engine = Engine.from_folder(folder / "bank", device="cpu")
    rng = random.Random(0)
    models: list[str | None] = [None, *TASKS]
    vectors, seconds = engine_pass(engine, [(None, t) for t in texts], args.batch)
    results["(b) engine, base"] = {
        "embeddings_per_s": len(texts) / seconds,
        "max_abs_diff_vs_a": float((vectors - reference).abs().max()),
    }
    mixed = [(rng.choice(models), t) for t in texts]
    _, seconds = engine_pass(engine, mixed, args.batch)
    results["(b) engine, base + 2 tasks mixed"] = {"embeddings_per_s": len(texts) / seconds}
    del engine

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(tempfile.mkstemp(prefix="embeddings-speed-", suffix=".log")[1])
    argv_serve = [sys.executable, "-m", "multitune", "serve", str(folder / "bank"), "--port", str(port),
                  "--device", "cpu", "--max-batch-size", str(args.batch), "--log-level", "warning", *shlex.split(args.serve_args)]  # fmt: skip
    with log.open("w") as sink:
        process = subprocess.Popen(argv_serve, stdout=sink, stderr=subprocess.STDOUT, text=True)
    try:
        wait_ready(url, process, log)
        import httpx

        name = httpx.get(f"{url}/health", timeout=10).json()["model"]  # the base's name
        chunks = [texts[i : i + args.per_request] for i in range(0, len(texts), args.per_request)]
        client_pass(url, [(name, chunks[0])], 1, process.pid)  # warm-up
        served = client_pass(url, [(name, chunk) for chunk in chunks], args.clients, process.pid)
        results["(c) server, base"] = {
            "embeddings_per_s": len(texts) / served["seconds"],
            "p50_ms": served["p50_ms"],
            "p99_ms": served["p99_ms"],
            "max_abs_diff_vs_a": float((served["vectors"] - reference).abs().max()),
            "client_cpu_share": served["client_cpu_share"],
            "server_cpu_share": served["server_cpu_share"],
        }
        served = client_pass(
            url, [(rng.choice([name, *TASKS]), chunk) for chunk in chunks], args.clients, process.pid
        )
        results["(c) server, base + 2 tasks mixed"] = {
            "embeddings_per_s": len(texts) / served["seconds"],
            "p50_ms": served["p50_ms"],
            "p99_ms": served["p99_ms"],
            "client_cpu_share": served["client_cpu_share"],
            "server_cpu_share": served["server_cpu_share"],
        }
    finally:
        process.terminate()
        process.wait(timeout=60)
    baseline = results["(a) recipe, plain transformers"]["embeddings_per_s"]
    for result in results.values():
        result["ratio_vs_a"] = result["embeddings_per_s"] / baseline
    width = max(map(len, results))
    for label, result in results.items():
        extra = "".join(
            f", {key} {value:.3g}"
            for key, value in result.items()
            if key not in ("embeddings_per_s", "ratio_vs_a")
        )
        print(
            f"{label:<{width}}  {result['embeddings_per_s']:8.1f} embeddings/s  x{result['ratio_vs_a']:.2f}{extra}"
        )
    print(json.dumps({"texts": len(texts), "batch": args.batch, "clients": args.clients,
                      "per_request": args.per_request, "results": results}))  # fmt: skip


if __name__ == "__main__":
    main()
