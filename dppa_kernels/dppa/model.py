"""Whole-model DPPA in memory: statistics once, then any number of apply / merge calls.

    import dppa_kernels as dk
    d = dk.dppa.DPPA.from_models(base_sd, [ft_sd_a, ft_sd_b], densities=(0.1, 0.2))
    pruned = d.apply((1.8, 1.0))                  # [{name: Δ'}, ...] one per fine-tuned model
    merged = d.merge((1.8, 1.0), combine="ties")  # {name: tensor}
    best = d.search(evaluate, strategy="greedy")  # α chosen on the caller's validation split

Construction runs phase A (one histogram per unit and model) and phase B (the DP allocation) and
caches, per model and unit, every level's threshold and tie budget (:class:`UnitBands`). An
``apply`` / ``merge`` call only builds plans from that cache and runs the fused apply pass
(docs/dppa.md). Tensors stay on the device they came on (CPU or CUDA); deltas are kept in the
promoted dtype of base and fine-tuned tensor (bf16, fp16 or fp32).
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch

from ..backends.base import ApplyPlan
from ..backends.registry import get_backend, resolve
from ..methods import NONUNIT_MODES, nonunit_spec, preset
from ..plans import make_plan
from ..reference.naming import group_units
from ..spec import CombineSpec, SparsifySpec
from . import stats as S
from .allocation import DPSettings, allocate, mean_density
from .defaults import DEFAULT_DENSITIES, resolve_alphas, resolve_settings
from .thresholds import UnitBands, factors_of
from .units import unmatched_linears, warn_unmatched

LOG = logging.getLogger(__name__)
WORK_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
COMBINES = ("sum", "mean", "ties")

Alphas = Union[None, str, Sequence[float], Sequence[Sequence[float]]]
from ..vocab import MAX_BANDS


def _per_model(value, m: int, what: str) -> list:
    """One entry per model from a shared value or a per-model list of lists."""
    if isinstance(value, (list, tuple)) and value and isinstance(value[0], (list, tuple, str)):
        if len(value) != m:
            raise ValueError(f"{what} has {len(value)} per-model entries, expected {m}")
        return list(value)
    return [value] * m


def _check_levels(levels, i: int, m: int) -> tuple:
    """One model's density levels: 1..MAX_BANDS numbers in [0, 1], non-decreasing."""
    what = "densities" if m == 1 else f"densities of model {i}"
    if not isinstance(levels, (list, tuple)) or not 1 <= len(levels) <= MAX_BANDS:
        raise ValueError(f"{what} must hold 1 to {MAX_BANDS} levels, got {str(levels)[:60]!r}")
    for j, x in enumerate(levels):
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 <= x <= 1.0:
            raise ValueError(f"{what}[{j}] must be in [0, 1], got {str(x)[:40]!r}")
    if list(levels) != sorted(levels):
        raise ValueError(f"{what} must be non-decreasing, got {str(levels)[:60]!r}")
    return tuple(float(x) for x in levels)


