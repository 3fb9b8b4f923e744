"""DELLA (arXiv 2406.11617): MagPrune, a random drop whose keep probability grows with the
element's magnitude rank within its row, from density − ε to density + ε."""

from __future__ import annotations

from ..backends.base import ApplyPlan
from ..reference import rng
from ..reference import sparsify as S
from . import _common as C
from .registry import MergeMethod, Param, Sparsifier, register

EPSILON = Param("epsilon", float, 0.15, "model", "half-width of the keep-probability range (density ± ε)",
                low=0.0, high=1.0)


class Della(Sparsifier):
    name = "della"
    params = (C.DENSITY, EPSILON)
    mergekit = "della_magprune"

    def check(self, s, argname):
        if 0.0 < s.density < 1.0 and not (s.density - s.epsilon > 0.0 and s.density + s.epsilon < 1.0):
            raise ValueError(f"{argname}.epsilon must keep density ± epsilon inside (0, 1); got density "
                             f"{s.density}, epsilon {s.epsilon}")

    def plan(self, be, delta, spec, *, seed, name, stream, check_as):
        if spec.density >= 1.0:
            return ApplyPlan("dense")
        k1, k2 = rng.stream_keys(seed, name, stream)
        if getattr(be, "della_mask", None) is not None and spec.density > 0:
            mask = be.della_mask(delta, spec.density, spec.epsilon, k1, k2)
        else:
            mask = self.factor(delta, spec, seed=seed, name=name, stream=stream) > 0
        return ApplyPlan("mask", mask=mask)

    def factor(self, delta, spec, *, seed, name, stream):
        return S.della_factor(delta, spec.density, spec.epsilon, seed, name, stream)

    def realised(self, delta, spec, **kw):
        if spec.density >= 1.0:
            return 1.0
        return super().realised(delta, spec, **kw)


register(
    Della(),
    MergeMethod("della", "DELLA + TIES", "della", "ties", True, True, C.gta_params(True, EPSILON),
                reference="2406.11617"),
    MergeMethod("della_linear", "DELLA (linear)", "della", "sum", False, True, C.gta_params(False, EPSILON),
                reference="2406.11617"),
)
