"""``multitune export RUN --format merged|peft``: a trained task in a format other tools load without multitune.

``merged``: a plain Hugging Face folder. LoRA (DoRA too) and (IA)^3 are folded into the base weights
(``bank.merge``, then every wrapper is taken off its layer), full fine-tuning is its weights as they are, and the
``base`` method is the frozen base. A generation task is then the base's own architecture, which
``AutoModelForCausalLM`` / ``AutoModelForSeq2SeqLM`` load as they load the base. A classification task reads
its head from a pooled hidden state (mean over tokens on encoders, the last real token on decoders) with a
bias, which none of transformers' ``...ForSequenceClassification`` classes computes (BERT's reads a tanh
pooler, Llama's a bias-free score), so the folder carries the model class too: ``modeling_multitune.py``,
named in config.json's ``auto_map``, loaded by ``AutoModelForSequenceClassification.from_pretrained(folder,
trust_remote_code=True)`` (transformers' own mechanism for a class it does not ship), with the label names
in ``id2label``. Prompt and prefix tuning are inputs to the model, not weights, and bottleneck adapters add a
nonlinearity: none folds, so ``merged`` refuses them and says which format carries them.

``peft``: the peft package's folder (:func:`multitune.interop.peft.export_peft`), as ``export-peft`` writes it.
``gguf``: a llama.cpp LoRA adapter file (:mod:`multitune.interop.gguf_lora`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from multitune.errors import ConfigError
from multitune.methods.wrap import TaskLinear, innermost, replace_module
from multitune.storage import atomic_dir

if TYPE_CHECKING:
    from multitune.bank import MultiTaskModel

FORMATS = ("merged", "peft", "gguf")
MODELING_FILE = "modeling_multitune.py"
CLASS_NAME = "MultitunePooledClassifier"
FOLDS = {"lora", "ia3"}  # methods whose parameters fold into the weights (bank.merge)
AS_IS = {"full", "base"}  # methods whose weights are the model's own
WHY_NOT = {
    "prompt": "prompt tuning's virtual tokens are inputs, not weights: --format peft carries them "
    "(peft's PROMPT_TUNING)",
    "prefix": "prefix tuning's key/value positions are inputs, not weights: --format peft carries them "
    "(peft's PREFIX_TUNING)",
    "adapter": "bottleneck adapters add a nonlinear block to every layer, which no weight of the base can hold, "
    "and the peft package has no such method: serve the run with multitune",
    "prompting": "prompt engineering has no weights: its template and shots are in the run's adapter.json",
}


def export(bank: MultiTaskModel, task: str, fmt: str, output: str | Path) -> Path:
    """Write ``task`` of ``bank`` (a bank of that one task) as ``fmt`` to ``output``; returns the folder."""
    if fmt == "peft":
        from multitune.interop.peft import export_peft

        return export_peft(bank, task, output)
    if fmt == "merged":
        return export_merged(bank, task, output)
    if fmt == "gguf":
        from multitune.interop.gguf_lora import export_gguf

        return export_gguf(bank, task, output)
    raise ConfigError(f"unknown export format '{fmt}'; use one of {', '.join(FORMATS)}")


def check_mergeable(bank: MultiTaskModel, task: str) -> None:
    method = bank.spec(task).method
    if method not in FOLDS | AS_IS:
        why = WHY_NOT.get(method, "its parameters do not fold into the base weights")
        raise ConfigError(f"cannot export '{task}' ({method}) as a merged model: {why}")
    if bank.base.quantize:
        raise ConfigError(
            f"'{task}' was trained over a base quantized to {bank.base.quantize}: its weights are stored in 4 or "
            "8 bits, which a plain model folder cannot hold with the adapter folded in; use --format peft (the "
            "peft package loads the adapter over a quantized base, as QLoRA does)"
        )
    if bank.spec(task).kind == "domain":
        raise ConfigError(
            f"'{task}' is a domain adaptation (raw text): export the task trained on top of it, or load "
            "its adapter with multitune"
        )


def export_merged(bank: MultiTaskModel, task: str, output: str | Path) -> Path:
    """The task folded into a copy-free plain model (the bank is changed: use it for nothing else after)."""
    check_mergeable(bank, task)
    spec = bank.spec(task)
    if spec.method in FOLDS:
        bank.merge(task)  # refuses a quantized base, with the reason
    model = bank.base.model
    unwrap(model)
    model.config.multitune_task = {"name": task, "method": spec.method, "kind": spec.kind}
    with atomic_dir(Path(output)) as tmp:
        if spec.kind == "classification":
            _save_classifier(bank, task, tmp)
        else:
            model.save_pretrained(tmp)
        bank.base.tokenizer.save_pretrained(tmp)
    return Path(output)


def unwrap(model: torch.nn.Module) -> None:
    """Put every wrapped linear layer's innermost layer back in its place (after a merge: the plain model)."""
    outer = [
        name
        for name, module in model.named_modules()
        if isinstance(module, TaskLinear) and not name.endswith(".base_layer")
    ]
    for name in outer:
        replace_module(model, name, innermost(model.get_submodule(name)))


