"""Serving under load: the multitune server against the in-process engine and a one-at-a-time peft server.

    python benchmarks/serve_load.py [--clients 16] [--requests 4] [--max-tokens 16] [--tasks 8] [--monitor]

SmolLM2-135M with ``--tasks`` generation tasks cycling over LoRA (r4 on q/v, r8 on q/v, r16 on every
projection), (IA)^3 and prompt tuning (10 virtual tokens), every task's tensors perturbed away from the
identity. ``--clients`` concurrent clients each send ``--requests`` completions (``--max-tokens`` new tokens,
greedy, the tasks drawn at random, seeded) over loopback and wait for each answer before the next.

(i)   ``multitune serve BANK`` in its own process: mixed-task continuous batching.
(ii)  the in-process engine, no HTTP: ``Engine.generate`` over the same requests, ``--clients`` at a time
      (static batches of mixed tasks): what the server could reach without its HTTP and scheduling costs.
(iii) a baseline server in its own process that answers one request at a time with the peft package,
      switching adapters per request (every LoRA task in one PeftModel, every (IA)^3 task in another,
      each prompt-tuning task its own PeftModel over one shared base), the weights exported from the bank.

Measured: requests/s, new tokens/s, p50 and p99 latency. Targets at 16 and 64 clients: (i) >= 3 x (iii)
throughput and (i) >= 0.9 x (ii).

``--monitor``: the cost of drift monitoring. Every task gets a reference profile (health/profile.py), two
classification tasks (LoRA r8, neg/pos) join the bank, and (i) runs four times in the order off, on, on, off
(``--no-monitor`` and the default; the ABBA order cancels a drift of the machine's speed), each server taking
the generation load above and then a classification load (every client sends ``4 x --requests`` requests of
1-4 sentences, the two tasks at random). Reported: requests/s of each, and monitored / unmonitored throughput
(the mean of the two runs each) for both loads; target >= 0.95.

Correctness: every answer of (i), (ii) and (iii) is compared with a reference that is right by construction:
each request alone through a plain greedy loop on our bank that runs the full sequence through the model at
every step (no KV cache, no ``generate``). Where (iii) differs, those requests are asked again with peft's
``use_cache=False``: peft's *cached* prompt-tuning ``generate`` (peft 0.21.2 on transformers 5.24) is known to
go wrong, and the output says which differing answers that explains.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = "smollm2-135m"
ALL_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SENTENCES = [
    "the film was a delight from start to finish",
    "a dull and lifeless story",
    "I would happily watch it again",
    "the acting was wooden and the plot made no sense",
    "one of the best meals I have had this year",
    "the service was slow and the food was cold",
    "a warm, funny and moving picture",
    "nothing in it works",
]
CLASSIFY_TASKS = ["sent-a", "sent-b"]
PROMPTS = [
    "Write one sentence about the sea.",
    "Name a fruit that is yellow.",
    "What is two plus three?",
    "Say hello in French.",
    "Give a synonym of happy.",
    "Describe a cat in five words.",
    "What colour is the sky?",
    "Suggest a name for a dog.",
]


def kinds() -> list[tuple[str, str, Any]]:
    from multitune.methods.ia3 import IA3Config
    from multitune.methods.lora import LoRAConfig
    from multitune.methods.prompt import PromptConfig

    return [
        ("lora4", "lora", LoRAConfig(rank=4, alpha=8)),
        ("lora8", "lora", LoRAConfig(rank=8, alpha=16)),
        ("lora16", "lora", LoRAConfig(rank=16, alpha=32, target_modules=ALL_PROJ)),
        ("ia3", "ia3", IA3Config()),
        ("prompt10", "prompt", PromptConfig(num_virtual_tokens=10, init="vocab")),
    ]


def build_bank(folder: Path, n: int, profiles: bool = False) -> list[str]:
    """Save ``n`` perturbed generation tasks as a bank folder; returns the task names. ``profiles``: also two
    classification tasks (:data:`CLASSIFY_TASKS`), and every task's reference profile in its folder."""
    import torch

    from multitune.bank import MultiTaskModel
    from multitune.models import load_base
    from multitune.storage import save_adapter

    bank = MultiTaskModel(load_base(MODEL, device="cpu"))
    generator = torch.Generator().manual_seed(0)
    names = []
    for i in range(n):
        kind, method, config = kinds()[i % len(kinds())]
        task = f"{kind}-{i}"
        bank.add_task(task, "generation", method, config)
        with torch.no_grad():
            for param in bank.task_parameters(task).values():
                param.add_(
                    torch.randn(param.shape, generator=generator) * (0.01 if method == "prompt" else 0.02)
                )
        save_adapter(bank, task, folder / task)
        names.append(task)
    if profiles:
        add_profiles(bank, folder, names)
    return names


