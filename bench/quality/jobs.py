"""What a method of the harness gets (a job) and returns (an outcome), and the shared
(density, λ) tuning of merges on the mean validation accuracy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

import torch


@dataclass
class PruneJob:
    base: Mapping[str, torch.Tensor]
    finetuned: Mapping[str, torch.Tensor]
    density: float
    units: list  # tensor names to prune
    validate: Callable[[Mapping[str, torch.Tensor]], float]  # state dict -> validation accuracy
    task: str = ""
    seeds: tuple = (0, 1, 2)  # for randomised methods
    factors: tuple = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0)  # candidate global factors
    alpha_evals: int = 12  # candidates of a DPPA α search


@dataclass
class PruneOutcome:
    states: list  # pruned state dicts (one per seed for random methods)
    chosen: dict = field(default_factory=dict)


@dataclass
class MergeJob:
    base: Mapping[str, torch.Tensor]
    finetuned: Mapping[str, Mapping[str, torch.Tensor]]  # task -> state dict
    validate: Callable[[Mapping[str, torch.Tensor]], dict]  # state dict -> {task: validation accuracy}
    lambdas: tuple = (1.0,)
    densities: tuple = (0.2,)
    seed: int = 0
    validate_task: Optional[Callable[[Mapping[str, torch.Tensor], str], float]] = None  # (state, task) -> accuracy
    alpha_evals: int = 12  # candidates of a DPPA α search, per task
    memo: dict = field(default_factory=dict)  # work shared between methods of one run (e.g. α searches)


@dataclass
class MergeOutcome:
    state: dict
    chosen: dict = field(default_factory=dict)


def tuned_over(job: MergeJob, densities, build: Callable[[Optional[float], float], tuple]) -> MergeOutcome:
    """The merge whose (density, λ) over ``densities`` × ``job.lambdas`` maximises the mean
    validation accuracy; ``build(density, λ) -> (state, extra chosen fields)``. Ties keep the
    earlier grid point. ``chosen`` holds the winner, its extras and the whole grid."""
    best, table = None, []
    for density in densities:
        for lam in job.lambdas:
            state, extra = build(density, lam)
            val = job.validate(state)
            mean = sum(val.values()) / len(val)
            table.append({"density": density, "lambda": lam, "validation_mean": mean})
            if best is None or mean > best[0]:
                best = (mean, state, density, lam, extra)
    chosen = {"lambda": best[3], "validation_mean": best[0], **best[4], "grid": table}
    if best[2] is not None:
        chosen["density"] = best[2]
    return MergeOutcome(best[1], chosen)
