"""From a SparsifySpec to the ApplyPlan of one delta: keep counts per partition, the threshold
selects (the first of which checks the delta for NaN/Inf when asked), DARE/DELLA keys and masks,
and mergekit's L1 rescale. Used by :mod:`dppa_kernels.ops`; plans follow ``backends.base``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

import torch

from . import _validate as V
from . import reference as R
from .backends.base import ApplyPlan
from .methods.registry import get_sparsifier
from .reference.sparsify import L1_EPS
from .spec import SparsifySpec
from .vocab import partition_geometry

# Several levels of one 16-bit-keyed tensor come from one 32768-bin histogram from this size on;
# below, a select per level costs less than the histogram's fixed cost (CPU backend, 2 levels:
# 16 Ki elements 39 µs vs 166 µs; 64 Ki 243 µs vs 192 µs).
_HIST_LEVELS_MIN = 1 << 16


def _partition_lengths(x: torch.Tensor, partition: str, block_size: Optional[int]) -> torch.Tensor:
    """int64 length of every partition (``vocab.partition_geometry``; the last may be shorter)."""
    length, parts = partition_geometry(x.shape, partition, block_size)
    lengths = torch.full((parts,), length, dtype=torch.int64)
    if parts:
        lengths[-1] = x.numel() - (parts - 1) * length
    return lengths


def keep_counts(lengths: torch.Tensor, density: float, count_rule: str) -> torch.Tensor:
    """Vectorised :func:`reference.keep_count` (same float64 arithmetic)."""
    n = lengths.to(torch.float64)
    if density >= 1.0:
        return lengths.clone()
    if density <= 0.0:
        return torch.zeros_like(lengths)
    if count_rule == "floor":
        k = torch.floor(density * n)
    elif count_rule == "min1":
        k = torch.clamp(torch.floor(density * n), min=1.0)
    else:  # dppa
        k = n - torch.floor(n * (1.0 - density))
    return torch.where(lengths > 0, k.to(torch.int64), torch.zeros_like(lengths))


def keep_of(x: torch.Tensor, spec: SparsifySpec, density: float) -> torch.Tensor:
    """Keep count per partition of x under ``spec`` at ``density`` (1 keeps everything)."""
    if spec.partition == "tensor":  # one partition: no tensor arithmetic for a single count
        return torch.tensor([R.keep_count(x.numel(), density, spec.count_rule)], dtype=torch.int64)
    return keep_counts(_partition_lengths(x, spec.partition, spec.block_size), density, spec.count_rule)


def _select_levels(be, x, spec: SparsifySpec, ks: Sequence[torch.Tensor], check_as: Optional[str] = None):
    """tau, c_above, c_eq as [P, K] for K keep-count vectors (one select per level; the first
    checks x for NaN/Inf when ``check_as`` names it)."""
    kd = spec.key_dtype or x.dtype
    if (len(ks) > 1 and spec.partition == "tensor" and kd in (torch.bfloat16, torch.float16)
            and x.numel() >= _HIST_LEVELS_MIN and getattr(be, "levels_from_histogram", True)):
        hist = V.histogram_checked(be, x, kd, check_as)  # one pass gives every level
        rows = [R.threshold_from_hist(hist, int(k[0]), kd) for k in ks]
        t = torch.tensor(rows, dtype=torch.int64)  # [K, 3]
        return t[:, 0].unsqueeze(0), t[:, 1].unsqueeze(0), t[:, 2].unsqueeze(0)
    res = [V.checked_pass(lambda c, k=k: be.select(x, k, spec.partition, spec.block_size, spec.key_dtype,
                                                   check_finite=c), x, check_as if j == 0 else None)
           for j, k in enumerate(ks)]
    return tuple(_columns([r[i] for r in res]) for i in range(3))


def _columns(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """[P, K] int64 from K vectors of length P (a view for K = 1; P = 1 without a stack, which
    costs more than the select of a small tensor)."""
    if len(vectors) == 1:
        return vectors[0].unsqueeze(1)
    if vectors[0].numel() == 1:
        return torch.tensor([[int(v) for v in vectors]], dtype=torch.int64)
    return torch.stack(list(vectors), dim=1)


def threshold_plan(be, x, spec: SparsifySpec, ks, factors, tie_mode, check_as=None) -> ApplyPlan:
    tau, above, eq = _select_levels(be, x, spec, ks, check_as)
    if tau.shape[0] == 1:  # one partition: its budgets in Python, no tensor arithmetic
        budget = torch.tensor([[max(int(k) - a, 0) for k, a in zip(ks, above[0].tolist())]], dtype=torch.int64)
    else:
        budget = (_columns(ks) - above).clamp(min=0)
    return ApplyPlan(kind="thresholds", partition=spec.partition, block_size=spec.block_size,
                     key_dtype=spec.key_dtype, tie_mode=tie_mode, tau_key=tau, budget=budget, c_eq=eq,
                     factors=tuple(float(f) for f in factors), finite_checked=check_as is not None)


def keep_full_levels(plan: ApplyPlan, densities: Sequence[float], prunes_min: bool = False) -> ApplyPlan:
    """A level at density >= 1 keeps everything. Its τ is the smallest key, so under ``gt`` it
    would still drop the minima (the official DPPA quirk, kept when ``prunes_min``); otherwise
    such a level gets τ = -1, below every key (no ties, no budget)."""
    full = torch.tensor([[d >= 1.0 for d in densities]])
    if plan.tie_mode != "gt" or prunes_min or not bool(full.any()):
        return plan
    return replace(plan, tau_key=plan.tau_key.masked_fill(full, -1), budget=plan.budget.masked_fill(full, 0),
                   c_eq=plan.c_eq.masked_fill(full, 0))


def make_plan(be, delta: torch.Tensor, spec: SparsifySpec, *, seed: int, name: str, stream: int,
              check_as: Optional[str] = None) -> ApplyPlan:
    """The ApplyPlan of one delta under ``spec`` (thresholds selected, random keys derived), by
    the spec's sparsifier (``dppa_kernels.methods``), with the rescale set.

    ``check_as``: the name of ``delta`` in a NaN/Inf error; a threshold select then checks it
    (``plan.finite_checked``), and the apply pass is left to check the others.
    """
    sp = get_sparsifier(spec.method, "spec.method")
    plan = sp.plan(be, delta, spec, seed=seed, name=name, stream=stream, check_as=check_as)
    plan.scale = _rescale(be, delta, spec, plan)
    return plan


def make_plans(be, deltas: Sequence[torch.Tensor], specs: Sequence[SparsifySpec], weights: Sequence[float], *,
               seed: int, name: str, check_as: Optional[Sequence[str]] = None) -> list:
    """The plans of M deltas: one each (model i's random stream is i), or all at once for a
    sparsifier that looks at every delta (``Sparsifier.joint``)."""
    sp = get_sparsifier(specs[0].method, "specs[0].method")
    if sp.joint:
        return sp.joint_plans(be, deltas, specs, weights)
    return [make_plan(be, d, s, seed=seed, name=name, stream=i, check_as=check_as[i] if check_as else None)
            for i, (d, s) in enumerate(zip(deltas, specs))]


def _rescale(be, delta, spec: SparsifySpec, plan: ApplyPlan) -> float:
    if spec.rescale == "none" or plan.kind == "dense":
        return 1.0
    if spec.rescale == "inv_density":
        return 1.0 / spec.density if 0.0 < spec.density < 1.0 else 1.0
    before, after = be.abs_sums(delta, plan)
    return 1.0 if (before < L1_EPS or after < L1_EPS) else before / after
