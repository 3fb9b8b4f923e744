"""Synthetic tasks: seeded generators of (prompt, answer) string pairs, no data files.

Every prompt is ``"<tag>:<input>="``, so one model can tell the tasks apart, and every answer is a
short string of the tokenizer's characters (:data:`ALPHABET`). ``size`` sets a task's difficulty
(string length, number of pairs); the same sizes give the same distribution on every machine.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable

LETTERS = string.ascii_lowercase
DIGITS = string.digits
# Every character a prompt or answer can contain (the character tokenizer's vocabulary).
ALPHABET = DIGITS + LETTERS + ":=?+,#"


def _reverse(rng: random.Random, size: int) -> tuple[str, str]:
    s = "".join(rng.choice(LETTERS) for _ in range(size))
    return s, s[::-1]


def _sort(rng: random.Random, size: int) -> tuple[str, str]:
    s = "".join(rng.choice(LETTERS) for _ in range(size))
    return s, "".join(sorted(s))


def _shift(rng: random.Random, size: int) -> tuple[str, str]:
    s = "".join(rng.choice(LETTERS) for _ in range(size))
    return s, "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in s)


def _lookup(rng: random.Random, size: int) -> tuple[str, str]:
    keys = rng.sample(LETTERS, size)
    values = [rng.choice(DIGITS) for _ in keys]
    q = rng.randrange(size)
    return "".join(k + v for k, v in zip(keys, values)) + "?" + keys[q], values[q]


def _count(rng: random.Random, size: int) -> tuple[str, str]:
    pool = LETTERS[:4]  # few symbols so that counts spread over 0..size
    s = "".join(rng.choice(pool) for _ in range(size))
    q = rng.choice(pool)
    return s + "?" + q, str(s.count(q))


def _add(rng: random.Random, size: int) -> tuple[str, str]:
    a, b = (rng.randrange(10 ** (size - 1) if size > 1 else 0, 10**size) for _ in range(2))
    return f"{a}+{b}", str(a + b)


@dataclass(frozen=True)
class Task:
    """One synthetic task: ``tag`` prefixes its prompts; ``make(rng, size)`` draws (input, answer)."""

    name: str
    tag: str
    make: Callable[[random.Random, int], tuple[str, str]]
    min_size: int
    max_size: int
    doc: str

    def sample(self, rng: random.Random, size: int) -> tuple[str, str]:
        """One (prompt, answer) pair of the given size."""
        if not self.min_size <= size <= self.max_size:
            raise ValueError(f"size of task {self.name!r} must be in [{self.min_size}, {self.max_size}], "
                             f"got {size}")
        x, y = self.make(rng, size)
        return f"{self.tag}:{x}=", y


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("reverse", "rev", _reverse, 1, 24, "the letters in reverse order"),
    Task("sort", "srt", _sort, 1, 24, "the letters sorted"),
    Task("shift", "shf", _shift, 1, 24, "each letter replaced by the next one (z by a)"),
    Task("lookup", "kv", _lookup, 1, 26, "the digit stored under the queried key"),
    Task("count", "cnt", _count, 1, 40, "how often the queried letter occurs"),
    Task("add", "add", _add, 1, 9, "the sum of two size-digit numbers"),
)}


def get_task(name: str) -> Task:
    """The task called ``name`` (one of :data:`TASKS`)."""
    if not isinstance(name, str) or name not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {str(name)[:60]!r}")
    return TASKS[name]
