"""DPPA (arXiv 2403.02799): Dynamic Pruning allocates per-unit densities from the deltas'
magnitude statistics, Partition Amplification keeps K nested magnitude bands and scales band j
by its factor. The statistics pass lives in the engine and the mergekit integration; here are the
parameters and the per-tensor band sparsifier they end in."""

from __future__ import annotations

from typing import Sequence

from .. import plans as P
from ..dppa.defaults import DEFAULT_DENSITIES, DEFAULT_TIE_MODE, PRESETS, default_alphas, resolve_alphas
from ..reference import sparsify as S
from ..spec import SparsifySpec
from ..vocab import MAX_BANDS, STATS_DTYPES
from . import _common as C
from .registry import MergeMethod, Param, Sparsifier, per_model, register

NONUNIT_MODES = ("dense", "official", "base", "prune")
LEVEL_PARAMS = ("densities", "density", "sparsity")  # the ways to set a model's DP density levels (set one)
DPPA_DEFAULTS = {"densities": DEFAULT_DENSITIES, "alphas": default_alphas(len(DEFAULT_DENSITIES)),
                 "tie_mode": DEFAULT_TIE_MODE, "count_rule": "dppa", "band_combine": "max",
                 "stats_dtype": "bfloat16"}


def _p(name, type_, scope, doc, **kw):
    return Param(name, type_, kw.pop("default", DPPA_DEFAULTS.get(name)), scope, doc, **kw)


class _Alphas(Param):
    """``alphas``: a list of factors, or the name of a preset (``dppa.defaults.PRESETS``)."""

    def check(self, value, where):
        if isinstance(value, str):
            resolve_alphas(value, 1, what=f"{where}: alphas")  # ValueError naming the value and the presets
            return value
        return super().check(value, where)


def _params(norm: bool) -> tuple:
    return (
        C.weight(required=False),
        _p("densities", list, "model", "density levels d_1 ≤ … ≤ d_K, one band each (before the DP offsets)",
           low=0.0, high=1.0, stage="dppa"),
        _p("density", float, "model", "one level: densities [density]", default=None, low=0.0, high=1.0,
           stage="dppa"),
        _p("sparsity", float, "model", "one level: densities [1 − sparsity]", default=None, low=0.0, high=1.0,
           stage="dppa"),
        _Alphas("alphas", list, None, "model", "band factors, highest band first, or a preset: "
                + ", ".join(PRESETS) + " (default plain: 1 on every band, plain DP)"),
        C.normalize(norm),
        Param("rescale", bool, False, "global", "L1 rescale after the bands (not used by DPPA)",
              choices=("inv_density", "l1"), mergekit=False),
        C.LAMBDA,
        Param("int8_mask", bool, False, "global", C.INT8_MASK.doc, mergekit=False),
        _p("tie_mode", str, "global", "who is kept at a band threshold", choices=C.TIE_MODE.choices),
        _p("count_rule", str, "global", "keep count per level (dppa: n − floor(n·(1 − d)))",
           choices=C.COUNT_RULE.choices),
        C.PARTITION, C.BLOCK_SIZE, C.ELECT, C.DIVISOR,
        _p("band_combine", str, "global", "band factor: max of the factors at or below it, or its own",
           choices=S.BAND_COMBINES),
        _p("stats_dtype", str, "global", "dtype the magnitude keys are rounded to", choices=tuple(STATS_DTYPES)),
        _p("offset_lambda", float, "global", "DP offset strength", default=0.08, low=0.0, stage="dppa"),
        _p("outlier_mult_layer", float, "global", "outlier threshold, layer level (× mean)", default=3.0,
           stage="dppa"),
        _p("outlier_mult_unit", float, "global", "outlier threshold, unit level (× mean)", default=5.0,
           stage="dppa"),
        _p("density_clamp", list, "global", "[lo, hi] bounds of the allocated densities", default=(0.0, 1.0),
           low=0.0, high=1.0, stage="dppa"),
        _p("nonunit_mode", str, "global", "what happens to tensors outside the units", default="dense",
           choices=NONUNIT_MODES, stage="dppa"),
        _p("compat", str, "global", "reproduce the official code's allocation quirks", default=None,
           stage="dppa"),
        _p("unit_pattern", str, "global", "regex of the unit tensors' names", default=None, stage="dppa"),
        _p("layer_pattern", str, "global", "regex whose group 1 is the layer index", default=None, stage="dppa"),
        _p("density_renormalize", bool, "global", "rescale the allocated densities so that their mean is "
           "exactly the configured one after clamping", default=False, stage="dppa"),
    )


