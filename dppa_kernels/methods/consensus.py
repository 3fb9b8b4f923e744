"""Consensus merging with TALL masks (arXiv 2405.07813).

Model i's TALL mask marks the entries where its own delta matters against the rest of the
merged delta: m_i = |Δ_i| > λ_i · |S − Δ_i|, with the multi-task delta S = Σ_j w_j Δ_j. Consensus
keeps an entry of every delta only where at least k masks hold it (k = 2 drops the "selfish"
entries one model alone needs and the "catastrophic" ones none does), then merges like task
arithmetic: out = base + λ · Σ_i w_i · keep ⊙ Δ_i [/ Σ w_i when normalize].

The mask is computed in float32 (float64 for float64 deltas) in this order, on every backend:
d_i = Δ_i cast; S = w_0·d_0 + w_1·d_1 + … (left to right); m_i = |d_i| > λ_i·|S − d_i|. Each step is
one correctly rounded elementwise operation, so CPU and GPU agree bit for bit; an entry where
all deltas are 0 is never kept (0 > 0 is false).
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..backends.base import ApplyPlan
from ..spec import SparsifySpec
from . import _common as C
from .registry import MergeMethod, Param, Sparsifier, per_model, register

K = Param("k", int, 2, "global", "keep an entry where at least k models' TALL masks hold it", low=0)
TALL_LAMBDA = Param("tall_mask_lambda", float, 0.4, "model",
                    "λ_i of model i's TALL mask |Δ_i| > λ_i·|S − Δ_i| (larger keeps less)", low=0.0)


def consensus_mask(deltas: Sequence[torch.Tensor], weights: Sequence[float], lambdas: Sequence[float],
                   k: int) -> torch.Tensor:
    """Bool tensor of the deltas' shape: where at least ``k`` TALL masks hold (module docstring)."""
    wd = torch.float64 if deltas[0].dtype == torch.float64 else torch.float32
    total = None
    for d, w in zip(deltas, weights):
        v = d.to(wd) * float(w)
        total = v if total is None else total.add_(v)
    votes = torch.zeros(deltas[0].shape, dtype=torch.int32, device=deltas[0].device)
    for d, lam in zip(deltas, lambdas):
        x = d.to(wd)
        votes += x.abs() > (total - x).abs_().mul_(float(lam))
    return votes >= int(k)


class Consensus(Sparsifier):
    """Keep the entries at least k of the M TALL masks agree on; every model gets the same mask."""

    name = "consensus"
    prune = False
    uses_density = False
    joint = True

    def spec(self, i, p, m, common):
        lam = per_model(p.get("tall_mask_lambda", TALL_LAMBDA.default), m, "tall_mask_lambda")[i]
        return SparsifySpec("consensus", options=(("k", p.get("k", K.default)), ("tall_mask_lambda", float(lam))))

    def check(self, s, argname):
        k, lam = s.option("k", K.default), s.option("tall_mask_lambda", TALL_LAMBDA.default)
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise ValueError(f"{argname}.k must be an integer >= 0, got {k!r}")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0.0 <= lam < float("inf"):
            raise ValueError(f"{argname}.tall_mask_lambda must be a finite number >= 0, got {lam!r}")

    def check_joint(self, specs, argname):
        ks = {s.option("k", K.default) for s in specs}
        if len(ks) > 1:
            raise ValueError(f"{argname}: k must be the same for every model, got {sorted(ks)}")

    def _mask(self, deltas, specs, weights):
        lambdas = [s.option("tall_mask_lambda", TALL_LAMBDA.default) for s in specs]
        return consensus_mask(deltas, weights, lambdas, specs[0].option("k", K.default))

    def plan(self, be, delta, spec, *, seed, name, stream, check_as):
        raise ValueError("method 'consensus' needs every delta of the merge at once (merge_deltas)")

    def joint_plans(self, be, deltas, specs, weights):
        mask = self._mask(deltas, specs, weights)
        return [ApplyPlan("mask", mask=mask) for _ in deltas]

    def joint_factors(self, deltas, specs, weights):
        return [self._mask(deltas, specs, weights).to(torch.float64)] * len(deltas)

    def realised(self, delta, spec, *, plan=None, **kw):
        if plan is None:
            raise ValueError("method 'consensus': what it kept is known from its plan only")
        return super().realised(delta, spec, plan=plan, **kw)


register(
    Consensus(),
    MergeMethod("consensus", "Consensus (TALL masks)", "consensus", "sum", False, False,
                (C.weight(required=False), TALL_LAMBDA, K, C.normalize(False), C.LAMBDA, C.INT8_MASK),
                reference="2405.07813", mergekit="ours"),
)
