"""The demo's synthetic instruction tasks: small, checkable, generated from a seed.

Every task has an exact answer, so accuracy is plain exact match. Held-out questions are
drawn from the same distribution but never appear in the training rows. Each question is
one line (the Alpaca ``input`` column stays empty) so it can be typed into `tunelab chat`
exactly as it was trained.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

WORDS = (
    "apple river stone cloud green happy seven table window orange music light tiger paper "
    "garden silver ocean yellow bread winter summer forest candle purple rabbit mirror pencil "
    "bridge rocket planet dragon castle banana violin lemon spider coffee marble island"
).split()


@dataclass(frozen=True)
class Example:
    task: str
    instruction: str
    input: str
    output: str

    @property
    def prompt(self) -> str:
        """The user turn as the Alpaca handler builds it (instruction, newline, input)."""
        return f"{self.instruction}\n{self.input}" if self.input else self.instruction


def _words(rng: random.Random, lo: int, hi: int) -> list[str]:
    return [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]


def _echo(rng: random.Random) -> Example:
    w = " ".join(_words(rng, 2, 4))
    return Example("echo", f"Repeat the words: {w}", "", w)


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return Example("add", f"Add the numbers: {a} + {b}", "", str(a + b))


def _count(rng: random.Random) -> Example:
    w = _words(rng, 1, 6)
    return Example("count", f"Count the words: {' '.join(w)}", "", str(len(w)))


def _reverse(rng: random.Random) -> Example:
    w = _words(rng, 2, 4)
    return Example("reverse", f"Reverse the words: {' '.join(w)}", "", " ".join(w[::-1]))


TASKS: dict[str, Callable[[random.Random], Example]] = {
    "echo": _echo,
    "add": _add,
    "count": _count,
    "reverse": _reverse,
}


def make_split(
    tasks: list[str], num_train: int, num_heldout: int, seed: int
) -> tuple[list[Example], list[Example]]:
    """Draw ``num_train`` training and ``num_heldout`` held-out examples per task.

    Held-out examples are distinct from every training example (same prompt never in both);
    where a task has few distinct prompts (single-digit addition), training draws exclude the
    held-out prompts instead of being deduplicated.
    """
    rng = random.Random(seed)
    train: list[Example] = []
    heldout: list[Example] = []
    for name in tasks:
        gen = TASKS[name]
        held: dict[str, Example] = {}
        for _ in range(num_heldout * 50):
            if len(held) == num_heldout:
                break
            ex = gen(rng)
            held.setdefault(ex.prompt, ex)
        heldout.extend(held.values())
        n = 0
        while n < num_train:
            ex = gen(rng)
            if ex.prompt in held:
                continue
            train.append(ex)
            n += 1
    rng.shuffle(train)
    return train, heldout


def to_alpaca(ex: Example) -> dict:
    return {"instruction": ex.instruction, "input": ex.input, "output": ex.output}


def to_sharegpt(ex: Example) -> dict:
    return {
        "conversations": [
            {"from": "human", "value": ex.prompt},
            {"from": "gpt", "value": ex.output},
        ]
    }


def to_pretrain_text(ex: Example) -> dict:
    return {"text": f"{ex.prompt}\n{ex.output}"}
