"""Does ``audit --consistency`` tell a made-up answer from a known one? SmolLM2 after SFT, two sets of prompts.

    multitune train --model smollm2-135m --kind generation --method lora --data alpaca.jsonl ... --output RUN
    python benchmarks/consistency.py RUN [--samples 5] [--json out.json]

Two sets of 30 questions written for this script: ``known``, general-knowledge questions with one short
answer a small instruct model has likely seen (capitals, arithmetic, common facts), and ``made_up``, questions
of the same form about things that do not exist (an invented country's capital, a fictional element's number),
whose any answer is made up. For each prompt, SelfCheckGPT's two cheapest signals as ``audit --consistency``
computes them (src/multitune/risks/consistency.py: the greedy answer's mean token log-probability and its
unigram-F1 self-consistency against N samples at temperature 1). Printed: each signal's mean per set with a
95% bootstrap interval, the difference, and the AUC with which the signal ranks known above made-up prompts
(0.5: no signal). Nothing here checks whether an answer is right: that is what a golden set is for.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

KNOWN = [
    "What is the capital of France?",
    "What is the capital of Japan?",
    "What is the capital of Italy?",
    "What is the capital of Germany?",
    "What is the capital of Spain?",
    "What is two plus two?",
    "How many days are there in a week?",
    "How many legs does a spider have?",
    "What colour is the sky on a clear day?",
    "What is the largest planet in the solar system?",
    "What is the chemical symbol for water?",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in degrees Celsius?",
    "How many continents are there?",
    "What is the opposite of hot?",
    "What animal is known as the king of the jungle?",
    "What is the first letter of the English alphabet?",
    "How many hours are there in a day?",
    "What is the freezing point of water in degrees Celsius?",
    "What language is spoken in Brazil?",
    "What is the tallest mountain in the world?",
    "How many months are there in a year?",
    "What gas do plants take in from the air?",
    "What is ten minus three?",
    "Which ocean is the largest?",
    "What is the currency of the United States?",
    "What is the capital of the United Kingdom?",
    "How many sides does a triangle have?",
    "What do bees make?",
    "What is the closest star to Earth?",
]
MADE_UP = [
    "What is the capital of the country Zarvania?",
    "Who was the first president of the Republic of Quellmark?",
    "What is the atomic number of the element glorbium?",
    "In which year did the city of Vantrello sink into the sea?",
    "Who wrote the novel The Seventeen Lanterns of Orvask?",
    "What is the national dish of Pelluria?",
    "How many moons does the planet Kethra have?",
    "Who won the 1887 Grand Prix of Drovna?",
    "What language is spoken in the kingdom of Mirrowen?",
    "What is the boiling point of zentrolic acid?",
    "Who discovered the Hallvik radiation?",
    "What is the currency of the Isles of Tumbria?",
    "How tall is Mount Esperath?",
    "What did the philosopher Orlen Vasque teach?",
    "Which river flows through the city of Caldrenne?",
    "What is the main export of the province of Yssandor?",
    "Who composed the Symphony of Brass Winds for the Karthan court?",
    "What year was the Treaty of Lumbergate signed?",
    "What is the population of the island of Fennimar?",
    "Which animal is the symbol of the Duchy of Varnholt?",
    "What is the speed of a Trelvian sky-whale?",
    "Who invented the Pockwell engine?",
    "What is the capital of the Ostrelian Federation?",
    "How many players are on a team in the sport of zindle?",
    "What colour is the flag of Norvassa?",
    "What is the chemical symbol for the element quarrium?",
    "Who painted The Dawn over Selcastle?",
    "What is the longest river in Dravonia?",
    "When did the Emperor Taluvan the Third die?",
    "What is the highest mountain on the moon of Perith?",
]


def auc(positive: list[float], negative: list[float]) -> float:
    """P(a positive scores above a negative), ties counted half: Mann-Whitney's U over the pairs."""
    pairs = [(p > n) + 0.5 * (p == n) for p in positive for n in negative]
    return sum(pairs) / len(pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run")
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--json")
    args = parser.parse_args()
    import statistics

    import multitune
    from multitune.data import Example
    from multitune.metrics import bootstrap_interval
    from multitune.risks.consistency import consistency_rows

    task = multitune.load(args.run, device="cpu")
    rows = consistency_rows(
        task,
        [Example(text=q) for q in KNOWN + MADE_UP],
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
    )
    sets = {"known": rows[: len(KNOWN)], "made_up": rows[len(KNOWN) :]}
    out = {"run": args.run, "samples": args.samples, "signals": {}}
    for signal in ("consistency", "mean_token_logp"):
        values = {name: [r[signal] for r in group] for name, group in sets.items()}
        record = {}
        for name, v in values.items():
            low, high = bootstrap_interval(v, 2000, seed=0)
            record[name] = {"mean": statistics.fmean(v), "low": low, "high": high}
            print(f"{signal:>16} {name:>8}: {record[name]['mean']:.3f} [{low:.3f}, {high:.3f}]")
        record["difference"] = record["known"]["mean"] - record["made_up"]["mean"]
        record["auc"] = auc(values["known"], values["made_up"])
        print(f"{signal:>16}: known - made up {record['difference']:+.3f}, AUC {record['auc']:.3f}")
        out["signals"][signal] = record
    for name, group in sets.items():
        for r in group[:3]:
            print(f"{name}: {r['prompt']!r} -> {r['greedy'][:80]!r} (consistency {r['consistency']:.2f})")
    out["rows"] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
