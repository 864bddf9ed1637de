"""``multitune export RUN --format gguf``: a LoRA task as a llama.cpp adapter (``llama-cli -m base.gguf --lora``).

The file is what llama.cpp's own ``convert_lora_to_gguf.py`` writes for a peft folder: ``general.type =
adapter``, ``adapter.type = lora``, ``adapter.lora.alpha``, and per adapted weight two tensors named after the
base's GGUF tensor (``blk.N.attn_q.weight.lora_a`` of shape (r, in), ``...lora_b`` of shape (out, r), the
layout llama.cpp multiplies as ``b @ (a @ x)``), float32. llama.cpp scales by ``alpha / r``; an rsLoRA task's
``alpha / sqrt(r)`` is written as the alpha that gives it. The names come from the gguf package's tensor
map, and the query and key rows are permuted as llama.cpp's converter permutes the base's (its rotary layout
interleaves the two halves of each head), so the adapter lands on the rows it trained.

Written with the ``gguf`` package (the one transformers reads GGUF bases with). Only the llama layout
(Llama, Mistral, SmolLM2) is written: the layout checked against llama.cpp itself (tests/interop/
test_gguf_lora.py, with llama-cpp-python). DoRA's magnitude vector, (IA)^3 and the other methods have no
llama.cpp adapter form and are refused.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from multitune.errors import ConfigError

if TYPE_CHECKING:
    from multitune.bank import MultiTaskModel

ARCHS = {"llama": "llama", "mistral": "llama"}  # HF model_type -> llama.cpp architecture (permuted q/k rows)


def _permute(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's ``LlamaModel.permute`` of a q/k weight's output rows (here: LoRA's B, shape (out, r))."""
    return (
        rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


def check_gguf(bank: MultiTaskModel, task: str) -> None:
    spec = bank.spec(task)
    if spec.method != "lora":
        raise ConfigError(
            f"cannot export '{task}' ({spec.method}) as a llama.cpp adapter: llama.cpp's adapters are LoRA; "
            "use --format merged (LoRA, (IA)^3, full) or --format peft"
        )
    if spec.config.get("use_dora"):
        raise ConfigError(
            f"cannot export '{task}' as a llama.cpp adapter: it is DoRA, and llama.cpp's LoRA has no magnitude "
            "vector; use --format merged (then convert the folder with llama.cpp's convert_hf_to_gguf.py)"
        )
    if spec.kind != "generation" or bank.base.arch != "decoder":
        raise ConfigError(
            f"cannot export '{task}' as a llama.cpp adapter: llama.cpp runs decoder generation tasks "
            f"(this is a {spec.kind} task on a {bank.base.arch}); use --format merged or peft"
        )
    model_type = getattr(bank.base.model.config, "model_type", None)
    if model_type not in ARCHS:
        raise ConfigError(
            f"cannot export '{task}' as a llama.cpp adapter: its base is a {model_type} model, and only the "
            f"llama layout ({', '.join(sorted(ARCHS))}) is written and checked against llama.cpp; use --format "
            "merged or peft"
        )


def export_gguf(bank: MultiTaskModel, task: str, output: str | Path) -> Path:
    """Write ``task`` (LoRA on a llama-layout decoder) as a llama.cpp LoRA adapter file; returns its path."""
    import gguf

    check_gguf(bank, task)
    if bank.tasks[task].stack_on is not None:  # LoRA on LoRA: the one LoRA it equals
        from multitune.compose.stack import flatten_lora

        flat = flatten_lora(bank, task, f"{task[:56]}-flat")
        try:
            return export_gguf(bank, flat, output)
        finally:
            bank.remove_task(flat)
    spec = bank.spec(task)
    config = bank.base.model.config
    rank, alpha = int(spec.config["rank"]), float(spec.config["alpha"])
    scale = alpha / math.sqrt(rank) if spec.config.get("rslora") else alpha / rank
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(config.num_hidden_layers))
    own = bank.task_state_dict(task)
    tensors: list[tuple[str, torch.Tensor]] = []
    for key in sorted(k for k in own if k.endswith(".lora_A.weight")):
        module = key[: -len(".lora_A.weight")]
        a, b = own[key].float(), own[f"{module}.lora_B.weight"].float()
        target = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if target is None:
            raise ConfigError(
                f"cannot export '{task}' as a llama.cpp adapter: llama.cpp has no tensor for {module}; "
                "use --format merged or peft"
            )
        if module.endswith("q_proj"):
            b = _permute(b, heads)
        elif module.endswith("k_proj"):
            b = _permute(b, kv_heads)
        tensors += [(f"{target}.lora_a", a), (f"{target}.lora_b", b)]
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    try:
        writer = gguf.GGUFWriter(str(partial), ARCHS[config.model_type])
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, scale * rank)  # llama.cpp scales by alpha / r
        writer.add_name(task)
        for name, tensor in tensors:
            writer.add_tensor(name, tensor.detach().cpu().contiguous().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(partial, output)
    finally:
        partial.unlink(missing_ok=True)
    return output
