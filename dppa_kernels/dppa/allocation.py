"""DPPA phase B, the allocation: per-unit densities from the histograms.

The DP rule itself is the reference's (:func:`reference.dp_allocate`, the definition every path
uses); this module adds what a whole-model run needs around it: the settings in one place
(:func:`resolve_options`, which every caller uses to read a merge's parameters and ``compat``),
the optional renormalisation after clamping, and the per-model summary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Mapping, Optional, Sequence

import torch

from ..ops import dp_densities
from ..reference.dppa import DPAllocation
from .defaults import DEFAULT_SETTINGS, check_compat, resolve_settings
from .stats import delta_round_dtype, stats_dtype_of


@dataclass(frozen=True)
class DPSettings:
    """The DP allocation settings. ``renormalize``: after clamping, shift the
    densities of every level by one constant so the N-weighted mean is the level again."""

    offset_lambda: float = 0.08
    outlier_mult_layer: float = 3.0
    outlier_mult_unit: float = 5.0
    density_clamp: tuple = (0.0, 1.0)
    compat: Optional[str] = None  # None or "official" ("none" is read as None)
    renormalize: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "compat", check_compat(self.compat))
        for name in ("offset_lambda", "outlier_mult_layer", "outlier_mult_unit"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {str(v)[:40]!r}")
        c = self.density_clamp
        if (not isinstance(c, (tuple, list)) or len(c) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in c)
                or not 0.0 <= c[0] <= c[1] <= 1.0):
            raise ValueError(f"density_clamp must be [lo, hi] with 0 <= lo <= hi <= 1, got {str(c)[:40]!r}")
        if not isinstance(self.renormalize, bool):
            raise ValueError(f"renormalize must be true or false, got {str(self.renormalize)[:40]!r}")

    @classmethod
    def from_params(cls, params: Mapping) -> "DPSettings":
        """From config-style parameters (unknown keys ignored; ``compat: none`` means None)."""
        params = dict(params)
        if "density_renormalize" in params:  # the config's name of ``renormalize``
            params["renormalize"] = params.pop("density_renormalize")
        kw = {f.name: params[f.name] for f in fields(cls) if f.name in params and params[f.name] is not None}
        if "density_clamp" in kw:
            kw["density_clamp"] = tuple(float(x) for x in kw["density_clamp"])
        if "renormalize" in kw and not isinstance(kw["renormalize"], bool):
            raise ValueError(f"renormalize must be true or false, got {str(kw['renormalize'])[:40]!r}")
        return cls(**kw)

    def dp_kwargs(self) -> dict:
        return {"offset_lambda": self.offset_lambda, "outlier_mult_layer": self.outlier_mult_layer,
                "outlier_mult_unit": self.outlier_mult_unit, "density_clamp": tuple(self.density_clamp),
                "compat": self.compat}


@dataclass(frozen=True)
class DPPAOptions:
    """What one DPPA merge's whole-model parameters and ``compat`` settle, resolved once.

    ``spec``: the band specs' settings (``tie_mode``, ``count_rule``, ``band_combine``,
    ``stats_dtype``); ``nonunit_mode``; ``dp``: the allocation settings. Under
    ``compat="official"`` a unit at density 1 still drops its minima (``official``) and Δ is
    rounded to bf16 before pruning (``delta_dtype``)."""

    dp: DPSettings
    spec: dict
    nonunit_mode: str

    @property
    def official(self) -> bool:
        return self.dp.compat == "official"

    @property
    def delta_dtype(self) -> Optional[torch.dtype]:
        return delta_round_dtype(self.dp.compat)

    @property
    def stats_dtype(self) -> torch.dtype:
        return stats_dtype_of(self.spec["stats_dtype"])


def resolve_options(params: Mapping) -> DPPAOptions:
    """The :class:`DPPAOptions` of config-style parameters (``compat``, ``tie_mode``, ...,
    ``offset_lambda``, ``density_clamp``, ``density_renormalize``; unknown keys and None values
    ignored). The one reading of ``compat`` for ``dppa merge``, the mergekit integration (pre-pass
    and in-memory calls) and the fast path: the settings ``compat`` decides default to its values
    (``defaults.resolve_settings``); ValueError names a bad key and value."""
    from ..methods import NONUNIT_MODES

    spec = resolve_settings(params.get("compat"), {k: params.get(k) for k in DEFAULT_SETTINGS})
    nonunit = spec.pop("nonunit_mode")
    if nonunit not in NONUNIT_MODES:
        raise ValueError(f"nonunit_mode must be one of {', '.join(NONUNIT_MODES)}, got {str(nonunit)[:40]!r}")
    stats_dtype_of(spec["stats_dtype"])  # validates the name
    return DPPAOptions(DPSettings.from_params(params), spec, nonunit)


def _shift_to_mean(raw: list, sizes: list, target: float, lo: float, hi: float) -> list:
    """clamp(raw + c) with the constant c that makes the size-weighted mean ``target`` (bisection;
    the mean is monotone in c). Unreachable targets give the nearest reachable mean."""
    total = float(sum(sizes))

    def mean(c: float) -> float:
        return sum(n * min(max(d + c, lo), hi) for d, n in zip(raw, sizes)) / total

    a, b = -2.0, 2.0
    for _ in range(200):
        mid = 0.5 * (a + b)
        if mean(mid) < target:
            a = mid
        else:
            b = mid
    c = b if abs(mean(b) - target) <= abs(mean(a) - target) else a
    return [min(max(d + c, lo), hi) for d in raw]


def allocate(hists: Mapping[str, torch.Tensor], layers: Mapping[str, object], levels: Sequence[float],
             settings: DPSettings = DPSettings(), *, stats_dtype: torch.dtype = torch.bfloat16,
             backend: str = "auto") -> DPAllocation:
    """The DP allocation of one model (``densities[unit]``: one density per level).

    With ``settings.renormalize`` the clamped densities of each level are shifted so that their
    N-weighted mean equals the level (as far as the clamp allows); levels stay nested.
    """
    alloc = dp_densities(dict(hists), densities=tuple(levels), layers=dict(layers), stats_dtype=stats_dtype,
                         backend=backend, **settings.dp_kwargs())
    if settings.renormalize and alloc.clamped:
        names = list(alloc.densities)
        sizes = [int(hists[n].sum()) for n in names]
        lo, hi = settings.density_clamp
        cols = []
        for lvl in alloc.levels:
            raw = [lvl + alloc.layer_offset[layers[n]] + alloc.unit_offset[n] for n in names]
            cols.append(_shift_to_mean(raw, sizes, lvl, lo, hi))
        for j in range(1, len(cols)):  # keep the levels nested after the shifts
            cols[j] = [max(a, b) for a, b in zip(cols[j - 1], cols[j])]
        for i, n in enumerate(names):
            alloc.densities[n] = [col[i] for col in cols]
    return alloc


def mean_density(alloc: DPAllocation, sizes: Mapping[str, int]) -> list:
    """The N-weighted mean of the allocated densities, per level (after clamping)."""
    total = sum(sizes[n] for n in alloc.densities)
    if not total:
        return [math.nan] * len(alloc.levels)
    return [sum(alloc.densities[n][j] * sizes[n] for n in alloc.densities) / total
            for j in range(len(alloc.levels))]