class Bands(Sparsifier):
    """K nested magnitude bands per partition; band j keeps factor f_j, below the last 0."""

    name = "bands"
    uses_density = False

    def spec(self, i, p, m, common):
        ds = per_model(p["densities"], m, "densities", lists=True)[i]
        al = per_model(p["alphas"], m, "alphas", lists=True)[i]
        sd = p.get("stats_dtype", DPPA_DEFAULTS["stats_dtype"])
        if sd not in STATS_DTYPES:
            raise ValueError(f"stats_dtype must be one of {sorted(STATS_DTYPES)}, got {sd!r}")
        return SparsifySpec("bands", densities=tuple(float(x) for x in ds), alphas=tuple(float(a) for a in al),
                            band_combine=p.get("band_combine", DPPA_DEFAULTS["band_combine"]),
                            count_rule=p.get("count_rule", DPPA_DEFAULTS["count_rule"]),
                            key_dtype=STATS_DTYPES[sd], **common)

    def check(self, s, argname):
        from .._validate import check_density

        if not s.densities:
            raise ValueError(f"{argname}.densities must list at least one density for method='bands'")
        if len(s.densities) > MAX_BANDS:
            raise ValueError(f"{argname}.densities has {len(s.densities)} bands; at most {MAX_BANDS} are supported "
                             f"(got {tuple(s.densities)[:MAX_BANDS + 2]})")
        for j, d in enumerate(s.densities):
            check_density(d, f"{argname}.densities[{j}]")
        if any(b < a for a, b in zip(s.densities, s.densities[1:])):
            raise ValueError(f"{argname}.densities must be non-decreasing so the bands nest, got {tuple(s.densities)}")
        if len(s.alphas) != len(s.densities):
            raise ValueError(f"{argname}.alphas must have one factor per band ({len(s.densities)}), got {tuple(s.alphas)}")
        if any(not (a >= 0) for a in s.alphas):
            raise ValueError(f"{argname}.alphas must be >= 0, got {tuple(s.alphas)}")

    def plan(self, be, delta, spec, *, seed, name, stream, check_as):
        plan = P.threshold_plan(be, delta, spec, self.level_keeps(delta, spec),
                                S.band_factors(spec.alphas, spec.band_combine), spec.tie_mode, check_as)
        return P.keep_full_levels(plan, spec.densities, spec.density1_prunes_min)

    def level_keeps(self, delta, spec):
        return [P.keep_of(delta, spec, d) for d in spec.densities]

    def target(self, spec):
        return list(spec.densities)

    def factor(self, delta, spec, *, seed, name, stream):
        return S.bands_factor(delta, spec.densities, spec.alphas, spec.band_combine,
                              density1_prunes_min=spec.density1_prunes_min, **spec.mask_kwargs())



register(
    Bands(),
    MergeMethod("dppa", "DPPA", "bands", "sum", False, False, _params(False), reference="2403.02799",
                mergekit="ours", dppa=True, defaults=DPPA_DEFAULTS),
    MergeMethod("dppa_ties", "DPPA + TIES", "bands", "ties", True, False, _params(True), reference="2403.02799",
                mergekit="ours", dppa=True, defaults=DPPA_DEFAULTS),
)


def nonunit_spec(nonunit_mode: str, unit_spec: SparsifySpec, levels: Sequence[float]) -> SparsifySpec:
    """How DPPA treats a non-unit tensor (embeddings, lm_head, norms, biases; docs/methods.md).

    ``dense``: Δ × 1 (default); ``official``: Δ × max α (what the official code does to every
    key); ``base``: Δ dropped; ``prune``: the unit's bands at the uniform levels (no DP offsets),
    same tie rule and factors.
    """
    if nonunit_mode == "dense":
        return SparsifySpec("none")
    if nonunit_mode == "official":
        return SparsifySpec("bands", densities=(1.0,), alphas=(max(unit_spec.alphas or (1.0,)),))
    if nonunit_mode == "base":
        return SparsifySpec("magnitude", density=0.0)
    if nonunit_mode == "prune":
        return unit_spec.with_(densities=tuple(float(x) for x in levels))
    raise ValueError(f"nonunit_mode must be one of {NONUNIT_MODES}, got {nonunit_mode!r}")
