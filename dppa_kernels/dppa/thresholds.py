"""Per-unit band thresholds and tie budgets from one histogram, and the apply plans built on them.

For a 16-bit statistics dtype the histogram is a sufficient statistic: every level's
threshold key τ_j, the counts above and at τ_j, and so the kept count of any factor choice, are
exact without re-reading the delta. A :class:`UnitBands` is computed once per (model, unit); the
α search then only swaps the factors of its plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .. import reference as R
from ..backends.base import ApplyPlan
from ..plans import keep_full_levels
from ..reference.sparsify import band_factors


@dataclass(frozen=True)
class UnitBands:
    """Levels of one unit delta of ``n`` elements (densities non-decreasing, so τ non-increasing)."""

    n: int
    densities: tuple
    key_dtype: torch.dtype
    tau_key: tuple  # per level
    c_above: tuple  # #key > τ_j
    c_eq: tuple  # #key == τ_j
    k: tuple  # keep count of each level
    prunes_min: bool = False  # a level at density 1 still drops the minima under gt (official quirk)

    @classmethod
    def from_hist(cls, hist: torch.Tensor, densities: Sequence[float], key_dtype: torch.dtype,
                  count_rule: str = "dppa", prunes_min: bool = False) -> "UnitBands":
        rows = R.band_thresholds(hist.to(torch.int64), tuple(densities), key_dtype, count_rule)
        return cls(int(hist.sum()), tuple(float(d) for d in densities), key_dtype,
                   *(tuple(int(r[i]) for r in rows) for i in range(4)), prunes_min=prunes_min)

    def thresholds(self) -> list:
        """τ_j as values of the key dtype (+inf where a level keeps nothing)."""
        return [float(R.key_to_value(torch.tensor(t), self.key_dtype)) for t in self.tau_key]

    def level_counts(self, tie_mode: str) -> list:
        """Elements in level j (cumulative): ``gt`` #key > τ, ``ge`` adds every tie, ``exact_k`` k;
        a level at density 1 keeps all n (but under ``gt`` with ``prunes_min``)."""
        gt_all = tie_mode == "gt" and not self.prunes_min
        return [k if gt_all and d >= 1.0 else {"gt": a, "ge": a + e}.get(tie_mode, k)
                for a, e, k, d in zip(self.c_above, self.c_eq, self.k, self.densities)]

    def kept(self, factors: Sequence[float], tie_mode: str) -> int:
        """Elements with a non-zero factor under band ``factors`` (one per level)."""
        total, prev = 0, 0
        for f, c in zip(factors, self.level_counts(tie_mode)):
            total += (c - prev) if f != 0 else 0
            prev = c
        return total

    def plan(self, factors: Sequence[float], tie_mode: str) -> ApplyPlan:
        """The backends' threshold plan of this unit (one partition) with band ``factors``."""
        one = lambda v: torch.tensor([list(v)], dtype=torch.int64)  # noqa: E731  [1, K]
        budget = [max(k - a, 0) for k, a in zip(self.k, self.c_above)]
        plan = ApplyPlan(kind="thresholds", partition="tensor", key_dtype=self.key_dtype, tie_mode=tie_mode,
                         tau_key=one(self.tau_key), budget=one(budget), c_eq=one(self.c_eq),
                         factors=tuple(float(f) for f in factors))
        return keep_full_levels(plan, self.densities, self.prunes_min)


def factors_of(alphas: Sequence[float], band_combine: str) -> tuple:
    """Per-level factors of band ``alphas`` (``max`` or ``direct``, docs/methods.md)."""
    return tuple(float(f) for f in band_factors(tuple(alphas), band_combine))

