"""DPPA rows of the harness, through the whole-model API (``dppa_kernels.dppa.DPPA``).

DPPA at density d uses the two levels (d/2, d): α = (1, 1) keeps d (plain DP), the searched α may
drop the lower band (α_lo = 0 keeps d/2) and amplify the upper one. The α search is the package's
``greedy`` coordinate ascent on the validation callables, capped at ``job.alpha_evals`` candidates.
"""

from __future__ import annotations

from typing import Mapping

from dppa_kernels.dppa import DPPA

from .jobs import MergeJob, MergeOutcome, PruneJob, PruneOutcome, tuned_over


def levels(density: float) -> tuple:
    """The DPPA levels for a target density d: (d/2, d)."""
    return (density / 2, density)


def _one_expert(job: PruneJob) -> DPPA:
    return DPPA.from_models(job.base, [job.finetuned], densities=levels(job.density), labels=[job.task or "expert"])


def _state(job_base: Mapping, merged: Mapping) -> dict:
    """The merge in the base's dtypes (DPPA returns the working dtype)."""
    return {k: v.to(job_base[k].dtype) for k, v in merged.items()}


def dp(job: PruneJob) -> PruneOutcome:
    """Plain DP: DPPA's per-unit density allocation around ``density``, every kept delta × 1."""
    d = _one_expert(job)
    return PruneOutcome([_state(job.base, d.merge((1.0, 1.0)))],
                        {"alphas": [1.0, 1.0], "realised_density": round(d.realised_density((1.0, 1.0))[0], 4)})


def dppa_searched(job: PruneJob) -> PruneOutcome:
    """DPPA with α = (α_hi, α_lo) searched on the task's validation split (greedy, ``alpha_evals`` candidates)."""
    d = _one_expert(job)
    res = d.search(job.validate, strategy="greedy", max_evals=job.alpha_evals)
    best = res.best[0]
    return PruneOutcome([_state(job.base, d.merge(best))],
                        {"alphas": best, "realised_density": round(d.realised_density(best)[0], 4),
                         "evaluations": len(res.table), "validation": res.best_score})


def _searched_family(job: MergeJob, density: float) -> tuple:
    """(DPPA of all experts at ``density``, per-task α searched on each task's validation split);
    memoised in ``job.memo`` so DPPA + TA and DPPA + TIES share one search per density."""
    key = ("dppa", density)
    if key not in job.memo:
        tasks = list(job.finetuned)
        d = DPPA.from_models(job.base, [job.finetuned[t] for t in tasks], densities=levels(density), labels=tasks)
        evals = [lambda s, t=t: job.validate_task(s, t) for t in tasks]
        res = d.search(evals, per_task=True, strategy="greedy", max_evals=job.alpha_evals)
        job.memo[key] = (d, res.best)
    return job.memo[key]


def _dppa_merge(job: MergeJob, combine: str) -> MergeOutcome:
    def build(density: float, lam: float) -> tuple:
        d, alphas = _searched_family(job, density)
        return _state(job.base, d.merge(alphas, combine=combine, lam=lam)), {"alphas": alphas}

    return tuned_over(job, job.densities, build)


def dppa_task_arithmetic(job: MergeJob) -> MergeOutcome:
    """base + λ·ΣΔ'_i with Δ'_i each expert's DPPA (α searched on its own task), density and λ on validation."""
    return _dppa_merge(job, "sum")


def dppa_ties(job: MergeJob) -> MergeOutcome:
    """TIES sign election and disjoint merge of the DPPA deltas (α per task as above), density and λ on validation."""
    return _dppa_merge(job, "ties")
