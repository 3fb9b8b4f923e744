"""Reference sparsifiers of one delta tensor: each returns the per-element factor (float64).

A factor of 0 prunes the element, 1 keeps it, anything else amplifies/rescales it. Multiplying
the delta by the factor gives the sparsified delta. All random draws come from :mod:`.rng`.

References: TIES (arXiv 2306.01708), DARE (arXiv 2311.03099), DELLA (arXiv 2406.11617),
breadcrumbs (arXiv 2312.06795), DPPA (arXiv 2403.02799); mergekit ``mergekit/sparsify.py`` and
PEFT ``peft/utils/merge_utils.py`` for the parameter semantics (see docs/methods.md).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..vocab import BAND_COMBINES, RESCALES  # noqa: F401  (re-exported)
from . import rng
from .threshold import band_codes_ref, keep_count, magnitude_keys, magnitude_mask_ref, rank_desc
L1_EPS = 1e-7  # mergekit's rescaled_masked_tensor eps: no rescale when either norm is below it


def band_factors(alphas: Sequence[float], band_combine: str = "max") -> list[float]:
    """Factor of each band j = 1..K: ``max`` → max_{i ≥ j} α_i (DPPA ``my_max``); ``direct`` → α_j."""
    if band_combine not in BAND_COMBINES:
        raise ValueError(f"band_combine must be one of {BAND_COMBINES}, got {band_combine!r}")
    if band_combine == "direct":
        return [float(a) for a in alphas]
    return [float(max(alphas[j:])) for j in range(len(alphas))]


def magnitude_factor(x: torch.Tensor, density: float, **mask_kw) -> torch.Tensor:
    return magnitude_mask_ref(x, density, **mask_kw).to(torch.float64)


def bands_factor(
    x: torch.Tensor, densities: Sequence[float], alphas: Sequence[float], band_combine: str = "max",
    **mask_kw,
) -> torch.Tensor:
    """DPPA partition amplification: factor f_j on band j, 0 below the last band."""
    codes = band_codes_ref(x, densities, **mask_kw)
    table = torch.tensor([0.0, *band_factors(alphas, band_combine)], dtype=torch.float64)
    return table[codes]


def dare_factor(x: torch.Tensor, density: float, seed: int, name: str = "", stream: int = 0) -> torch.Tensor:
    """DARE keep mask: element i kept iff bits(i) < threshold32(density) (see :mod:`.rng`)."""
    if density >= 1.0:
        return torch.ones(x.shape, dtype=torch.float64, device=x.device)
    k1, k2 = rng.stream_keys(seed, name, stream)
    return rng.keep_mask(x.numel(), density, k1, k2, device=x.device).reshape(x.shape).to(torch.float64)


def della_probabilities(x: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA MagPrune keep probabilities, per row (last dimension; 1-D = one row).

    rank r = 1..n of |x| within the row (ascending, ties by flat index), rn = (r−1)/(n−1)
    (0.5 for a row of one element), p = (d − ε) + rn·(2ε), computed in float64 in this order.
    """
    keys = magnitude_keys(x).reshape(-1, x.shape[-1] if x.dim() else 1)
    n = keys.shape[1]
    # ascending rank with ties by index = n - 1 - descending rank (ties by index reversed) — use
    # a stable ascending sort directly for clarity.
    order = torch.sort(keys, dim=1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=x.device).expand_as(order))
    rn = ranks.to(torch.float64) / float(n - 1) if n > 1 else torch.full(ranks.shape, 0.5, dtype=torch.float64)
    p = (density - epsilon) + rn * (2.0 * epsilon)
    return p.reshape(x.shape)


def della_factor(
    x: torch.Tensor, density: float, epsilon: float, seed: int, name: str = "", stream: int = 0
) -> torch.Tensor:
    """DELLA keep mask: element i kept iff bits(i) < floor(p_i · 2^32)."""
    if density >= 1.0:
        return torch.ones(x.shape, dtype=torch.float64, device=x.device)
    if density <= 0.0:
        return torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    p = della_probabilities(x, density, epsilon).reshape(-1)
    k1, k2 = rng.stream_keys(seed, name, stream)
    bits = rng.random_bits(x.numel(), k1, k2, device=x.device)
    thresh = torch.floor(p * 4294967296.0).clamp(0, 4294967296.0).to(torch.int64)
    return (bits < thresh).reshape(x.shape).to(torch.float64)


def breadcrumbs_window(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(n_top, target): drop the n_top largest, keep the next ``target`` (mergekit 0.1.5 rule)."""
    target = keep_count(n, density, "floor")
    n_top = int(gamma * n)
    n_top = min(n_top, n - target)  # reduce the outlier removal to keep the target density
    return n_top, target


def breadcrumbs_factor(x: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs: keep ranks [n_top, n_top + target) of (key desc, index asc) of the tensor."""
    if density >= 1.0:
        return torch.ones(x.shape, dtype=torch.float64, device=x.device)
    n_top, target = breadcrumbs_window(x.numel(), density, gamma)
    r = rank_desc(magnitude_keys(x).reshape(-1))
    keep = (r >= n_top) & (r < n_top + target)
    return keep.reshape(x.shape).to(torch.float64)


def rescale_factor(x: torch.Tensor, factor: torch.Tensor, rescale: str, density: Optional[float]) -> float:
    """Scalar applied on top of ``factor``: 1, 1/density, or mergekit's L1-norm match."""
    if rescale == "none":
        return 1.0
    if rescale == "inv_density":
        # density 0 prunes everything: the factor is irrelevant, and 1 avoids PEFT's 0/0 NaN
        # (the PEFT drop-in reproduces that NaN on purpose, see integrations.peft).
        if density is None or density <= 0 or density >= 1:
            return 1.0
        return 1.0 / density
    if rescale == "l1":
        xd = x.to(torch.float64)
        before = float(xd.abs().sum())
        after = float((xd * factor).abs().sum())
        if before < L1_EPS or after < L1_EPS:
            return 1.0
        return before / after
    raise ValueError(f"rescale must be one of {RESCALES}, got {rescale!r}")
