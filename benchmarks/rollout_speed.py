"""Rollout generation speed: sampling through the training bank (what ``ppo`` and ``grpo`` do) against plain
transformers ``generate`` on the same model and batch.

    python benchmarks/rollout_speed.py [--batch 32] [--new-tokens 16] [--rounds 5] [--model smollm2-135m]

The prompts are ``--batch`` SST-2 prompt stubs through the model's chat template (left-padded, as a rollout
batch is). Variants, one process, interleaved rounds after a warm-up (benchmarks/mixed_batch.py's
``run_rounds``), the median per variant:

(a) plain: a separate copy of the base loaded by transformers alone (no wrappers anywhere), ``generate``;
(b) rollout: ``bank.generate`` of a bank holding the policy (a LoRA task, r 8 on q/v, its tensors perturbed so
    that it is not the identity: mixed_batch.py's ``build_bank``) with every row routed to it: the sampler of ``ppo``/``grpo``;
(c) rollout, G per prompt: (b) with the batch made of batch/8 prompts x 8 samples (GRPO's groups).

Every variant samples (temperature 1, top_k 0) exactly ``--new-tokens`` tokens per row (``min_new_tokens``),
so tokens/s = batch x new tokens / seconds compares the same work. Prints tokens/s and (b)/(a). Run it alone.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dpo_own_samples import prompt_stubs  # noqa: E402
from mixed_batch import build_bank, run_rounds  # noqa: E402


def main() -> None:
    from multitune.data import Example
    from multitune.encode import collate, encode_task, to_device
    from multitune.models import load_base

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    bank = build_bank(load_base(args.model, device="cpu"), ["lora8"])  # every tensor perturbed from identity
    policy = bank.slots[0]
    plain = load_base(args.model, device="cpu")
    tokenizer = bank.base.tokenizer
    device = bank.base.device

    def batch_of(prompts: list[str]) -> dict[str, torch.Tensor]:
        features = encode_task(bank, policy, [Example(text=p) for p in prompts], 128, with_target=False)
        return to_device(
            collate(features, tokenizer.pad_token_id, bank.slots.index(policy), padding_side="left"), device
        )

    stubs = prompt_stubs(args.batch, 0)
    flat = batch_of(stubs)
    grouped = batch_of([p for p in stubs[: max(1, args.batch // 8)] for _ in range(8)])
    opts = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": True,
            "temperature": 1.0, "top_k": 0, "pad_token_id": tokenizer.pad_token_id}  # fmt: skip

    def plain_generate() -> torch.Tensor:
        with torch.no_grad():
            return plain.model.generate(
                input_ids=flat["input_ids"], attention_mask=flat["attention_mask"], **opts
            )

    def rollout(batch: dict[str, torch.Tensor]):  # noqa: ANN202
        def run() -> torch.Tensor:
            with torch.no_grad():
                return bank.generate(
                    batch["input_ids"], batch["attention_mask"], batch["task_ids"].clone(), **opts
                )

        return run

    variants = {
        "plain generate": plain_generate,
        "rollout (bank)": rollout(flat),
        "rollout, groups of 8": rollout(grouped),
    }
    print(f"{args.model}, batch {args.batch}, prompt width {flat['input_ids'].shape[1]}, {args.new_tokens} new tokens, "
          f"threads {torch.get_num_threads()}", file=sys.stderr)  # fmt: skip
    seconds = run_rounds(variants, args.rounds, device)
    rate = {name: args.batch * args.new_tokens / s for name, s in seconds.items()}
    for name, value in rate.items():
        print(f"{name:24s} {value:8.1f} tokens/s  ({seconds[name]:.3f} s per batch)")
    print(f"rollout / plain generate: {rate['rollout (bank)'] / rate['plain generate']:.3f}")
    print(
        f"rollout groups of 8 / plain generate: {rate['rollout, groups of 8'] / rate['plain generate']:.3f}"
    )


if __name__ == "__main__":
    main()
