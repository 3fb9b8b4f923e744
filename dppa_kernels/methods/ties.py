"""TIES merging (arXiv 2306.01708): keep the top-k magnitudes of each delta, elect a sign per
element, sum the agreeing deltas."""

from __future__ import annotations

from .. import plans as P
from ..backends.base import ApplyPlan
from ..reference import keep_count
from ..reference import sparsify as S
from . import _common as C
from .registry import MergeMethod, Sparsifier, register


class Magnitude(Sparsifier):
    """Top-k of |Δ| per partition, k from ``density`` and ``count_rule`` (mergekit: ``min1``)."""

    name = "magnitude"
    params = (C.DENSITY,)
    mergekit = "magnitude"

    def spec(self, i, p, m, common):
        return super().spec(i, p, m, {**common, "count_rule": p.get("count_rule", C.COUNT_RULE.default)})

    def plan(self, be, delta, spec, *, seed, name, stream, check_as):
        if spec.density >= 1.0 and not spec.density1_prunes_min:
            return ApplyPlan("dense")
        return P.threshold_plan(be, delta, spec, self.level_keeps(delta, spec), (1.0,), spec.tie_mode, check_as)

    def level_keeps(self, delta, spec):
        return [P.keep_of(delta, spec, spec.density)]

    def factor(self, delta, spec, *, seed, name, stream):
        return S.magnitude_factor(delta, spec.density, density1_prunes_min=spec.density1_prunes_min,
                                  **spec.mask_kwargs())

    def realised(self, delta, spec, *, plan=None, **kw):
        if spec.density >= 1.0 and not spec.density1_prunes_min:
            return 1.0
        if plan is None and spec.tie_mode == "exact_k" and spec.partition == "tensor":  # k, by definition
            return keep_count(delta.numel(), spec.density, spec.count_rule) / delta.numel()
        return super().realised(delta, spec, plan=plan, **kw)


register(
    Magnitude(),
    MergeMethod("ties", "TIES", "magnitude", "ties", True, False, C.gta_params(True), reference="2306.01708"),
)