def _save_classifier(bank: MultiTaskModel, task: str, folder: Path) -> None:
    spec = bank.spec(task)
    arch = bank.base.arch
    backbone = bank.base.backbone()
    head = bank.heads[task]
    state = {f"backbone.{k}": v.detach().contiguous() for k, v in backbone.state_dict().items()}
    state.update({f"head.{k}": v.detach().contiguous() for k, v in head.state_dict().items()})
    state = _untie(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = bank.base.model.config
    config_class = type(config)
    saved: dict[str, Any] = config.to_dict()
    saved.update(
        {
            "architectures": [CLASS_NAME],
            "auto_map": {"AutoModelForSequenceClassification": f"{MODELING_FILE[:-3]}.{CLASS_NAME}"},
            "id2label": dict(enumerate(spec.labels)),
            "label2id": {label: i for i, label in enumerate(spec.labels)},
            "multitune_pooling": spec.pooling or "mean",  # as MultiTaskModel.classify reads it
            "multitune_arch": arch,
        }
    )
    saved.pop("num_labels", None)
    (folder / "config.json").write_text(json.dumps(saved, indent=2, default=str))
    (folder / MODELING_FILE).write_text(
        MODELING.replace("{config_module}", config_class.__module__).replace(
            "{config_class}", config_class.__name__
        )
    )


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied embeddings): give each its own copy."""
    seen: dict[int, str] = {}
    out = {}
    for key, value in state.items():
        pointer = value.untyped_storage().data_ptr()
        out[key] = value.clone() if pointer in seen else value
        seen.setdefault(pointer, key)
    return out


MODELING = '''"""A classifier exported by multitune: a pooled hidden state of the backbone through a linear head.

transformers' own ...ForSequenceClassification classes read another vector (BERT: a tanh pooler over [CLS];
Llama: the last token through a bias-free score), so this file, named in config.json's auto_map, is the model:
    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)
"""

import torch
from torch import nn
from transformers import AutoModel, AutoModelForSeq2SeqLM, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput
from {config_module} import {config_class} as _Config


class MultitunePooledClassifier(PreTrainedModel):
    config_class = _Config
    base_model_prefix = "backbone"

    def __init__(self, config):
        super().__init__(config)
        arch = config.multitune_arch
        self.backbone = (AutoModelForSeq2SeqLM if arch == "seq2seq" else AutoModel).from_config(config)
        size = getattr(config, "hidden_size", None) or config.d_model
        self.head = nn.Linear(size, len(config.id2label))
        self.post_init()

    def _init_weights(self, module):  # every weight comes from the folder
        pass

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        arch, pooling = self.config.multitune_arch, self.config.multitune_pooling
        if arch == "seq2seq":
            start = self.config.decoder_start_token_id or 0
            decoder = torch.full((input_ids.shape[0], 1), start, dtype=torch.long, device=input_ids.device)
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder,
                                output_hidden_states=True)
            pooled = out.decoder_hidden_states[-1][:, -1]
        else:
            extra = {}
            if arch == "decoder":  # positions count real tokens only: a left-padded row starts at 0
                extra["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
            if pooling == "cls":
                pooled = hidden[:, 0]
            elif pooling == "last":  # the last real token, whichever side the padding is on
                positions = torch.arange(attention_mask.shape[1], device=hidden.device)
                last = (attention_mask * positions).argmax(dim=1)
                pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
            else:
                weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        logits = self.head(pooled.to(self.head.weight.dtype))
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)
'''