class DPPA:
    """DPPA of M fine-tuned models against one base, with the statistics cached.

    ``densities``: the DP levels 1 − s_j (non-decreasing; one list for all models or one per
    model). Units are 2-D linear weights inside numbered blocks (``unit_pattern`` /
    ``layer_pattern`` override the names); other floating tensors follow ``nonunit_mode``
    (``dense``: Δ × 1; ``official``: Δ × max α; ``base``: Δ dropped; ``prune``: the bands at the
    uniform levels). Ties at a threshold follow ``tie_mode`` (``exact_k``, the default, keeps exactly
    each level's count, ties in flat index order; ``gt`` prunes every element equal to τ, the
    official rule; ``ge`` keeps them all). A level at density 1 keeps every element.
    ``compat="official"`` reproduces the official code: its bf16 outlier tests and offset
    arithmetic, ``tie_mode="gt"``, ``nonunit_mode="official"``, and a level at density 1 still
    pruning the smallest magnitudes; ``tie_mode``, ``count_rule``, ``band_combine``,
    ``stats_dtype`` and ``nonunit_mode`` then default to the official values, and a contradicting
    value is a ValueError (defaults otherwise: ``defaults.DEFAULT_SETTINGS``).
    """

    def __init__(self, base: Mapping[str, torch.Tensor], fts: Sequence[Mapping[str, torch.Tensor]], *,
                 densities: Union[Sequence[float], Sequence[Sequence[float]]] = DEFAULT_DENSITIES,
                 labels: Optional[Sequence[str]] = None, offset_lambda: float = 0.08,
                 outlier_mult_layer: float = 3.0, outlier_mult_unit: float = 5.0,
                 density_clamp: tuple = (0.0, 1.0), renormalize: bool = False, compat: Optional[str] = None,
                 tie_mode: Optional[str] = None, count_rule: Optional[str] = None,
                 band_combine: Optional[str] = None, stats_dtype: Any = None,
                 nonunit_mode: Optional[str] = None, unit_pattern: Optional[str] = None,
                 layer_pattern: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                 backend: str = "auto") -> None:
        if not isinstance(base, Mapping) or not base:
            raise TypeError("base must be a non-empty mapping of tensor name -> tensor (a state dict)")
        if isinstance(fts, Mapping) or not isinstance(fts, Sequence) or not fts:
            raise TypeError("fts must be a non-empty list of state dicts, one per fine-tuned model")
        self.m = len(fts)
        self.labels = list(labels) if labels is not None else [f"model {i}" for i in range(self.m)]
        if len(self.labels) != self.m:
            raise ValueError(f"labels has {len(self.labels)} entries, expected {self.m}")
        given = {"tie_mode": tie_mode, "count_rule": count_rule, "band_combine": band_combine,
                 "stats_dtype": stats_dtype, "nonunit_mode": nonunit_mode}
        tie_mode, count_rule, band_combine, stats_dtype, nonunit_mode = (
            resolve_settings(compat, given)[k] for k in given)
        if nonunit_mode not in NONUNIT_MODES:
            raise ValueError(f"nonunit_mode must be one of {NONUNIT_MODES}, got {str(nonunit_mode)[:40]!r}")
        if tie_mode not in ("gt", "ge", "exact_k"):
            raise ValueError(f"tie_mode must be gt, ge or exact_k, got {str(tie_mode)[:40]!r}")
        factors_of((1.0,), band_combine)  # validates band_combine
        self.settings = DPSettings(offset_lambda, outlier_mult_layer, outlier_mult_unit,
                                   tuple(density_clamp) if isinstance(density_clamp, (list, tuple)) else density_clamp,
                                   compat, renormalize)
        self.official = self.settings.compat == "official"
        self.tie_mode, self.count_rule, self.band_combine = tie_mode, count_rule, band_combine
        self.nonunit_mode = nonunit_mode
        self.sdtype = S.stats_dtype_of(stats_dtype)
        per_model = _per_model(list(densities), self.m, "densities")
        shared = not (densities and isinstance(list(densities)[0], (list, tuple)))
        self.levels = [_check_levels(lv, i, 1 if shared else self.m) for i, lv in enumerate(per_model)]
        self.base = dict(base)
        self.device = next(iter(self.base.values())).device
        self.backend = resolve(backend, self.device)
        if self.backend == "reference":
            self.backend = "torch"  # the reference has no apply pass; torch runs the same semantics
        self._be = get_backend(self.backend)
        self.deltas = [self._deltas(i, ft, dtype) for i, ft in enumerate(fts)]
        pats = {k: v for k, v in (("unit_pattern", unit_pattern), ("layer_pattern", layer_pattern)) if v}
        self.units = group_units({n: tuple(t.shape) for n, t in self.deltas[0].items()}, **pats)
        if not self.units:
            raise ValueError("no DPPA unit tensors (2-D linear weights inside numbered blocks) in the state dict; "
                             "pass unit_pattern / layer_pattern")
        self.unmatched = unmatched_linears({n: tuple(t.shape) for n, t in self.deltas[0].items()}, self.units,
                                           layer_pattern=layer_pattern)
        warn_unmatched(self.unmatched)
        self.stats_passes = 0
        self._static_into = None  # (id of an ``into`` dict, merge settings) whose α-free tensors are written
        self._statistics()

    # -- construction -------------------------------------------------------------------------

    def _unalias(self, into: Mapping[str, torch.Tensor]) -> None:
        """Copy the base tensors that share memory with ``into`` (a module built from the same
        weights): writing a candidate there must never change the base later merges start from."""
        for name, b in self.base.items():
            t = into.get(name)
            if t is not None and t.numel() and b.numel() and t.untyped_storage().data_ptr() == b.untyped_storage().data_ptr():
                self.base[name] = b.clone()
                self._base_work.pop(name, None)

    @classmethod
    def from_models(cls, base: Mapping[str, torch.Tensor], fts: Sequence[Mapping[str, torch.Tensor]],
                    **kwargs: Any) -> "DPPA":
        """From in-memory state dicts (base first, then one per fine-tuned model)."""
        return cls(base, fts, **kwargs)

    @classmethod
    def from_hf(cls, base, models: Sequence, **kwargs: Any) -> "DPPA":
        """From ``torch.nn.Module`` s (e.g. Hugging Face models): their ``state_dict()`` s, detached.
        ``base`` is kept as :attr:`module`, the model a search evaluates candidates in."""
        sds = [{k: v.detach() for k, v in m.state_dict().items()} for m in [base, *models]]
        out = cls(sds[0], sds[1:], **kwargs)
        out.module = base
        return out

    @classmethod
    def from_folders(cls, base_dir: str, model_dirs: Sequence[str], *, device: str = "cpu",
                     **kwargs: Any) -> "DPPA":
        """From Hugging Face folders of safetensors (read whole into memory on ``device``)."""
        from ..engine.source import ModelSource

        sds = []
        for path in [base_dir, *model_dirs]:
            src = ModelSource(path)
            try:
                sds.append({n: src.read(n).to(device) for n in src.tensors})
            finally:
                src.close()
        kwargs.setdefault("labels", [str(p) for p in model_dirs])
        return cls(sds[0], sds[1:], **kwargs)

    def _deltas(self, i: int, ft: Mapping[str, torch.Tensor], dtype: Optional[torch.dtype]) -> dict:
        label = self.labels[i]
        missing = [n for n in self.base if n not in ft and self.base[n].is_floating_point()]
        if missing:
            raise ValueError(f"{label}: tensor {missing[0]!r} of the base is missing ({len(missing)} in all)")
        out = {}
        for name, b in self.base.items():
            if not b.is_floating_point():
                continue
            x = ft[name]
            if x.device != b.device:
                raise ValueError(f"{label}: tensor {name!r} is on {x.device}, the base's on {b.device}")
            if x.dim() == 2 and b.dim() == 2 and x.shape[1] == b.shape[1] and x.shape[0] > b.shape[0]:
                x = x[: b.shape[0]]  # extra vocabulary rows of the fine-tuned model are cut off
            if tuple(x.shape) != tuple(b.shape):
                raise ValueError(f"{label}: tensor {name!r} has shape {tuple(x.shape)}, the base {tuple(b.shape)}")
            wd = dtype or torch.promote_types(b.dtype, x.dtype)
            if wd not in WORK_DTYPES:
                raise TypeError(f"{label}: tensor {name!r} would be merged in {wd}; DPPA works in bf16, fp16 or fp32")
            with torch.no_grad():
                d = S.form_delta(b, x, wd, compat=self.settings.compat).contiguous()
            if not bool(torch.isfinite(d.sum())) and bool((~torch.isfinite(d)).any()):
                raise ValueError(f"{label}: the delta of tensor {name!r} has NaN/Inf values")
            out[name] = d
        return out

    def _statistics(self) -> None:
        """Phase A and B: histograms, allocation, the per-unit band cache; non-unit plan templates."""
        self.stats_passes += 1
        self.allocations, self.bands, self._templates = [], [], []
        self._unit_plans = [dict() for _ in range(self.m)]  # {unit: plan}: per call only the factors change
        self._base_work: dict = {}  # {name: base in the working dtype} where that is a conversion
        sizes = {n: self.deltas[0][n].numel() for n in self.units}
        self.summary = []
        for i in range(self.m):
            hists = {n: S.unit_histogram(self.deltas[i][n], self.sdtype, self.backend) for n in self.units}
            alloc = allocate(hists, self.units, self.levels[i], self.settings, stats_dtype=self.sdtype,
                             backend=self.backend)
            self.allocations.append(alloc)
            self.bands.append({n: UnitBands.from_hist(hists[n], alloc.densities[n], self.sdtype, self.count_rule,
                                                      prunes_min=self.official) for n in self.units})
            self.summary.append({"model": self.labels[i], "levels": list(self.levels[i]),
                                 "mean_density": mean_density(alloc, sizes), "clamped": len(alloc.clamped)})
            self._templates.append(self._nonunit_templates(i))

    def _nonunit_templates(self, i: int) -> dict:
        """{non-unit name: plan} by the package's non-unit rule (``methods.nonunit_spec``), with
        placeholder factors that :meth:`_plans` replaces."""
        unit_spec = SparsifySpec("bands", densities=self.levels[i], alphas=(1.0,) * len(self.levels[i]),
                                 tie_mode=self.tie_mode, count_rule=self.count_rule, key_dtype=self.sdtype,
                                 band_combine=self.band_combine)
        out = {}
        for name, d in self.deltas[i].items():
            if name in self.units:
                continue
            spec = nonunit_spec(self.nonunit_mode, unit_spec, self.levels[i])
            out[name] = ApplyPlan("dense") if spec.method == "none" or d.numel() == 0 else \
                make_plan(self._be, d, spec, seed=0, name=name, stream=i)
        return out

    # -- apply ----------------------------------------------------------------------------------

    def alphas_of(self, alphas: Alphas) -> list:
        """Per-model factor tuples from None (the default preset), a preset name, one list of
        factors shared by every model, or one entry per model."""
        return [resolve_alphas(a, len(lv), what=f"alphas of {self.labels[i]}")
                for i, (a, lv) in enumerate(zip(_per_model(alphas, self.m, "alphas"), self.levels))]

    def _plans(self, alphas: list, name: str, models: Sequence[int]) -> list:
        """The plans of tensor ``name`` for ``models`` (``alphas``: one entry each)."""
        if name in self.units:
            return [replace(self._unit_plan(i, name), factors=factors_of(a, self.band_combine))
                    for a, i in zip(alphas, models)]
        out = []
        for a, i in zip(alphas, models):
            p = self._templates[i][name]
            if self.nonunit_mode == "official":
                p = replace(p, factors=(max(a),))
            elif self.nonunit_mode == "prune":
                p = replace(p, factors=factors_of(a, self.band_combine))
            out.append(p)
        return out

    def _unit_plan(self, i: int, name: str) -> ApplyPlan:
        """Model i's threshold plan of unit ``name`` (placeholder factors), built once."""
        plan = self._unit_plans[i].get(name)
        if plan is None:
            plan = self.bands[i][name].plan((1.0,) * len(self.levels[i]), self.tie_mode)
            self._unit_plans[i][name] = plan
        return plan

    def _work_base(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """The base tensor in the working dtype, converted once (not cached when no conversion is
        needed, so that :meth:`_unalias` replacing the base takes effect)."""
        bw = self._base_work.get(name)
        if bw is None:
            b = self.base[name]
            bw = b.to(dtype).contiguous()
            if bw is not b:
                self._base_work[name] = bw
        return bw

    def apply(self, alphas: Alphas = None) -> list:
        """Pruned and amplified deltas, one ``{name: Δ'}`` per fine-tuned model (dtype of Δ).

        Δ'[e] = f_j · Δ[e] for an element in band j (factors from ``alphas`` and ``band_combine``),
        0 below the last level; non-units follow ``nonunit_mode``.
        """
        al = self.alphas_of(alphas)
        out = [dict() for _ in range(self.m)]
        with torch.no_grad():
            for name in self.deltas[0]:
                plans = self._plans(al, name, range(self.m))
                for i in range(self.m):
                    d = self.deltas[i][name]
                    out[i][name] = d.clone() if d.numel() == 0 else \
                        self._be.apply([d], None, [plans[i]], [1.0], CombineSpec(), d.dtype)
        return out

    def combine_spec(self, combine: str = "sum", weights: Optional[Sequence[float]] = None,
                     lam: float = 1.0, m: Optional[int] = None) -> tuple[list, CombineSpec]:
        """(weights, CombineSpec): ``sum`` θ = base + λ Σ w_i Δ'_i; ``mean`` divides by Σ w_i;
        ``ties`` elects a sign per element and sums the agreeing w_i Δ'_i divided by their Σ w_i
        (mergekit's dppa_ties)."""
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {str(combine)[:40]!r}")
        m = self.m if m is None else m
        w = [1.0] * m if weights is None else [float(x) for x in weights]
        if len(w) != m or not all(math.isfinite(x) for x in w):
            raise ValueError(f"weights must be {m} finite numbers, got {str(weights)[:80]!r}")
        if not isinstance(lam, (int, float)) or isinstance(lam, bool) or not math.isfinite(lam):
            raise ValueError(f"lam must be a finite number, got {str(lam)[:40]!r}")
        method = "dppa_ties" if combine == "ties" else "dppa"
        params = {"lambda": float(lam)}
        if combine == "mean":
            params["normalize"] = True
        _, _, spec = preset(method, m, params)
        return w, spec

    def merge(self, alphas: Alphas = None, *, combine: str = "sum", weights: Optional[Sequence[float]] = None,
              lam: float = 1.0, out_dtype: Optional[torch.dtype] = None,
              models: Optional[Sequence[int]] = None, into: Optional[Mapping[str, torch.Tensor]] = None) -> dict:
        """The merged state dict: base + λ · combine(w_i · Δ'_i) for every floating tensor (cast
        once to ``out_dtype``, default the working dtype: the promoted dtype of base and fine-tuned
        tensors, or ``dtype``); other tensors are the base's.
        ``models``: merge only these models (indices; ``alphas`` and ``weights`` then list theirs).
        ``into``: a state dict (e.g. a model's ``state_dict()``) whose tensors receive the merge in
        place and are returned; tensors that do not depend on α (non-units under ``dense`` or
        ``base``, integer buffers) are then written by the first call into that dict only, so the
        caller must not change them in between."""
        sel = list(range(self.m)) if models is None else [int(i) for i in models]
        if not sel or any(not 0 <= i < self.m for i in sel):
            raise ValueError(f"models must be indices in [0, {self.m}), got {str(models)[:60]!r}")
        al = _per_model(alphas, len(sel), "alphas")
        al = [resolve_alphas(a, len(self.levels[i]), what=f"alphas of {self.labels[i]}") for a, i in zip(al, sel)]
        w, spec = self.combine_spec(combine, weights, lam, len(sel))
        out = {}
        static_key = (tuple(sel), tuple(w), spec, out_dtype)
        fixed = into is not None and getattr(self, "_static_into", None) == (id(into), static_key)
        if into is not None:
            self._unalias(into)
        with torch.no_grad():
            for name, b in self.base.items():
                if fixed and (name not in self.units and self.nonunit_mode in ("dense", "base")
                              or name not in self.deltas[0]):
                    out[name] = into[name]  # α does not change it: written by an earlier call
                    continue
                if name not in self.deltas[0]:
                    out[name] = b if into is None else into[name].copy_(b)
                    continue
                ds = [self.deltas[i][name] for i in sel]
                od = out_dtype or ds[0].dtype  # the working dtype, as dppa merge writes
                if b.numel() == 0:
                    out[name] = b.to(od).clone()
                    continue
                out[name] = self._be.apply(ds, self._work_base(name, ds[0].dtype), self._plans(al, name, sel), w,
                                           spec, od)
                if into is not None:
                    out[name] = into[name].copy_(out[name])
        if into is not None:
            self._static_into = (id(into), static_key)
        return out

    def realised_density(self, alphas: Alphas = None) -> list:
        """Per model: the fraction of the unit parameters kept with a non-zero factor (exact)."""
        al = self.alphas_of(alphas)
        out = []
        for i in range(self.m):
            f = factors_of(al[i], self.band_combine)
            kept = sum(b.kept(f, self.tie_mode) for b in self.bands[i].values())
            total = sum(b.n for b in self.bands[i].values())
            out.append(kept / total if total else 0.0)
        return out

    def search(self, evaluate: Union[Callable, Sequence[Callable]], **kwargs: Any):
        """Search the band factors on the caller's validation data; see :func:`.search.search`."""
        from .search import search

        return search(self, evaluate, **kwargs)