def add_profiles(bank: Any, folder: Path, names: list[str]) -> None:
    """The classification tasks, and a reference profile for every task (what ``train`` writes)."""
    import torch

    from multitune.data import Example
    from multitune.health.profile import build_profile, save_profile
    from multitune.methods.lora import LoRAConfig
    from multitune.storage import save_adapter

    generator = torch.Generator().manual_seed(1)
    for task in CLASSIFY_TASKS:
        bank.add_task(task, "classification", "lora", LoRAConfig(rank=8, alpha=16), ["neg", "pos"])
        with torch.no_grad():
            for param in bank.task_parameters(task).values():
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)
        save_adapter(bank, task, folder / task)
    sentences = [Example(text=t, label=["pos", "neg"][i % 2]) for i, t in enumerate(SENTENCES * 8)]
    answers = [Example(text=p, response="A short answer.") for p in PROMPTS * 4]
    for task in [*names, *CLASSIFY_TASKS]:
        examples = sentences if task in CLASSIFY_TASKS else answers
        save_profile(build_profile(bank, task, examples, 128), folder / task)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen, log: Path, seconds: float = 300) -> None:
    import httpx

    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the server exited with {process.returncode}:\n{tail}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not start in {seconds} s")


def reference(bank_dir: Path, requests: list[tuple[str, str]], max_tokens: int) -> dict[tuple[str, str], str]:
    """Each (task, prompt) alone, greedy, by a loop that feeds the whole sequence at every step (no cache)."""
    import torch

    from multitune.serve.engine import Engine

    engine = Engine.from_folder(bank_dir, device="cpu")
    tokenizer = engine.base.tokenizer
    out = {}
    with torch.no_grad():
        for task, prompt in sorted(set(requests)):
            bank = engine.bank_of(task)
            bank.eval()
            features, _ = engine.features(bank, [(task, prompt)], [0], 10**6, False)  # the server's encoding
            ids = torch.tensor([features[0]["input_ids"]])
            slot = torch.tensor([bank.slots.index(task)])
            new: list[int] = []
            for _ in range(max_tokens):
                sequence = torch.cat([ids, torch.tensor([new], dtype=torch.long)], dim=1) if new else ids
                logits = bank.run(sequence, torch.ones_like(sequence), slot, use_cache=False).out.logits
                token = int(logits[0, -1].argmax())
                if token == tokenizer.eos_token_id:
                    break
                new.append(token)
            out[(task, prompt)] = tokenizer.decode(new, skip_special_tokens=True).strip()
    return out


def ask(url: str, requests: list[tuple[str, str]], max_tokens: int, **extra: Any) -> list[str]:
    """One completion after the other (greedy), their texts."""
    import httpx

    with httpx.Client(timeout=600) as http:
        return [
            http.post(
                url + "/v1/completions",
                json={"model": task, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra},
            ).json()["choices"][0]["text"]
            for task, prompt in requests
        ]


