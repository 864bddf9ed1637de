"""``multitune export-peft`` and ``import-peft``: flags and entry points."""

from __future__ import annotations

import argparse
from pathlib import Path

from multitune.cli_commands import Command
from multitune.errors import ConfigError


def cmd_export_peft(args: argparse.Namespace) -> None:
    from multitune.api import load
    from multitune.interop.peft import export_peft

    task = load(args.run, model=args.model, device="cpu")
    folder = export_peft(task.bank, task.task, args.output)
    extra = (
        (
            f" (the classification head and labels are beside it, in {folder}/multitune_head.safetensors and "
            "multitune_task.json, which PEFT ignores and import-peft reads)"
        )
        if task.spec.kind == "classification"
        else ""
    )
    print(
        f"wrote the {task.spec.method} adapter of '{task.task}' in the peft package's format to {folder}{extra}"
    )


def cmd_export(args: argparse.Namespace) -> None:
    from multitune.api import load
    from multitune.interop.export import check_mergeable, export
    from multitune.interop.gguf_lora import check_gguf

    task = load(args.run, model=args.model, device="cpu")
    if args.format == "merged":
        check_mergeable(task.bank, task.task)  # before anything is written
    if args.format == "gguf":
        check_gguf(task.bank, task.task)
    folder = export(task.bank, task.task, args.format, args.output)
    spec = task.spec
    if args.format == "gguf":
        print(
            f"wrote the LoRA of '{task.task}' as a llama.cpp adapter to {folder}: llama-cli -m BASE.gguf --lora "
            f"{folder} (BASE.gguf: the GGUF of {task.bank.base.source}), or ADAPTER {folder} in an Ollama Modelfile"
        )
    elif args.format == "peft":
        print(f"wrote the {spec.method} adapter of '{task.task}' in the peft package's format to {folder}")
    elif spec.kind == "classification":
        print(
            f"wrote '{task.task}' ({spec.method}, labels {', '.join(spec.labels)}) as a plain model to {folder}: "
            f"AutoModelForSequenceClassification.from_pretrained('{folder}', trust_remote_code=True) loads it "
            "(its pooling and head are in modeling_multitune.py)"
        )
    else:
        print(
            f"wrote '{task.task}' ({spec.method}{' folded in' if spec.method in ('lora', 'ia3') else ''}) as a "
            f"plain model to {folder}: {'AutoModelForSeq2SeqLM' if task.bank.base.arch == 'seq2seq' else 'AutoModelForCausalLM'}"
            f".from_pretrained('{folder}') loads it"
        )


def cmd_import_peft(args: argparse.Namespace) -> None:
    from multitune.bank import MultiTaskModel
    from multitune.interop.peft import HEAD_FILE, import_peft, read_peft_config
    from multitune.models import load_base
    from multitune.storage import save_adapter

    source = Path(args.folder)
    model = args.model or read_peft_config(source).get("base_model_name_or_path")
    if not model:
        raise ConfigError(f"{source}/adapter_config.json names no base model; pass --model")
    bank = MultiTaskModel(load_base(model, device="cpu"))
    spec = import_peft(bank, source, args.task, args.kind, args.labels)
    out = save_adapter(bank, args.task, args.output)
    head = ""
    if spec.kind == "classification":
        head = f", labels {', '.join(spec.labels)}" + (
            ""
            if (source / HEAD_FILE).is_file() and not args.labels
            else "; its head is untrained: train it before use"
        )
    print(f"imported {spec.method} {spec.kind} task '{args.task}' on {model} into {out}{head}")


def add_export_peft_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder (or adapter folder) written by 'multitune train'")
    p.add_argument("--output", required=True, help="the PEFT folder to write")
    p.add_argument("--model", help="the base to load it on (default: the recorded one)")


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    from multitune.interop.export import FORMATS

    p.add_argument("run", help="run folder (or adapter folder) written by 'multitune train'")
    p.add_argument(
        "--format",
        required=True,
        choices=FORMATS,
        help="merged: a plain Hugging Face model folder with LoRA/(IA)^3 folded in (full fine-tuning as is); "
        "peft: the peft package's adapter folder; gguf: a llama.cpp LoRA adapter file (decoder LoRA tasks)",
    )
    p.add_argument(
        "--output",
        required=True,
        help="the folder to write, or the .gguf file for gguf (replaced atomically)",
    )
    p.add_argument("--model", help="the base to load it on (default: the recorded one)")


def add_import_peft_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="folder with adapter_config.json and adapter_model.safetensors")
    p.add_argument("--output", required=True, help="the multitune adapter folder to write")
    p.add_argument("--task", default="imported", help="task name (default: imported)")
    p.add_argument("--model", help="base model (default: the one the PEFT config names)")
    p.add_argument(
        "--kind",
        choices=["classification", "generation"],
        help="the task's kind (default: what the folder says: a multitune export's task file, else PEFT's "
        "task_type SEQ_CLS / CAUSAL_LM / SEQ_2_SEQ_LM, else classification on an encoder and generation "
        "otherwise)",
    )
    p.add_argument(
        "--labels",
        type=lambda text: [x.strip() for x in text.split(",") if x.strip()],
        metavar="A,B,...",
        help="classification: the label names, comma-separated, when the folder does not hold them "
        "(a folder written by 'multitune export-peft' does, with the head)",
    )


def commands() -> list[Command]:
    return [
        Command(
            "export",
            "write a trained task as a plain Hugging Face model (merged) or a peft adapter folder",
            add_export_arguments,
            cmd_export,
        ),
        Command(
            "export-peft",
            "write a trained task as a peft package adapter folder",
            add_export_peft_arguments,
            cmd_export_peft,
        ),
        Command(
            "import-peft",
            "turn a peft package adapter folder into a multitune task",
            add_import_peft_arguments,
            cmd_import_peft,
        ),
    ]
