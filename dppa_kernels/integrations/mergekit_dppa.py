"""DPPA inside mergekit: the statistics pre-pass and the per-(model, tensor) lookup table.

mergekit merges one tensor at a time, but DP densities depend on whole-model statistics
(docs/methods.md, DPPA). :func:`prepare_dppa` therefore reads every unit tensor of the base and of each
model named in the config once, before mergekit plans the merge, and stores the DP densities of
every (model, unit tensor); the ``dppa`` / ``dppa_ties`` methods look them up by tensor name.

Cost: one extra streaming read of the unit tensors of base + M models ((M + 1)·N·b bytes for N
unit parameters of b bytes; the merge itself reads the same again) plus one 32768-bin histogram
per unit and model; memory is one model's histograms at a time (256 KiB per unit) and a few
floats per (model, unit) in the table.

Config keys (the ``dppa merge`` CLI's): per model or global ``densities`` (one per level; or
``density`` for one level, or ``sparsity`` = 1 − density) and ``alphas`` (one per band); global
``offset_lambda``, ``outlier_mult_layer``, ``outlier_mult_unit``, ``density_clamp``, ``tie_mode``,
``count_rule``, ``band_combine``, ``stats_dtype``, ``nonunit_mode`` (dense | official | base |
prune, see ``methods.nonunit_spec``), ``unit_pattern``, ``layer_pattern``, ``compat``.
They must be plain values (no per-tensor filters or layer gradients: mergekit would read a list
as a gradient). ``weight``, ``lambda`` and ``normalize`` are ordinary mergekit
parameters. Only ``models:`` configs are supported (slices may map a tensor to another layer).

In-memory calls (``mergekit.merge_methods.merge_state_dicts``, ``merge_tensors``, calling the
method object) hand every tensor over at once, so without an active pre-pass table the statistics
come from those tensors (:func:`in_memory_table`, with a warning): DP allocates between the unit
tensors among them (each model's level is its ``density`` parameter, else the default levels). A
file-based ``run_merge`` without the pre-pass still fails: it sees one tensor at a time.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..dppa import stats as dppa_stats
from ..dppa.allocation import DPSettings, allocate
from ..dppa.defaults import default_alphas
from ..dppa.units import unmatched_linears, warn_unmatched
from ..methods import DPPA_DEFAULTS, NONUNIT_MODES, methods, nonunit_spec, preset
from ..reference.naming import group_units, unit_layer

LOG = logging.getLogger(__name__)

_DTYPES = dppa_stats.STATS_DTYPES
_DP_KEYS = ("offset_lambda", "outlier_mult_layer", "outlier_mult_unit", "density_clamp", "compat",
            "density_renormalize")
_SPEC_KEYS = ("tie_mode", "count_rule", "band_combine", "stats_dtype")
_OTHER_KEYS = ("nonunit_mode", "unit_pattern", "layer_pattern")
_LEVEL_KEYS = ("densities", "density", "sparsity")
_PER_MODEL_KEYS = _LEVEL_KEYS + ("alphas",)

_lock = threading.Lock()
_active: dict = {"table": None}
# per call (context-local, so concurrent merges in other threads never see it)
_in_memory = contextvars.ContextVar("dppa_in_memory_call", default=False)
_call_table = contextvars.ContextVar("dppa_call_table", default=None)


@dataclass
class DPPATable:
    """DP densities per (model, unit tensor) plus the band settings, read by the merge methods."""

    densities: dict = field(default_factory=dict)  # (model key, unit tensor name) -> one per level
    levels: dict = field(default_factory=dict)  # model key -> uniform levels (before DP offsets)
    alphas: dict = field(default_factory=dict)  # model key -> band factors
    settings: dict = field(default_factory=dict)  # tie_mode, count_rule, band_combine, stats_dtype
    nonunit_mode: str = "dense"
    units: dict = field(default_factory=dict)  # unit tensor name -> layer
    patterns: dict = field(default_factory=dict)
    cost: dict = field(default_factory=dict)  # seconds, bytes_read, units
    method_for_combine: str = "dppa"  # dppa (sum) or dppa_ties

    def specs(self, name: str, models: list, shape: tuple, *, normalize: bool, lam: float):
        """(specs, combine) for tensor ``name`` merged from ``models`` (model keys); specs is None
        when the output is the base tensor itself (``nonunit_mode: base``)."""
        unknown = [k for k in models if k not in self.alphas]
        if unknown:
            raise KeyError(f"DPPA table has no statistics for model(s) {unknown}: the pre-pass ran "
                           "on another config")
        params = {"normalize": bool(normalize), "lambda": float(lam), **self.settings,
                  "alphas": [tuple(self.alphas[k]) for k in models]}
        if name in self.units:
            params["densities"] = [tuple(self.densities[(k, name)]) for k in models]
            return preset(self.method_for_combine, len(models), params)[1:]
        if unit_layer(name, shape, **self.patterns) is not None:
            raise KeyError(f"{name!r} is a DPPA unit by its name but was not seen by the statistics "
                           "pre-pass (tensor names differ between mergekit and the checkpoint?)")
        # non-units: the CLI's rule (methods.nonunit_spec) applied to the uniform levels
        params["densities"] = [tuple(self.levels[k]) for k in models]
        _, specs, combine = preset(self.method_for_combine, len(models), params)
        if self.nonunit_mode == "base":
            return None, combine
        return [nonunit_spec(self.nonunit_mode, s, self.levels[k]) for s, k in zip(specs, models)], combine


def _levels(local: dict, glob: dict, label: str) -> tuple:
    """A model's density levels from densities | density | sparsity (model value over global)."""
    own = [k for k in _LEVEL_KEYS if k in local]
    if len(own) > 1:
        raise ValueError(f"model {label!r}: set only one of densities, density, sparsity (got {own})")
    src = local if own else glob
    key = own[0] if own else next((k for k in _LEVEL_KEYS if k in glob), None)
    if key is None:
        return tuple(DPPA_DEFAULTS["densities"])
    v = src[key]
    if key == "densities":
        levels = tuple(float(x) for x in (v if isinstance(v, list) else [v]))
    elif isinstance(v, list):
        raise ValueError(f"model {label!r}: {key} for dppa is a whole-model level and cannot be a "
                         f"gradient list, got {v!r}")
    else:
        levels = (float(v),) if key == "density" else (1.0 - float(v),)
    if any(b < a for a, b in zip(levels, levels[1:])):
        raise ValueError(f"model {label!r}: densities {levels} must be non-decreasing so the bands nest")
    return levels


