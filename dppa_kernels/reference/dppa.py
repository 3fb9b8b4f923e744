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

import numpy as np
import torch

from ..vocab import HIST_BINS, STATS_DTYPES
from .threshold import key_to_value, keep_count, magnitude_keys, no_keep_key

logger = logging.getLogger(__name__)


def histogram_ref(delta: torch.Tensor, stats_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """int64 histogram (32768 bins) of the 15-bit magnitude key of ``delta`` rounded to ``stats_dtype``."""
    if stats_dtype not in STATS_DTYPES.values():
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
                  official: bool = False, division: bool = False) -> float:
    """100 · #{|Δ| > mult · mean|Δ|} / N from a histogram (monotone predicate, evaluated per bin).

    ``official=True`` evaluates the predicate in bf16 as the official code does: the mean is
    rounded to bf16, then either the cut ``bf16(mean · mult)`` is compared with |Δ| (its unit
    test), or, with ``division=True``, ``bf16(|Δ| / mean) > mult`` (its layer test). The ratio
    itself is a float64 count ratio in both cases (official: count / N · 100, in that order).
    """
    n = int(hist.sum())
    if n == 0:
        return 0.0
    mu = hist_mean(hist, stats_dtype)
    if official:
        vals = key_to_value(torch.arange(HIST_BINS), stats_dtype).to(torch.bfloat16)
        mu_b = torch.tensor(mu).to(torch.bfloat16)
        hit = (vals / mu_b) > mult if division else vals > mu_b * mult
    else:
        hit = _bin_values(stats_dtype) > mult * mu
    count = int(hist[hit].sum())
    return count / n * 100 if official else 100.0 * count / n  # the official operation order


# The module order of a Llama block (the official code walks the model's modules).
_MODULE_ORDER = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _module_rank(name: str) -> int:
    parts = name.split(".")
    return next((_MODULE_ORDER.index(p) for p in reversed(parts) if p in _MODULE_ORDER), len(_MODULE_ORDER))


def _official_offsets(layer_ratios: list, unit_ratios: list, sizes: list, offset_lambda: float) -> tuple:
    """(ℓ per layer, u per unit) in the official code's float64 operation order (numpy): the layer
    ratios centred and scaled by λ / max|·|; the unit ratios divided by their mean, centred by the
    size-weighted mean and scaled the same way. Where it would divide by zero, the offsets are 0."""
    o = np.array(layer_ratios, dtype=np.float64)
    o -= o.mean()
    span = np.absolute(o).max()
    o = o * (offset_lambda / span) if span > 0 else np.zeros_like(o)
    p = np.array(unit_ratios, dtype=np.float64)
    w = np.array(sizes, dtype=np.int64)
    if p.mean() > 0:
        p /= p.mean()
        p -= (p * w).sum() / w.sum()
        span = np.absolute(p).max()
        p = p * (offset_lambda / span) if span > 0 else np.zeros_like(p)
    else:
        p = np.zeros_like(p)
    return o.tolist(), p.tolist()


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

    ``compat="official"`` reproduces the official code's arithmetic: the outlier tests in bf16
    (the layer test in its division form ``bf16(|Δ| / mean) > M_l``), the offsets in its float64
    operation order, and each level taken as 1 − s with s = 1 − d. Where the official code
    divides by zero (all layer ratios equal, no unit outliers) the offsets are 0.
    """
    names = list(hists)
    if set(names) != set(layers):
        raise ValueError("hists and layers must have the same tensor names")
    if compat not in (None, "none", "official"):
        raise ValueError(f"compat must be none or official, got {str(compat)[:40]!r}")
    official = compat == "official"
    alloc = DPAllocation(levels=tuple(float(x) for x in levels))
    if not names:
        return alloc
    if official:  # its sums run over the model's modules in order: the last bits depend on it
        names.sort(key=lambda t: (layers[t], _module_rank(t), t))
    n_of = {t: int(hists[t].sum()) for t in names}
    # Layer outlier ratios over the concatenation of each layer's units.
    layer_ids = list(dict.fromkeys(layers[t] for t in names))
    for lid in layer_ids:
        h = sum(hists[t] for t in names if layers[t] == lid)
        alloc.layer_ratio[lid] = outlier_ratio(h, outlier_mult_layer, stats_dtype, official, division=True)
    for t in names:
        alloc.unit_ratio[t] = outlier_ratio(hists[t], outlier_mult_unit, stats_dtype, official)
    if official:
        ell, u = _official_offsets([alloc.layer_ratio[lid] for lid in layer_ids],
                                   [alloc.unit_ratio[t] for t in names], [n_of[t] for t in names], offset_lambda)
        alloc.layer_offset.update(zip(layer_ids, ell))
        alloc.unit_offset.update(zip(names, u))
    else:
        o = torch.tensor([alloc.layer_ratio[lid] for lid in layer_ids], dtype=torch.float64)
        dev = o - o.mean()
        span = float(dev.abs().max())
        for lid, dv in zip(layer_ids, dev.tolist()):
            alloc.layer_offset[lid] = offset_lambda * dv / span if span > 0 else 0.0
        # Unit outlier ratios, centred by the N-weighted mean.
        p = torch.tensor([alloc.unit_ratio[t] for t in names], dtype=torch.float64)
        nn = torch.tensor([n_of[t] for t in names], dtype=torch.float64)
        r = p - (nn * p).sum() / nn.sum() if nn.sum() > 0 else torch.zeros_like(p)
        rspan = float(r.abs().max())
        for t, rt in zip(names, r.tolist()):
            alloc.unit_offset[t] = offset_lambda * rt / rspan if rspan > 0 else 0.0
    lo, hi = density_clamp
    for t in names:
        ds = []
        for lvl in alloc.levels:
            if official:
                lvl = 1.0 - (1.0 - lvl)  # the official code configures the sparsity s = 1 - d
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
