"""Demo data the project generates itself: customer-support messages in four intents.

The messages are built from templates and slot fillers, so the task is learnable but not trivial for a
frozen encoder: the intents share vocabulary ("my order", "the app", "charged") and only the
combination decides the label. No dataset is copied into the project.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

_OPENERS = [
    "",
    "Hi, ",
    "Hello, ",
    "Hey team, ",
    "Good morning, ",
    "Sorry to bother you, ",
    "Quick question: ",
]
_CLOSERS = ["", " Thanks.", " Please help.", " Any update?", " This is urgent.", " Thank you in advance!"]
_THINGS = [
    "my order",
    "the package",
    "my parcel",
    "the headphones",
    "the blue jacket",
    "my laptop bag",
    "the coffee machine",
    "the running shoes",
    "the phone case",
    "my desk lamp",
]
_INTENTS: dict[str, list[str]] = {
    "billing": [
        "I was charged twice for {thing}.",
        "why is there an extra fee on my invoice for {thing}?",
        "the price I paid for {thing} is higher than the one on the website.",
        "my card was billed but {thing} shows as unpaid.",
        "can I get a copy of the invoice for {thing}?",
        "the discount code was not applied when I paid for {thing}.",
    ],
    "shipping": [
        "{thing} has not arrived yet and it has been two weeks.",
        "where is {thing}? The tracking page has not changed for days.",
        "the courier left {thing} at the wrong address.",
        "can you ship {thing} to my office instead of my home?",
        "{thing} was delivered to a neighbour and I cannot find it.",
        "how long does delivery of {thing} take to Spain?",
    ],
    "returns": [
        "I want to send {thing} back, it does not fit.",
        "{thing} arrived broken, how do I return it?",
        "can I exchange {thing} for a different size?",
        "I returned {thing} last week, when do I get my money back?",
        "{thing} is not what I expected, I would like a refund.",
        "do I have to pay for the return label for {thing}?",
    ],
    "account": [
        "I cannot log in to see {thing} in my orders.",
        "how do I change the email on my account? I ordered {thing} with the old one.",
        "the app keeps logging me out when I open the page of {thing}.",
        "I forgot my password and need to check on {thing}.",
        "please delete my account after {thing} is delivered.",
        "my profile shows someone else's name next to {thing}.",
    ],
}


# Side remarks that name another intent's topic: the label follows the request, not every word in it.
_ASIDES: dict[str, list[str]] = {
    "billing": [" I paid by card, if that matters.", " My invoice looked fine otherwise."],
    "shipping": [" The courier was friendly at least.", " I usually get my parcels on time."],
    "returns": [" I have returned things before without trouble.", " I kept the original box."],
    "account": [" I am logged in on my phone right now.", " My email address is the same as before."],
}


def make_demo_rows(n: int = 400, seed: int = 0) -> list[dict[str, str]]:
    """``n`` labelled messages, balanced over the four intents, deterministic for a seed."""
    rng = random.Random(seed)
    labels = sorted(_INTENTS)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        text = rng.choice(_INTENTS[label]).format(thing=rng.choice(_THINGS))
        opener = rng.choice(_OPENERS)
        text = opener + (text[0].lower() + text[1:] if opener else text[0].upper() + text[1:])
        if rng.random() < 0.4:
            text += rng.choice(_ASIDES[rng.choice([other for other in labels if other != label])])
        rows.append({"message": text + rng.choice(_CLOSERS), "intent": label})
    rng.shuffle(rows)
    return rows


def write_demo_csv(path: str | Path, n: int = 400, seed: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["message", "intent"])
        writer.writeheader()
        writer.writerows(make_demo_rows(n, seed))
    return path