def dppa_spec_params(ParameterSpec, ParameterScope) -> tuple:
    """mergekit ParameterSpecs of the scalar DPPA settings (declared so mergekit validates them;
    the values used are the pre-pass's, read from the same config)."""
    shared = ParameterScope.SHARED
    return (
        ParameterSpec("density", Optional[float], ParameterScope.NON_BASE, default=None),
        ParameterSpec("offset_lambda", float, shared, default=0.08),
        ParameterSpec("outlier_mult_layer", float, shared, default=3.0),
        ParameterSpec("outlier_mult_unit", float, shared, default=5.0),
        ParameterSpec("tie_mode", str, shared, default=DPPA_DEFAULTS["tie_mode"]),
        ParameterSpec("count_rule", str, shared, default=DPPA_DEFAULTS["count_rule"]),
        ParameterSpec("band_combine", str, shared, default=DPPA_DEFAULTS["band_combine"]),
        ParameterSpec("stats_dtype", str, shared, default=DPPA_DEFAULTS["stats_dtype"]),
        ParameterSpec("nonunit_mode", str, shared, default="dense"),
    )


def set_dppa_table(table: Optional[DPPATable]) -> None:
    """Make ``table`` the one the dppa methods read (None clears it)."""
    with _lock:
        _active["table"] = table


def active_table(method: str) -> DPPATable:
    table = _call_table.get() or _active["table"]
    if table is None:
        raise RuntimeError(
            f"merge method {method!r} inside mergekit needs the DPPA statistics pre-pass: run "
            "dppa-mergekit-yaml, or dppa_kernels.integrations.mergekit.run_merge, or call "
            "dppa_kernels.integrations.mergekit.prepare_dppa(config, options) before run_merge")
    if table.method_for_combine != method:
        raise RuntimeError(f"the active DPPA table was prepared for {table.method_for_combine!r}, "
                           f"not {method!r}")
    return table


