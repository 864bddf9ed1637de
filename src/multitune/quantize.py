"""A frozen base in 4 or 8 bits: ``--quantize nf4|fp4|int8`` (QLoRA, Dettmers et al. 2023; LLM.int8(), 2022).

Every linear layer of the base's transformer (not the LM head, not the embeddings, not the norms) becomes a
bitsandbytes layer: ``Linear4bit`` for nf4/fp4 (blocks of 64 weights, one absmax each, itself quantised:
QLoRA's double quantisation, about 4.1 bits a weight) or ``Linear8bitLt`` for int8 (one scale per output
row, activations quantised per row). int8 runs without LLM.int8()'s outlier decomposition (threshold 0, not
6.0): the outlier columns are chosen over the whole batch, so a row's output would depend on the other rows
of a mixed batch, and the bank's promise is that it never does. Both subclass ``nn.Linear``, so every wrapper that attaches
at a linear layer (LoRA, (IA)^3, adapters: methods/wrap.py) wraps them unchanged and adds its per-task
update on top of the dequantised product; prompt and prefix tuning never touch a linear layer.

Why we replace the layers ourselves rather than through transformers' ``BitsAndBytesConfig``: one code path
for every base we load, a Hugging Face folder, a GGUF file (which transformers dequantises to float32 on load
and cannot re-quantise) and an in-memory model (tests, ``base_from_model``); it costs one float copy of the
base at load time, never after. bitsandbytes 0.50 runs nf4, fp4 and int8 on CPU (pure PyTorch kernels) as
well as CUDA, so nothing here depends on a GPU.

What cannot be done over a quantized base is refused by the bank with the fix: merging a task into the
base weights and full fine-tuning (both write the base).
"""

from __future__ import annotations

import contextlib
import gc
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from multitune.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from multitune.models import Base

KINDS = ("nf4", "fp4", "int8")
HELP = "keep the frozen base's linear layers in 4 or 8 bits (bitsandbytes): nf4, fp4 or int8; adapters only"
FIX = "drop --quantize (load the base unquantized)"


def check_kind(kind: str | None) -> str | None:
    """``kind`` if it is one of :data:`KINDS` or None, else a ConfigError naming the choices."""
    if kind is not None and kind not in KINDS:
        raise ConfigError(f"--quantize must be one of {', '.join(KINDS)} (got '{kind}')")
    return kind


def _bnb() -> Any:
    try:
        import bitsandbytes
    except ImportError as error:
        raise ModelError(
            "--quantize needs bitsandbytes: pip install 'multitune[quantize]' (or bitsandbytes==0.50.2)"
        ) from error
    return bitsandbytes


def quantize_base(base: Base, kind: str) -> None:
    """Replace the base's linear layers by bitsandbytes ones, in place; the LM head stays as it is.

    Compute runs in the base's dtype (float32 on CPU, bfloat16 on a GPU that has it); the quantised weights
    never take a gradient.
    """
    check_kind(kind)
    bnb = _bnb()
    model = base.model
    device = base.device
    compute = next(model.parameters()).dtype
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and m is not head]
    if not names:
        raise ModelError(f"the base {base.source} has no linear layers to quantize; {FIX}")
    for name in names:
        old = model.get_submodule(name)
        assert isinstance(old, nn.Linear)  # (for mypy: the names are those of nn.Linear layers)
        new = _quantized(bnb, old, kind, compute)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new.to(device))
    # The float tensors left (embeddings, norms, the LM head) may still be views of the file transformers
    # memory-mapped at load: one of them keeps the whole mapping, and every page quantizing read, resident.
    # Their own copies let it go (SmolLM2-135M: 0.7 GB less RSS after an nf4 load).
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.clone()
    model.requires_grad_(False)
    base.quantize = kind
    _give_back_freed_memory()


def _give_back_freed_memory() -> None:
    """Return the float weights' freed heap pages to the OS (glibc keeps them otherwise: the RSS a user sees
    would stay that of the float base). Best effort: elsewhere than glibc it does nothing."""
    import ctypes
    import ctypes.util

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)


def _quantized(bnb: Any, old: nn.Linear, kind: str, compute: torch.dtype) -> nn.Module:
    has_bias = old.bias is not None
    weight = old.weight.data.detach().to("cpu")  # bnb quantises on the move to the device
    if kind == "int8":
        new = bnb.nn.Linear8bitLt(
            old.in_features, old.out_features, bias=has_bias, has_fp16_weights=False, threshold=0.0
        )
        new.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(
            old.in_features,
            old.out_features,
            bias=has_bias,
            compute_dtype=compute,
            compress_statistics=True,
            quant_type=kind,
        )
        new.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type=kind)
        # bitsandbytes repacks a 4-bit weight on a CPU with AVX512-BF16 at its first no-grad forward, with
        # its absmax rounded to bfloat16 (and it fails on layers narrower than 64): serving would then compute
        # another function than the one the adapters were trained over. One kernel for both.
        new.support_avx512bf16_for_cpu = False
    if has_bias:
        new.bias = nn.Parameter(old.bias.data.detach().to("cpu", compute), requires_grad=False)
    new.train(old.training)
    return new


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4- or 8-bit linear layer (without importing bitsandbytes)."""
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt") and isinstance(module, nn.Linear)


def resident_bytes(model: nn.Module) -> int:
    """Bytes the model's tensors hold: parameters, buffers and the quantisation statistics bitsandbytes keeps
    beside its weights (4-bit absmax and its own quantisation state; int8 row scales)."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if t is not None and isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for t in [*model.parameters(), *model.buffers()]:
        add(t)
    for module in model.modules():
        if not is_quantized_linear(module):
            continue
        state = getattr(module.weight, "quant_state", None)
        while state is not None:  # 4-bit: absmax, code; nested: the absmax's own state
            add(state.absmax)
            add(getattr(state, "code", None))
            state = getattr(state, "state2", None)
        add(getattr(module.weight, "SCB", None))
        add(getattr(getattr(module, "state", None), "SCB", None))
    return total
