"""Shared test helpers: tiny random models of four families with a word-level tokenizer, and a toy task.

Everything here is built offline in well under a second; the real models and datasets are used only by
tests marked ``integration``, which skip when the packages or ../shared are absent.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest  # shared_dataset skips a test when ../shared is absent
import torch

DATASETS = Path(__file__).resolve().parents[3] / "shared" / "datasets"
FAMILIES = ["llama", "gpt2", "bert", "t5"]

WORDS = [
    "good",
    "great",
    "fine",
    "nice",
    "happy",
    "love",
    "excellent",
    "bad",
    "awful",
    "poor",
    "sad",
    "hate",
    "terrible",
    "movie",
    "film",
    "food",
    "place",
    "service",
    "the",
    "a",
    "is",
    "was",
    "very",
    "not",
    "really",
    "quite",
    "it",
    "this",
    "that",
    "and",
    "but",
    "so",
    "what",
    "why",
    "how",
    "where",
    "who",
]
POSITIVE = WORDS[:7]
NEGATIVE = WORDS[7:13]


def word_tokenizer():
    """A word-level tokenizer over the toy vocabulary, with pad/unk/bos/eos tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]", "[SEP]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A", pair="[BOS] $A [SEP] $B", special_tokens=[("[BOS]", 2), ("[SEP]", 4)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="[BOS]",
        eos_token="[EOS]",
        sep_token="[SEP]",
    )


def tiny_model(family: str):
    """A randomly initialised model of ``family`` with 2 layers and hidden size 32."""
    import transformers as t

    vocab = len(WORDS) + 5
    torch.manual_seed(0)
    if family == "llama":
        config = t.LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
            initializer_range=0.2,
        )
        return t.LlamaForCausalLM(config)
    if family == "gpt2":
        config = t.GPT2Config(
            vocab_size=vocab,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=0,
            initializer_range=0.2,
        )
        return t.GPT2LMHeadModel(config)
    if family == "bert":
        config = t.BertConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=128,
            pad_token_id=0,
            initializer_range=0.2,
        )
        return t.BertModel(config)
    if family == "t5":
        config = t.T5Config(
            vocab_size=vocab,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            pad_token_id=0,
            eos_token_id=3,
            decoder_start_token_id=0,
        )
        return t.T5ForConditionalGeneration(config)
    raise ValueError(family)


def tiny_base(family: str):
    from multitune.models import base_from_model

    return base_from_model(tiny_model(family), word_tokenizer(), source=f"tiny-{family}")


def toy_sentiment(n: int = 64, seed: int = 0):
    """Sentences whose label is decided by their sentiment words: learnable by any family."""
    from multitune.data import Example

    rng = random.Random(seed)
    filler = WORDS[13:]
    out = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.sample(POSITIVE if label == "pos" else NEGATIVE, 2) + rng.sample(filler, 3)
        rng.shuffle(words)
        out.append(Example(text=" ".join(words), label=label))
    return out


def toy_generation(n: int = 32, seed: int = 0):
    """Prompt -> response pairs with a fixed mapping (the response repeats the prompt's sentiment word)."""
    from multitune.data import Example

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        word = rng.choice(POSITIVE + NEGATIVE)
        reply = "good" if word in POSITIVE else "bad"
        out.append(Example(text=f"the movie was {word}", response=f"it is {reply}"))
    return out


def perturb(bank, task: str, seed: int, scale: float = 0.3) -> None:
    """Add seeded noise to a task's parameters, so that no method is the identity (LoRA's B, IA3's ones...)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in bank.task_parameters(task).values():
            param.add_(torch.randn(param.shape, generator=generator) * scale)


def save_generation_bank(model: Path, folder: Path, tasks: dict) -> Path:
    """Each of ``tasks`` (name -> (method, config)) a perturbed generation task over ``model``, saved as a bank
    folder ``folder`` (a full fine-tune perturbed less: its noise is on every weight)."""
    from multitune.bank import MultiTaskModel
    from multitune.models import load_base
    from multitune.storage import save_adapter

    for i, (task, (method, config)) in enumerate(tasks.items()):
        bank = MultiTaskModel(load_base(str(model), device="cpu"))
        bank.add_task(task, "generation", method, config)
        perturb(bank, task, seed=i, scale=0.3 if method != "full" else 0.05)
        save_adapter(bank, task, folder / task)
    return folder


def save_tiny(family: str, folder: Path) -> Path:
    """A tiny model of ``family`` with its tokenizer saved as a Hugging Face folder (what the CLI loads)."""
    tiny_model(family).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def shared_dataset(*parts: str) -> Path:
    path = DATASETS.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not available (../shared absent)")
    return path


def has_package(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