def _plain(value: Any, key: str) -> Any:
    """A config value as plain Python (scalar or list of scalars), else a clear error."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    raise ValueError(f"DPPA parameter {key!r} must be a plain value or list inside mergekit (no "
                     f"filters or per-tensor conditions), got {value!r}")


def _settings(params: Optional[dict], keys) -> dict:
    params = params or {}
    return {k: _plain(params[k], k) for k in keys if k in params}


def _local_dir(ref, options) -> str:
    merged = ref.merged(cache_dir=getattr(options, "lora_merge_cache", None),
                        trust_remote_code=getattr(options, "trust_remote_code", False),
                        lora_merge_dtype=getattr(options, "lora_merge_dtype", None))
    return merged.local_path(cache_dir=getattr(options, "transformers_cache", None))


def _stats_device(options) -> str:
    dev = getattr(options, "device", None)
    if getattr(options, "cuda", False) or dev == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return dev or "cpu"


def prepare_dppa(merge_config, options=None, *, backend: str = "auto", activate: bool = True) -> DPPATable:
    """Run the DPPA statistics pre-pass for a mergekit ``MergeConfiguration`` (merge_method
    ``dppa`` or ``dppa_ties``) and, with ``activate``, make the table the active one."""
    method = merge_config.merge_method
    if not getattr(methods().get(method), "dppa", False):
        raise ValueError(f"prepare_dppa is for merge_method dppa / dppa_ties, got {method!r}")
    if not merge_config.models or merge_config.slices or merge_config.modules:
        raise ValueError("dppa inside mergekit supports 'models:' configs only (slices and modules "
                         "may map a tensor to another layer, which breaks per-tensor statistics)")
    if merge_config.base_model is None:
        raise ValueError("dppa needs a base_model")
    t0 = time.perf_counter()
    glob = _settings(merge_config.parameters, _DP_KEYS + _SPEC_KEYS + _OTHER_KEYS + _PER_MODEL_KEYS)
    settings = {k: glob.get(k, DPPA_DEFAULTS.get(k)) for k in _SPEC_KEYS}
    if settings["stats_dtype"] not in _DTYPES:
        raise ValueError(f"stats_dtype must be one of {sorted(_DTYPES)}, got {settings['stats_dtype']!r}")
    nonunit = glob.get("nonunit_mode", "dense")
    if nonunit not in NONUNIT_MODES:
        raise ValueError(f"nonunit_mode must be one of {NONUNIT_MODES}, got {nonunit!r}")
    patterns = {k: glob[k] for k in ("unit_pattern", "layer_pattern") if glob.get(k)}
    dp = DPSettings.from_params({k: glob[k] for k in _DP_KEYS if k in glob})
    stats_dtype = _DTYPES[settings["stats_dtype"]]
    device = _stats_device(options)
    base_ref = merge_config.base_model
    base_dir = _local_dir(base_ref, options)
    layers = dppa_stats.unit_layers(base_dir, **patterns)
    if not layers:
        raise ValueError(f"no DPPA unit tensors found in {base_dir!r}; set unit_pattern / layer_pattern")
    warn_unmatched(unmatched_linears(dppa_stats.tensor_shapes(base_dir), layers,
                                     layer_pattern=patterns.get("layer_pattern")))
    from mergekit.common import dtype_from_name

    model_dirs = {str(m.model): _local_dir(m.model, options) for m in merge_config.models
                  if m.model != base_ref}
    # Δ in the dtype mergekit will merge in: the config's dtype, else the promoted input dtype
    dtype = dtype_from_name(merge_config.dtype) if merge_config.dtype else \
        dppa_stats.promoted_dtypes([base_dir, *model_dirs.values()], layers)
    table = DPPATable(settings=settings, nonunit_mode=nonunit, units=dict(layers), patterns=patterns,
                      method_for_combine=method)
    nbytes = 0
    for model_in in merge_config.models:
        ref = model_in.model
        if ref == base_ref:
            continue
        local = _settings(model_in.parameters, _PER_MODEL_KEYS)
        levels = _levels(local, glob, str(ref))
        alphas = tuple(float(x) for x in local.get("alphas", glob.get("alphas", default_alphas(len(levels)))))
        if len(alphas) != len(levels):
            raise ValueError(f"{ref}: alphas {alphas} must have one factor per density level {levels}")
        model_dir = model_dirs[str(ref)]
        hists = dppa_stats.folder_histograms(base_dir, model_dir, list(layers), dtype=dtype,
                                             stats_dtype=stats_dtype, device=device, backend=backend)
        alloc = allocate(hists, layers, levels, dp, stats_dtype=stats_dtype, backend=backend)
        del hists
        for name in layers:
            table.densities[(str(ref), name)] = tuple(float(d) for d in alloc.densities[name])
        table.alphas[str(ref)] = alphas
        table.levels[str(ref)] = levels
        nbytes += dppa_stats.unit_bytes(base_dir, layers) + dppa_stats.unit_bytes(model_dir, layers)
    table.cost = {"seconds": time.perf_counter() - t0, "bytes_read": nbytes, "units": len(layers)}
    LOG.info("DPPA statistics pre-pass: %d units x %d models, %.1f MB read, %.2f s", len(layers),
             len(table.alphas), nbytes / 1e6, table.cost["seconds"])
    if activate:
        set_dppa_table(table)
    return table


@contextlib.contextmanager
def in_memory_call():
    """Marks a call whose groups hold every tensor to merge (the in-memory API)."""
    token = _in_memory.set(True)
    try:
        yield
    finally:
        _in_memory.reset(token)


@contextlib.contextmanager
def call_table(table: Optional[DPPATable]):
    """Make ``table`` the one this call's merge_group reads (None: leave things as they are)."""
    if table is None:
        yield
        return
    token = _call_table.set(table)
    try:
        yield
    finally:
        _call_table.reset(token)


