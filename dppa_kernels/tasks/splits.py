"""Seeded, disjoint train/validation/test (or any named) splits of a synthetic task."""

from __future__ import annotations

import random
from typing import Iterable, Mapping

from .examples import Example
from .generators import get_task

_MAX_DRAWS_PER_EXAMPLE = 50  # give up when the task's space is too small for the requested sizes


def draw_splits(
    task: str,
    sizes: Mapping[str, int],
    *,
    seed: int,
    size_range: tuple[int, int],
    exclude: Iterable[str] = (),
) -> dict[str, list[Example]]:
    """Draw ``sum(sizes.values())`` distinct examples of ``task`` and cut them into named splits.

    Each example's size is uniform in ``size_range`` (inclusive). Prompts are unique across all
    splits and never in ``exclude`` (e.g. the prompts of splits drawn earlier), so the splits are
    disjoint. The result depends only on (task, sizes in order, seed, size_range, exclude): the
    generator is ``random.Random(f"{seed}:{task}")``.
    """
    t = get_task(task)
    lo, hi = size_range
    if not (isinstance(lo, int) and isinstance(hi, int) and t.min_size <= lo <= hi <= t.max_size):
        raise ValueError(f"size_range of task {task!r} must be integers within [{t.min_size}, {t.max_size}], "
                         f"got {tuple(size_range)}")
    for name, n in sizes.items():
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"sizes[{name!r}] must be a non-negative integer, got {n!r}")
    total = sum(sizes.values())
    rng = random.Random(f"{seed}:{task}")
    seen = set(exclude)
    drawn: list[Example] = []
    for _ in range(total * _MAX_DRAWS_PER_EXAMPLE):
        if len(drawn) == total:
            break
        prompt, answer = t.sample(rng, rng.randint(lo, hi))
        if prompt not in seen:
            seen.add(prompt)
            drawn.append(Example(prompt, answer))
    if len(drawn) < total:
        raise ValueError(f"task {task!r} with size_range {tuple(size_range)} has too few distinct prompts for "
                         f"{total} examples (found {len(drawn)})")
    out, start = {}, 0
    for name, n in sizes.items():
        out[name] = drawn[start:start + n]
        start += n
    return out
