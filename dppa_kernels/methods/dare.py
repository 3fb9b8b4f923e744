"""DARE (arXiv 2311.03099): drop each element of a delta at random, keep it with probability
``density``; mergekit rescales the survivors to the delta's L1 norm."""

from __future__ import annotations

import torch

from ..backends.base import ApplyPlan
from ..backends.registry import get_backend
from ..reference import rng
from ..reference import sparsify as S
from ..spec import CombineSpec
from . import _common as C
from .registry import MergeMethod, Sparsifier, register


class Dare(Sparsifier):
    """Keep element e iff rng bits(e) < threshold32(density), keyed by (seed, name, stream)."""

    name = "dare"
    params = (C.DENSITY,)
    mergekit = "random"

    def plan(self, be, delta, spec, *, seed, name, stream, check_as):
        if spec.density >= 1.0:
            return ApplyPlan("dense")
        k1, k2 = rng.stream_keys(seed, name, stream)
        return ApplyPlan("dare", k1=k1, k2=k2, thr32=rng.threshold32(spec.density))

    def factor(self, delta, spec, *, seed, name, stream):
        return S.dare_factor(delta, spec.density, seed, name, stream)

    def expected(self, spec, plan):
        if plan is not None and plan.kind == "dare":  # the draw's keep probability
            return min(plan.thr32, 1 << 32) / 4294967296.0
        return None

    def realised(self, delta, spec, *, seed, name, stream, backend="reference", **_):
        if spec.density >= 1.0:
            return 1.0
        k1, k2 = rng.stream_keys(seed, name, stream)
        if backend == "reference":
            return int(rng.keep_mask(delta.numel(), spec.density, k1, k2, device=delta.device).sum()) / delta.numel()
        # the backend applies the same draw to a tensor of ones
        plan = ApplyPlan("dare", k1=k1, k2=k2, thr32=rng.threshold32(spec.density))
        ones = torch.ones(delta.numel(), dtype=torch.float32, device=delta.device)
        out = get_backend(backend).apply([ones], None, [plan], [1.0], CombineSpec(), torch.float32)
        return int(torch.count_nonzero(out)) / delta.numel()


register(
    Dare(),
    MergeMethod("dare_ties", "DARE + TIES", "dare", "ties", False, True, C.gta_params(False),
                reference="2311.03099"),
    MergeMethod("dare_linear", "DARE (linear)", "dare", "sum", False, True, C.gta_params(False),
                reference="2311.03099"),
)
