"""The compared methods, as tables of name → callable, so rows can be added without touching the runner.

A pruning method gets a :class:`PruneJob` (one expert, one density) and returns a
:class:`PruneOutcome`: the pruned expert state dicts to score on the test split (several for
randomised methods, whose test scores are averaged) and the hyperparameters it chose with
``job.validate``. A merging method gets a :class:`MergeJob` (all experts) and returns a
:class:`MergeOutcome`. Methods must choose hyperparameters with the validation callables only.
Pruning acts on the units (linear weights inside decoder blocks); other deltas stay dense.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

import dppa_kernels as dk
from dppa_kernels.tasks import task_deltas

from .dppa_methods import dp, dppa_searched, dppa_task_arithmetic, dppa_ties
from .jobs import MergeJob, MergeOutcome, PruneJob, PruneOutcome, tuned_over

__all__ = ["MERGE_METHODS", "PRUNE_METHODS", "MergeJob", "MergeOutcome", "PruneJob", "PruneOutcome", "dare",
           "dare_ties", "magnitude", "scaled_magnitude", "task_arithmetic", "ties", "with_unit_deltas"]


def with_unit_deltas(job: PruneJob, prune_one: Callable[[str, torch.Tensor], torch.Tensor]) -> dict:
    """The expert with each unit's delta Δ replaced by ``prune_one(name, Δ)``."""
    deltas = task_deltas(job.base, {k: job.finetuned[k] for k in job.base})
    out = dict(job.finetuned)
    for n in job.units:
        out[n] = job.base[n] + prune_one(n, deltas[n]).to(job.base[n].dtype)
    return out


def magnitude(job: PruneJob) -> PruneOutcome:
    """Keep the ``density`` fraction of largest |Δ| per tensor (exact count)."""
    return PruneOutcome([with_unit_deltas(job, lambda n, d: dk.prune(d, "magnitude", density=job.density))])


def dare(job: PruneJob) -> PruneOutcome:
    """Keep each element with probability ``density`` and rescale by 1/density (DARE), per seed."""
    seeds = job.seeds
    return PruneOutcome([
        with_unit_deltas(job, lambda n, d, s=s: dk.prune(d, "dare", density=job.density, seed=s, name=n,
                                                         rescale="inv_density"))
        for s in seeds], {"seeds": list(seeds)})


def scaled_magnitude(job: PruneJob) -> PruneOutcome:
    """Magnitude pruning, then every kept delta × one global factor chosen on validation (the
    control for DPPA's amplification: one searched number instead of per-band factors)."""
    pruned = with_unit_deltas(job, lambda n, d: dk.prune(d, "magnitude", density=job.density))
    best, best_state, scores = None, None, {}
    for f in job.factors:
        state = {k: (job.base[k] + f * (v - job.base[k]) if k in job.units else v) for k, v in pruned.items()}
        scores[f] = job.validate(state)
        if best is None or scores[f] > scores[best]:  # ties keep the earlier (smaller) factor
            best, best_state = f, state
    return PruneOutcome([best_state], {"factor": best, "validation": scores})


def _merged(base: Mapping, finetuned: Mapping, method: str, seed: int, **params) -> dict:
    tasks = list(finetuned)
    out = {}
    for k, b in base.items():
        if not b.is_floating_point():
            out[k] = b
            continue
        deltas = [finetuned[t][k] - b for t in tasks]
        out[k] = dk.merge_deltas(deltas, b, method=method, seed=seed, name=k, **params)
    return out


def _tuned_merge(job: MergeJob, method: str, densities) -> MergeOutcome:
    """The merge whose (density, λ) maximises the mean validation accuracy over tasks."""
    def build(density, lam: float) -> tuple:
        params = {"lambda": lam} if density is None else {"lambda": lam, "density": density}
        return _merged(job.base, job.finetuned, method, job.seed, **params), {}

    return tuned_over(job, densities, build)


def task_arithmetic(job: MergeJob) -> MergeOutcome:
    """base + λ·ΣΔ_i, λ chosen on validation."""
    return _tuned_merge(job, "task_arithmetic", (None,))


def ties(job: MergeJob) -> MergeOutcome:
    """TIES (magnitude trim, sign election, disjoint mean; mergekit semantics), density and λ on validation."""
    return _tuned_merge(job, "ties", job.densities)


def dare_ties(job: MergeJob) -> MergeOutcome:
    """DARE-TIES (random drop, L1 rescale, sign election; mergekit semantics), density and λ on validation."""
    return _tuned_merge(job, "dare_ties", job.densities)


# Rows of the retention table and of the merge table, in display order.
PRUNE_METHODS: dict = {
    "magnitude": magnitude,
    "DARE": dare,
    "DP": dp,
    "DPPA (searched α)": dppa_searched,
    "magnitude × factor": scaled_magnitude,
}
MERGE_METHODS: dict = {
    "task arithmetic": task_arithmetic,
    "TIES": ties,
    "DARE-TIES": dare_ties,
    "DPPA + task arithmetic": dppa_task_arithmetic,
    "DPPA + TIES": dppa_ties,
}
