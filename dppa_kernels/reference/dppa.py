"""DPPA Dynamic Pruning (DP) allocation and band thresholds from magnitude histograms.

Definition: docs/methods.md, DPPA (arXiv 2403.02799; official ``lib/prune_all.py``). For a 16-bit statistics
dtype, the 32768-bin histogram of the magnitude key of Δ (rounded to ``stats_dtype``) is a
sufficient statistic: the mean |Δ|, every outlier count and every band threshold are exact
functions of it, so the weights are never re-read between the statistics and apply passes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence

import torch

from ..vocab import HIST_BINS
from .threshold import key_to_value, keep_count, magnitude_keys, no_keep_key

logger = logging.getLogger(__name__)

STATS_DTYPES = (torch.bfloat16, torch.float16)


def histogram_ref(delta: torch.Tensor, stats_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """int64 histogram (32768 bins) of the 15-bit magnitude key of ``delta`` rounded to ``stats_dtype``."""
    if stats_dtype not in STATS_DTYPES:
        raise ValueError(f"stats_dtype must be bfloat16 or float16, got {stats_dtype}")
    keys = magnitude_keys(delta, stats_dtype).reshape(-1)
    return torch.bincount(keys.cpu(), minlength=HIST_BINS).to(torch.int64)


def _bin_values(stats_dtype: torch.dtype) -> torch.Tensor:
    return key_to_value(torch.arange(HIST_BINS), stats_dtype).to(torch.float64)


def hist_mean(hist: torch.Tensor, stats_dtype: torch.dtype = torch.bfloat16) -> float:
    """Mean |Δ| = Σ count·value / Σ count (float64); 0 for an empty histogram."""
    n = int(hist.sum())
    if n == 0:
        return 0.0
    vals = _bin_values(stats_dtype)
    finite = torch.isfinite(vals)
    return float((hist[finite].to(torch.float64) * vals[finite]).sum()) / n


def outlier_ratio(hist: torch.Tensor, mult: float, stats_dtype: torch.dtype = torch.bfloat16,
                  official: bool = False) -> float:
    """100 · #{|Δ| > mult · mean|Δ|} / N from a histogram (monotone predicate, evaluated per bin).

    ``official=True`` rounds the mean, the cut and the ratio to bf16 as the official code does.
    """
    n = int(hist.sum())
    if n == 0:
        return 0.0
    vals = _bin_values(stats_dtype)
    mu = hist_mean(hist, stats_dtype)
    if official:
        mu = float(torch.tensor(mu).to(torch.bfloat16))
        cut = float(torch.tensor(mult * mu).to(torch.bfloat16))
    else:
        cut = mult * mu
    count = int(hist[vals > cut].sum())
    ratio = 100.0 * count / n
    if official:
        ratio = float(torch.tensor(ratio).to(torch.bfloat16))
    return ratio


def threshold_from_hist(hist: torch.Tensor, k: int, stats_dtype: torch.dtype = torch.bfloat16) -> tuple[int, int, int]:
    """(τ_key, c_above, c_eq) for keeping the k largest: scan from the largest key down."""
    if k <= 0:
        return no_keep_key(stats_dtype), 0, 0
    rev = torch.flip(hist, [0]).cumsum(0)  # rev[i] = count of keys >= HIST_BINS-1-i
    i = int(torch.searchsorted(rev, torch.tensor(k, dtype=rev.dtype)))  # first i with rev[i] >= k
    tau = HIST_BINS - 1 - i
    c_eq = int(hist[tau])
    return tau, int(rev[i]) - c_eq, c_eq


@dataclass
class DPAllocation:
    """Result of :func:`dp_allocate`. ``densities[name]`` has one density per level."""

    levels: tuple
    densities: dict = field(default_factory=dict)
    layer_ratio: dict = field(default_factory=dict)  # o_l
    layer_offset: dict = field(default_factory=dict)  # ℓ_l
    unit_ratio: dict = field(default_factory=dict)  # p_t
    unit_offset: dict = field(default_factory=dict)  # u_t
    clamped: list = field(default_factory=list)


def dp_allocate(
    hists: Mapping[str, torch.Tensor],
    layers: Mapping[str, object],
    levels: Sequence[float],
    *,
    offset_lambda: float = 0.08,
    outlier_mult_layer: float = 3.0,
    outlier_mult_unit: float = 5.0,
    density_clamp: tuple = (0.0, 1.0),
    stats_dtype: torch.dtype = torch.bfloat16,
    compat: Optional[str] = None,
) -> DPAllocation:
    """Per-unit densities d_t^(j) = clamp((levels_j) + ℓ_{l(t)} + u_t) (docs/methods.md).

    hists: histogram per unit tensor; layers: layer id per unit tensor (same keys); levels: the
    target densities 1 − s_j of each level (one level for DP, K for K bands).
    """
    names = list(hists)
    if set(names) != set(layers):
        raise ValueError("hists and layers must have the same tensor names")
    official = compat == "official"
    alloc = DPAllocation(levels=tuple(float(x) for x in levels))
    if not names:
        return alloc
    n_of = {t: int(hists[t].sum()) for t in names}
    # Layer outlier ratios over the concatenation of each layer's units.
    layer_ids = list(dict.fromkeys(layers[t] for t in names))
    for lid in layer_ids:
        h = sum(hists[t] for t in names if layers[t] == lid)
        alloc.layer_ratio[lid] = outlier_ratio(h, outlier_mult_layer, stats_dtype, official)
    o = torch.tensor([alloc.layer_ratio[lid] for lid in layer_ids], dtype=torch.float64)
    dev = o - o.mean()
    span = float(dev.abs().max())
    for lid, dv in zip(layer_ids, dev.tolist()):
        alloc.layer_offset[lid] = offset_lambda * dv / span if span > 0 else 0.0
    # Unit outlier ratios, centred by the N-weighted mean.
    p = torch.tensor([outlier_ratio(hists[t], outlier_mult_unit, stats_dtype, official) for t in names],
                     dtype=torch.float64)
    nn = torch.tensor([n_of[t] for t in names], dtype=torch.float64)
    r = p - (nn * p).sum() / nn.sum() if nn.sum() > 0 else torch.zeros_like(p)
    rspan = float(r.abs().max())
    lo, hi = density_clamp
    for t, pt, rt in zip(names, p.tolist(), r.tolist()):
        alloc.unit_ratio[t] = pt
        alloc.unit_offset[t] = offset_lambda * rt / rspan if rspan > 0 else 0.0
        ds = []
        for lvl in alloc.levels:
            d = lvl + alloc.layer_offset[layers[t]] + alloc.unit_offset[t]
            if d < lo or d > hi:
                alloc.clamped.append((t, lvl, d))
            ds.append(min(max(d, lo), hi))
        alloc.densities[t] = ds
    if alloc.clamped:
        logger.warning("DP allocation clamped %d unit densities to [%g, %g] (e.g. %s: %.4f); "
                       "the parameter-weighted mean density is no longer exact",
                       len(alloc.clamped), lo, hi, alloc.clamped[0][0], alloc.clamped[0][2])
    return alloc


def band_thresholds(hist: torch.Tensor, densities: Sequence[float], stats_dtype: torch.dtype = torch.bfloat16,
                    count_rule: str = "dppa") -> list[tuple[int, int, int, int]]:
    """(τ_key, c_above, c_eq, k) for every level from one histogram (one scan each)."""
    n = int(hist.sum())
    out = []
    for d in densities:
        k = keep_count(n, d, count_rule)
        out.append((*threshold_from_hist(hist, k, stats_dtype), k))
    return out
