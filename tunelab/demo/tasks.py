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

# Few distinct words: a small model learns to copy each of them in a couple of hundred steps
# (with 40 words the same model needs several times as many).
WORDS = "apple river stone cloud tiger paper garden ocean bread candle rocket violin".split()


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


# Echo and reverse use a fixed number of words: the answer's i-th word then sits at a fixed
# distance from its source, which a small model learns in a few hundred steps on a CPU. Words
# are quoted so the first one is the same token (no leading space) in question and answer.
NUM_COPY_WORDS = 3


def _echo(rng: random.Random) -> Example:
    w = " ".join(_words(rng, NUM_COPY_WORDS, NUM_COPY_WORDS))
    return Example("echo", f'Repeat the words "{w}"', "", w)


def _add(rng: random.Random) -> Example:
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return Example("add", f"Add the numbers: {a} + {b}", "", str(a + b))


def _count(rng: random.Random) -> Example:
    w = _words(rng, 1, 6)
    return Example("count", f'Count the words "{" ".join(w)}"', "", str(len(w)))


def _reverse(rng: random.Random) -> Example:
    w = _words(rng, NUM_COPY_WORDS, NUM_COPY_WORDS)
    return Example("reverse", f'Reverse the words "{" ".join(w)}"', "", " ".join(w[::-1]))


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
    """The exchange as a ChatML transcript (what a chat log in a pretraining corpus looks
    like); preprocess's ``--append-eod`` closes it with ``<|im_end|>``."""
    return {"text": f"<|im_start|>user\n{ex.prompt}<|im_end|>\n<|im_start|>assistant\n{ex.output}"}
