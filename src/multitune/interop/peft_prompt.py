"""The peft package's prompt-learning formats: prompt tuning (PROMPT_TUNING) and prefix tuning (PREFIX_TUNING).

Both store one tensor, ``prompt_embeddings``: the soft prompt (n, hidden) or the folded prefixes
(n, num_layers * 2 * kv_dim) in the layout multitune also uses (see methods/prefix.py), so the tensors
pass through unchanged. PEFT always writes prefixes folded (its saved prefix has no MLP).

Prefix tuning on T5 is not converted: the peft package puts T5's prefixes in the decoder's self- and
cross-attention caches with a layer interleaving of its own; multitune's go to the decoder's
self-attention only.
"""

from __future__ import annotations

from typing import Any

import torch

from multitune.bank import MultiTaskModel
from multitune.errors import ConfigError
from multitune.interop.peft import PeftFormat, common_config, register_format
from multitune.methods.prefix import PrefixConfig, encoders, geometry
from multitune.methods.prompt import PromptConfig, prompts

KEY = "prompt_embeddings"


def _task_type(bank: MultiTaskModel) -> str:
    return {"decoder": "CAUSAL_LM", "seq2seq": "SEQ_2_SEQ_LM"}.get(bank.base.arch, "FEATURE_EXTRACTION")


def _prompt_export(bank: MultiTaskModel, task: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    prompt = prompts(bank)[task].detach()
    base_config = bank.base.model.config
    config = {
        **common_config(bank, "PROMPT_TUNING"),
        "task_type": _task_type(bank),
        "num_virtual_tokens": prompt.shape[0],
        "token_dim": prompt.shape[1],
        "num_transformer_submodules": 1,
        "num_layers": getattr(base_config, "num_hidden_layers", None),
        "num_attention_heads": getattr(base_config, "num_attention_heads", None),
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
    }
    return {KEY: prompt}, config


def _embeddings(cfg: dict[str, Any], state: dict[str, torch.Tensor], what: str) -> torch.Tensor:
    if KEY not in state:
        raise ConfigError(f"the PEFT {what} adapter has no '{KEY}' tensor (found {sorted(state)[:5]})")
    tensor = state[KEY]
    n = int(cfg.get("num_virtual_tokens") or tensor.shape[0])
    if tensor.shape[0] < n:
        raise ConfigError(
            f"the PEFT {what} adapter's {KEY} has {tensor.shape[0]} rows for {n} virtual tokens"
        )
    return tensor[:n]  # a seq2seq prompt may hold rows for a second submodule that PEFT's forward never reads


def _prompt_to_ours(
    bank: MultiTaskModel, cfg: dict[str, Any], state: dict[str, torch.Tensor]
) -> tuple[PromptConfig, dict[str, torch.Tensor]]:
    prompt = _embeddings(cfg, state, "prompt tuning")
    if prompt.shape[1] != bank.base.hidden_size:
        raise ConfigError(
            f"the PEFT prompt has width {prompt.shape[1]} but the base model's hidden size is "
            f"{bank.base.hidden_size}; it was trained for another base model"
        )
    return PromptConfig(num_virtual_tokens=prompt.shape[0], init="random"), {"prompt.embeddings": prompt}


def _prefix_export(bank: MultiTaskModel, task: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if bank.base.arch == "seq2seq":
        raise ConfigError(
            "prefix tuning on T5 cannot be exported to the peft package's format (its T5 prefixes "
            "also go to cross-attention); export covers decoders and encoders"
        )
    geo = geometry(bank)
    with torch.no_grad():
        prefixes = encoders(bank)[task]().detach()
    config = {
        **common_config(bank, "PREFIX_TUNING"),
        "task_type": _task_type(bank),
        "num_virtual_tokens": prefixes.shape[0],
        "token_dim": geo.heads * geo.head_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": geo.heads,
        "num_layers": geo.layers,
        "encoder_hidden_size": bank.base.hidden_size,
        "prefix_projection": False,
    }
    return {KEY: prefixes}, config


def _prefix_to_ours(
    bank: MultiTaskModel, cfg: dict[str, Any], state: dict[str, torch.Tensor]
) -> tuple[PrefixConfig, dict[str, torch.Tensor]]:
    if bank.base.arch == "seq2seq":
        raise ConfigError("PEFT prefix tuning adapters for T5 cannot be imported (a different cache layout)")
    prefixes = _embeddings(cfg, state, "prefix tuning")
    geo = geometry(bank)
    theirs = (cfg.get("num_layers"), cfg.get("num_attention_heads"), cfg.get("token_dim"))
    if prefixes.shape[1] != geo.width or theirs != (geo.layers, geo.heads, geo.heads * geo.head_dim):
        raise ConfigError(
            f"the PEFT prefixes (layers, heads, token_dim) = {theirs} do not fit the base model's "
            f"{(geo.layers, geo.heads, geo.heads * geo.head_dim)}; they were trained for another base"
        )
    return PrefixConfig(num_virtual_tokens=prefixes.shape[0], projection=False), {
        "prefix.embeddings": prefixes
    }


register_format(PeftFormat("prompt", "PROMPT_TUNING", _prompt_export, _prompt_to_ours))
register_format(PeftFormat("prefix", "PREFIX_TUNING", _prefix_export, _prefix_to_ours))