def _shared(parameters: list, key: str) -> Any:
    """A whole-model setting, which must be the same for every tensor group."""
    values = {repr(p[key]) for p in parameters}
    if len(values) > 1:
        raise ValueError(f"dppa: {key} is a whole-model setting and must not vary between tensors, got "
                         f"{sorted(values)}")
    return parameters[0][key]


def in_memory_table(method: str, groups, parameters: list, input_dtypes, *, backend: str = "auto"
                    ) -> Optional[DPPATable]:
    """The statistics pre-pass over in-memory tensor groups (mergekit ``TensorGroup`` s with bound
    parameters), when this is an in-memory call and no pre-pass table is active; else None.

    Units are the groups whose name and shape make them one (``reference.naming``); Δ = entry −
    base in the group's merge dtype; DP allocates between those units, per model.
    """
    if not _in_memory.get() or _active["table"] is not None or not groups:
        return None
    settings = {k: _shared(parameters, k) for k in _SPEC_KEYS}
    if settings["stats_dtype"] not in _DTYPES:
        raise ValueError(f"stats_dtype must be one of {sorted(_DTYPES)}, got {settings['stats_dtype']!r}")
    nonunit = _shared(parameters, "nonunit_mode")
    if nonunit not in NONUNIT_MODES:
        raise ValueError(f"nonunit_mode must be one of {NONUNIT_MODES}, got {nonunit!r}")
    dp = {k: float(_shared(parameters, k)) for k in ("offset_lambda", "outlier_mult_layer", "outlier_mult_unit")}
    stats_dtype = _DTYPES[settings["stats_dtype"]]
    named = [(g, p, dt) for g, p, dt in zip(groups, parameters, input_dtypes) if g.base is not None]
    layers = group_units({g.metadata.name or "": tuple(g.base.tensor.shape) for g, _, _ in named})
    table = DPPATable(settings=settings, nonunit_mode=nonunit, units=dict(layers), method_for_combine=method)
    ids = list(dict.fromkeys(e.id for g, _, _ in named for e in g.non_base))
    for mid in ids:
        given = {repr(p["density"].get(mid)) for g, p, _ in named if any(e.id == mid for e in g.non_base)}
        if len(given) > 1:
            raise ValueError(f"dppa: model {mid!r}'s density is a whole-model level and must not vary "
                             f"between tensors, got {sorted(given)}")
        d = next(p["density"].get(mid) for g, p, _ in named if any(e.id == mid for e in g.non_base))
        levels = tuple(DPPA_DEFAULTS["densities"]) if d is None else (float(d),)
        hists = {}
        with torch.no_grad():
            for g, _, dt in named:
                name = g.metadata.name or ""
                entry = next((e for e in g.non_base if e.id == mid), None)
                if name in layers and entry is not None:
                    dt = dt or torch.promote_types(entry.tensor.dtype, g.base.tensor.dtype)
                    delta = entry.tensor.to(dt) - g.base.tensor.to(dt)
                    hists[name] = dppa_stats.unit_histogram(delta, stats_dtype, backend)
        unit_layers = {n: layers[n] for n in hists}
        alloc = allocate(hists, unit_layers, levels, DPSettings(**dp), stats_dtype=stats_dtype, backend=backend)
        for name in unit_layers:
            table.densities[(str(mid), name)] = tuple(float(x) for x in alloc.densities[name])
        table.levels[str(mid)] = levels
        table.alphas[str(mid)] = default_alphas(len(levels))
    warnings.warn(f"{method}: no DPPA statistics pre-pass is active; the statistics come from the {len(named)} "
                  f"tensor(s) of this call ({len(layers)} DPPA unit(s) among them, the rest merged with "
                  f"nonunit_mode {nonunit!r}). Run prepare_dppa(config, options) for whole-model statistics.",
                  stacklevel=2)
    return table
