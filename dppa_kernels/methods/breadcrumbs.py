"""Model breadcrumbs (arXiv 2312.06795): drop the largest magnitudes (the fraction gamma) and
the smallest, keep a window of ``density`` in between."""

from __future__ import annotations

import torch

from .. import plans as P
from ..backends.base import ApplyPlan
from ..reference import sparsify as S
from . import _common as C
from .registry import MergeMethod, Param, Sparsifier, register

GAMMA = Param("gamma", float, 0.01, "model", "fraction of the largest magnitudes dropped", low=0.0, high=1.0)


class Breadcrumbs(Sparsifier):
    """Ranks [n_top, n_top + target) of (|Δ| descending, index ascending) of the whole tensor."""

    name = "breadcrumbs"
    params = (C.DENSITY, GAMMA)
    mergekit = "magnitude_outliers"

    def check(self, s, argname):
        if not (0.0 <= s.gamma <= 1.0):
            raise ValueError(f"{argname}.gamma must be in [0, 1], got {s.gamma}")
        if s.tie_mode != "exact_k":
            raise ValueError(f"{argname}.tie_mode must be 'exact_k' for breadcrumbs (rank window), got {s.tie_mode!r}")

    def plan(self, be, delta, spec, *, seed, name, stream, check_as):
        if spec.density >= 1.0:
            return ApplyPlan("dense")
        n_top, target = S.breadcrumbs_window(delta.numel(), spec.density, spec.gamma)
        s = spec if (spec.partition, spec.count_rule) == ("tensor", "floor") else \
            spec.with_(partition="tensor", count_rule="floor")
        ks = [torch.tensor([n_top]), torch.tensor([n_top + target])]
        return P.threshold_plan(be, delta, s, ks, (0.0, 1.0), "exact_k", check_as)

    def factor(self, delta, spec, *, seed, name, stream):
        return S.breadcrumbs_factor(delta, spec.density, spec.gamma)

    def realised(self, delta, spec, **_):
        if spec.density >= 1.0:
            return 1.0
        return S.breadcrumbs_window(delta.numel(), spec.density, spec.gamma)[1] / delta.numel()


register(
    Breadcrumbs(),
    MergeMethod("breadcrumbs", "Model breadcrumbs", "breadcrumbs", "sum", False, False, C.gta_params(False, GAMMA),
                reference="2312.06795"),
    MergeMethod("breadcrumbs_ties", "Model breadcrumbs + TIES", "breadcrumbs", "ties", False, False,
                C.gta_params(False, GAMMA), reference="2312.06795"),
)
