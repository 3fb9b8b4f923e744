"""Plain descriptions of what to do to one delta (SparsifySpec) and how to combine M of them
(CombineSpec). The public API, the method presets, the merge engine and every backend share them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from .vocab import COMBINES, DIVISORS, ELECTS  # noqa: F401  (re-exported: the combine vocabulary)


@dataclass(frozen=True)
class SparsifySpec:
    """How one delta is sparsified. Fields not used by ``method`` are ignored.

    method: a registered sparsifier (``dppa_kernels.methods``): ``none`` (dense), ``magnitude``
    (top-k by |Δ|), ``bands`` (DPPA partition amplification, K nested magnitude bands), ``dare``
    (random drop), ``della`` (MagPrune), ``breadcrumbs`` (drop the gamma largest and the smallest),
    ``consensus`` (TALL-mask consensus), ...
    rescale: ``none``, ``inv_density`` (÷ density: DARE paper, PEFT) or ``l1`` (mergekit: × Σ|Δ| /
    Σ|kept Δ|).
    """

    method: str = "none"
    density: float = 1.0
    densities: tuple = ()  # bands: non-decreasing densities d_1 ≤ … ≤ d_K
    alphas: tuple = ()  # bands: one factor per band, highest band first
    band_combine: str = "max"
    tie_mode: str = "exact_k"
    partition: str = "tensor"
    block_size: Optional[int] = None
    count_rule: str = "floor"
    key_dtype: Optional[torch.dtype] = None
    gamma: float = 0.01
    epsilon: float = 0.15
    rescale: str = "none"
    density1_prunes_min: bool = False
    options: tuple = ()  # ((name, value), ...): parameters of sparsifiers without a field above

    def option(self, name: str, default=None):
        return dict(self.options).get(name, default)

    def with_(self, **kw) -> "SparsifySpec":
        return replace(self, **kw)

    def mask_kwargs(self) -> dict:
        return dict(
            tie_mode=self.tie_mode, partition=self.partition, block_size=self.block_size,
            count_rule=self.count_rule, key_dtype=self.key_dtype,
        )


@dataclass(frozen=True)
class CombineSpec:
    """How sparsified deltas are combined: out = base + λ · combine(w_i · Δ'_i) [/ divisor].

    combine: ``sum`` or ``ties`` (sign election + disjoint sum).
    elect (ties): ``weighted_sum`` (sign of Σ w_iΔ'_i, mergekit "sum"), ``count`` (sign of
    Σ sign(w_iΔ'_i), mergekit "count"), ``sum`` (sign of the unweighted Σ Δ'_i, PEFT "total"),
    ``frequency`` (sign of Σ sign(Δ'_i), PEFT). A zero majority counts as +.
    divisor (used when ``normalize``): ``weights`` (Σ of the agreeing weights, mergekit),
    ``count`` (number of agreeing deltas, PEFT), ``none``.
    """

    combine: str = "sum"
    elect: str = "weighted_sum"
    divisor: str = "weights"
    normalize: bool = False
    lam: float = 1.0