def load_test(
    url: str, jobs: list[list[tuple[str, Any]]], max_tokens: int, endpoint: str = "/v1/completions"
) -> dict[str, Any]:
    """Every client sends its jobs one after the other; returns throughput, latencies and the answers.

    ``endpoint`` "/v1/classify": each job is (task, list of texts) and its answer the labels."""
    import httpx

    latencies: list[float] = []
    answers: dict[tuple[int, int], str] = {}
    tokens = [0]
    lock = threading.Lock()
    errors: list[str] = []

    def client(c: int) -> None:
        with httpx.Client(timeout=600) as http:
            for j, (task, prompt) in enumerate(jobs[c]):
                start = time.perf_counter()
                if endpoint == "/v1/classify":
                    payload = {"model": task, "input": prompt}
                else:
                    payload = {"model": task, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
                reply = http.post(url + endpoint, json=payload)
                elapsed = time.perf_counter() - start
                if reply.status_code != 200:
                    errors.append(f"{reply.status_code} {reply.text[:200]}")
                    continue
                body = reply.json()
                with lock:
                    latencies.append(elapsed)
                    if endpoint == "/v1/classify":
                        answers[(c, j)] = " ".join(row["label"] for row in body["data"])
                    else:
                        answers[(c, j)] = body["choices"][0]["text"]
                        tokens[0] += body["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client, args=(c,)) for c in range(len(jobs))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    return summary(wall, latencies, tokens[0], answers)


def summary(wall: float, latencies: list[float], tokens: int, answers: dict) -> dict[str, Any]:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall,
        "tokens_per_s": tokens / wall,
        "p50_s": statistics.median(ordered),
        "p99_s": p99,
        "answers": answers,
    }


def in_process(bank_dir: Path, jobs: list[list[tuple[str, str]]], max_tokens: int) -> dict[str, Any]:
    """(ii): Engine.generate over the requests, one static batch per round of the clients' requests."""
    from multitune.serve.engine import Engine

    engine = Engine.from_folder(bank_dir, device="cpu")
    engine.generate([jobs[0][0]], max_new_tokens=2)  # warm-up
    latencies, answers, tokens = [], {}, 0
    tokenizer = engine.base.tokenizer
    start = time.perf_counter()
    for j in range(len(jobs[0])):
        batch = [jobs[c][j] for c in range(len(jobs))]
        t0 = time.perf_counter()
        texts = engine.generate(batch, max_new_tokens=max_tokens)
        elapsed = time.perf_counter() - t0
        for c, text in enumerate(texts):
            latencies.append(elapsed)
            answers[(c, j)] = text
            tokens += min(max_tokens, len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1)
    return summary(time.perf_counter() - start, latencies, tokens, answers)


# ---- (iii) the baseline server: one request at a time, peft switching adapters ----------------------------
def baseline_app(bank_dir: Path) -> Any:
    import peft
    import torch
    from fastapi import FastAPI

    from multitune.interop.peft import export_peft
    from multitune.models import load_base
    from multitune.serve.engine import Engine

    engine = Engine.from_folder(bank_dir, device="cpu")  # for its prompt encoding and the exported weights
    bank = engine.shared
    export = Path(tempfile.mkdtemp(prefix="peft-baseline-"))
    by_method: dict[str, list[str]] = {}
    for task, spec in bank.tasks.items():
        if spec.kind == "generation":  # --monitor's classification tasks are not the baseline's
            by_method.setdefault(spec.method, []).append(task)
    models: dict[str, Any] = {}
    for method in ("lora", "ia3"):
        tasks = by_method.get(method, [])
        if not tasks:
            continue
        model = peft.PeftModel.from_pretrained(
            load_base(MODEL, device="cpu").model,
            str(export_peft(bank, tasks[0], export / tasks[0])),
            adapter_name=tasks[0],
        )
        for task in tasks[1:]:
            model.load_adapter(str(export_peft(bank, task, export / task)), adapter_name=task)
        for task in tasks:
            models[task] = model.eval()
    shared = load_base(MODEL, device="cpu").model
    for task in by_method.get("prompt", []):
        models[task] = peft.PeftModel.from_pretrained(
            shared, str(export_peft(bank, task, export / task)), adapter_name=task
        ).eval()
    tokenizer = engine.base.tokenizer
    app = FastAPI()

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/completions")
    async def completions(body: dict) -> dict[str, Any]:
        # on the event loop itself: one request at a time, every forward in the thread that loaded the model
        # (a thread pool would give each of its threads its own OpenMP pool, which slows every forward)
        task, prompt, max_tokens = body["model"], body["prompt"], int(body.get("max_tokens", 16))
        use_cache = bool(body.get("use_cache", True))  # False: the check of answers that differ (see main)
        with torch.no_grad():
            features, _ = engine.features(bank, [(task, prompt)], [0], 10**6, False)
            ids = torch.tensor([features[0]["input_ids"]])
            model = models[task]
            if len(models) > 1 and hasattr(model, "set_adapter") and task in model.peft_config:
                model.set_adapter(task)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=use_cache,
            )
            new = out[
                0, ids.shape[1] :
            ]  # peft returns the prompt's ids first (virtual tokens are not in them)
            eos = tokenizer.eos_token_id
            ids_list = new.tolist()
            count = ids_list.index(eos) + 1 if eos in ids_list else len(ids_list)
            text = tokenizer.decode(new, skip_special_tokens=True).strip()
        return {"choices": [{"text": text, "finish_reason": "length"}], "usage": {"completion_tokens": count}}

    return app


def run_baseline(bank_dir: str, port: int) -> None:
    import uvicorn

    uvicorn.run(baseline_app(Path(bank_dir)), host="127.0.0.1", port=port, log_level="warning")


def serve(
    argv: list[str],
    url: str,
    jobs: list[list[tuple[str, str]]],
    max_tokens: int,
    after: Any = None,
    classify_jobs: list[list[tuple[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Start a server process, warm it up, load-test it; ``after(url)`` runs before it is stopped.

    ``classify_jobs``: a classification load after the generation one, its result under "classify"."""
    log = Path(tempfile.mkstemp(prefix="serve-load-", suffix=".log")[1])
    with log.open("w") as sink:  # a file, not a pipe: nobody reads the server's log while it runs
        process = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, text=True)
    try:
        wait_ready(url, process, log)
        load_test(url, [jobs[0][:1]], 2)  # warm-up
        result = load_test(url, jobs, max_tokens)
        if classify_jobs:
            load_test(url, [classify_jobs[0][:1]], 0, "/v1/classify")  # warm-up
            result["classify"] = load_test(url, classify_jobs, 0, "/v1/classify")
        if after is not None:
            result["after"] = after(url, result)
        return result
    finally:
        process.terminate()
        process.wait(timeout=60)


def compare_answers(
    results: dict[str, dict[str, Any]],
    jobs: list[list[tuple[str, str]]],
    truth: dict[tuple[str, str], str],
    kinds_of: dict[str, str],
) -> None:
    """Print how many answers of each variant equal the reference, and which differ and why."""
    print("\nanswers equal to the reference (each request alone, greedy, full forward without a cache):")
    for name, r in results.items():
        keys = sorted(r["answers"])
        same = [k for k in keys if r["answers"][k].strip() == truth[jobs[k[0]][k[1]]]]
        print(f"  {name:<28}{len(same)}/{len(keys)}")
        differing = [k for k in keys if k not in same]
        if not differing:
            continue
        tasks = sorted({jobs[c][j][0] for c, j in differing})
        print(f"    differing: {len(differing)}, tasks {', '.join(f'{t} ({kinds_of[t]})' for t in tasks)}")
        explained = r.get("after")
        if explained is not None:
            import peft
            import transformers

            fixed, asked = explained
            rest = f"; {asked - fixed} still differ" if fixed < asked else ""
            print(
                f"    asked again with peft's use_cache=False: {fixed}/{asked} then equal the reference, so those "
                f"{fixed} differ because of peft {peft.__version__}'s cached generate on transformers "
                f"{transformers.__version__}, not because of the adapters' weights{rest}"
            )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--baseline-server", help=argparse.SUPPRESS)  # internal: BANK_DIR of the baseline
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--serve-args", default="", help="more flags for multitune serve, e.g. '--threads 1'")
    parser.add_argument(
        "--monitor",
        action="store_true",
        help="measure drift monitoring's cost: (i) with and without --no-monitor, generation and classification",
    )
    args = parser.parse_args(argv)
    if args.baseline_server:
        run_baseline(args.baseline_server, args.port)
        return

    folder = Path(tempfile.mkdtemp(prefix="serve-load-"))
    names = build_bank(folder / "bank", args.tasks, profiles=args.monitor)
    rng = random.Random(0)
    jobs = [
        [(rng.choice(names), rng.choice(PROMPTS)) for _ in range(args.requests)] for _ in range(args.clients)
    ]
    print(
        f"{MODEL}, {args.tasks} tasks ({', '.join(names)}), {args.clients} clients x {args.requests} requests, "
        f"{args.max_tokens} new tokens, greedy",
        file=sys.stderr,
    )

    def server_argv(port: int, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "multitune",
            "serve",
            str(folder / "bank"),
            "--port",
            str(port),
            "--device",
            "cpu",
            "--max-batch-size",
            str(max(32, args.clients)),
            "--log-level",
            "warning",
            *shlex.split(args.serve_args),
            *extra,
        ]

    results: dict[str, dict[str, Any]] = {}
    port = free_port()
    results["(i) multitune serve"] = serve(
        server_argv(port), f"http://127.0.0.1:{port}", jobs, args.max_tokens
    )
    print("  (i) done", file=sys.stderr)
    monitored = monitor_cost(server_argv, jobs, args, rng) if args.monitor else None
    results["(ii) in-process engine"] = in_process(folder / "bank", jobs, args.max_tokens)
    print("  (ii) done", file=sys.stderr)
    requests = [job for client in jobs for job in client]
    truth = reference(folder / "bank", requests, args.max_tokens)
    print("  reference done", file=sys.stderr)
    if not args.skip_baseline:

        def recheck(url: str, result: dict[str, Any]) -> tuple[int, int]:
            """The differing answers asked again without peft's cache: how many then equal the reference."""
            differing = sorted(
                {
                    jobs[c][j]
                    for (c, j), text in result["answers"].items()
                    if text.strip() != truth[jobs[c][j]]
                }
            )
            texts = ask(url, differing, args.max_tokens, use_cache=False)
            return sum(text.strip() == truth[job] for job, text in zip(differing, texts, strict=True)), len(
                differing
            )

        port = free_port()
        results["(iii) peft, one at a time"] = serve(
            [sys.executable, __file__, "--baseline-server", str(folder / "bank"), "--port", str(port)],
            f"http://127.0.0.1:{port}",
            jobs,
            args.max_tokens,
            after=recheck,
        )
        print("  (iii) done", file=sys.stderr)

    print(
        f"\n{MODEL}, {args.clients} concurrent clients x {args.requests} requests, {args.max_tokens} new tokens"
    )
    print(f"{'variant':<28}{'req/s':>8}{'tok/s':>9}{'p50 s':>8}{'p99 s':>8}{'wall s':>8}")
    for name, r in results.items():
        print(
            f"{name:<28}{r['requests_per_s']:>8.2f}{r['tokens_per_s']:>9.1f}{r['p50_s']:>8.2f}{r['p99_s']:>8.2f}"
            f"{r['wall_s']:>8.1f}"
        )
    server = results["(i) multitune serve"]
    checks = [
        (
            "(i) / (ii) in-process",
            server["requests_per_s"] / results["(ii) in-process engine"]["requests_per_s"],
            0.9,
        )
    ]
    if "(iii) peft, one at a time" in results:
        base = results["(iii) peft, one at a time"]
        checks.append(
            ("(i) / (iii) peft one at a time", server["requests_per_s"] / base["requests_per_s"], 3.0)
        )
    kinds_of = {name: kinds()[i % len(kinds())][1] for i, name in enumerate(names)}
    compare_answers(results, jobs, truth, kinds_of)
    if monitored is not None:
        checks += report_monitor_cost(monitored)
    print(f"\n{'target':<36}{'ratio':>8}{'goal':>8}  met")
    for name, ratio, goal in checks:
        print(f"{name:<36}{ratio:>8.2f}{goal:>8.2f}  {'yes' if ratio >= goal else 'NO'}")
    written: dict[str, Any] = {
        k: {m: v for m, v in r.items() if m not in ("answers", "after", "classify")}
        for k, r in results.items()
    }
    if monitored is not None:
        written["monitor"] = [
            {
                "monitor": on,
                "generation_rps": r["requests_per_s"],
                "classify_rps": r["classify"]["requests_per_s"],
            }
            for on, r in monitored
        ]
    (folder / "result.json").write_text(json.dumps(written, indent=2))


def monitor_cost(
    server_argv: Any, jobs: list[list[tuple[str, str]]], args: argparse.Namespace, rng: random.Random
) -> list[tuple[bool, dict[str, Any]]]:
    """(i) without and with monitoring, in the order off, on, on, off; each run's generation and
    classification results (same requests every time)."""
    classify_jobs = [
        [
            (rng.choice(CLASSIFY_TASKS), rng.sample(SENTENCES, rng.randint(1, 4)))
            for _ in range(4 * args.requests)
        ]
        for _ in range(args.clients)
    ]
    runs = []
    for on in (False, True, True, False):
        port = free_port()
        extra = () if on else ("--no-monitor",)
        result = serve(
            server_argv(port, *extra), f"http://127.0.0.1:{port}", jobs, args.max_tokens, None, classify_jobs
        )
        runs.append((on, result))
        print(f"  monitor {'on' if on else 'off'} done", file=sys.stderr)
    return runs


def report_monitor_cost(runs: list[tuple[bool, dict[str, Any]]]) -> list[tuple[str, float, float]]:
    """Print each run and return the two ratios: monitored over unmonitored throughput (means of two runs)."""
    print(f"\nmonitoring cost (ABBA order)\n{'run':<16}{'generation req/s':>18}{'classify req/s':>16}")
    for on, r in runs:
        print(
            f"{'on' if on else 'off':<16}{r['requests_per_s']:>18.2f}{r['classify']['requests_per_s']:>16.2f}"
        )

    def mean(on: bool, key: str | None) -> float:
        values = [(r[key] if key else r)["requests_per_s"] for o, r in runs if o == on]
        return sum(values) / len(values)

    return [
        ("monitor on / off, generation", mean(True, None) / mean(False, None), 0.95),
        ("monitor on / off, classification", mean(True, "classify") / mean(False, "classify"), 0.95),
    ]


if __name__ == "__main__":
    main()
