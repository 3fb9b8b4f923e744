"""DPPA inside mergekit: the statistics pre-pass and the per-(model, tensor) lookup table.

mergekit merges one tensor at a time, but DP densities depend on whole-model statistics
(docs/methods.md, DPPA). :func:`prepare_dppa` therefore reads every unit tensor of the base and of each
model named in the config once, before mergekit plans the merge, and stores the DP densities of
every (model, unit tensor); the ``dppa`` / ``dppa_ties`` methods look them up by tensor name.

Cost: one extra streaming read of the unit tensors of base + M models ((M + 1)·N·b bytes for N
unit parameters of b bytes; the merge itself reads the same again) plus one 32768-bin histogram
per unit and model; memory is one model's histograms at a time (256 KiB per unit) and a few
floats per (model, unit) in the table.

Config keys: the method's mergekit parameters in its registry entry (``methods/dppa.py``), the
``dppa merge`` CLI's: per model or global ``densities`` (one per level; or ``density`` for one
level, or ``sparsity`` = 1 − density) and ``alphas`` (one factor per band, or a preset name:
``dppa.defaults.PRESETS``); global ``offset_lambda``, ``outlier_mult_layer``, ``outlier_mult_unit``,
``density_clamp``, ``density_renormalize``, ``tie_mode``, ``count_rule``, ``band_combine``,
``stats_dtype``, ``nonunit_mode`` (dense | official | base | prune, see ``methods.nonunit_spec``),
``unit_pattern``, ``layer_pattern``, ``compat``, all read through ``dppa.allocation.resolve_options``
as ``dppa merge`` reads them. They must be plain values (no per-tensor filters or layer
gradients: mergekit would read a list as a gradient). ``weight``, ``lambda`` and ``normalize``
are ordinary mergekit parameters (:data:`PER_TENSOR`). Only ``models:`` configs are supported
(slices may map a tensor to another layer).

In-memory calls (``mergekit.merge_methods.merge_state_dicts``, ``merge_tensors``, calling the
method object) hand every tensor over at once, so without an active pre-pass table the statistics
come from those tensors (:func:`in_memory_table`, with a warning): DP allocates between the unit
tensors among them (each model's level is its ``density`` or ``sparsity`` parameter, else the
default levels; the band factors are the default preset's). Such a call takes the scalar settings
above as parameters (list-valued ones, ``densities``, ``alphas`` and ``density_clamp``, are
config-only). A file-based ``run_merge`` without the pre-pass still fails: it sees one tensor at a
time.
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
from ..dppa.allocation import allocate, resolve_options
from ..dppa.defaults import resolve_alphas
from ..dppa.units import unmatched_linears, warn_unmatched
from ..engine.errors import MergeError
from ..methods import DPPA_DEFAULTS, get_method, methods, nonunit_spec, preset
from ..reference.naming import group_units, unit_layer

LOG = logging.getLogger(__name__)

# mergekit binds these for each tensor and hands them to merge_group (gradients and filters work);
# every other DPPA parameter is a whole-model setting that the statistics pre-pass reads once
PER_TENSOR = ("weight", "normalize", "lambda")


def dppa_keys(method: str) -> dict:
    """The whole-model mergekit parameters of a DPPA method by role, from its registry entry:
    ``levels`` (a model's density levels), ``per_model`` (the levels and the band factors) and
    ``settings`` (global only)."""
    mk = [p for p in get_method(method).params if p.mergekit and p.name not in PER_TENSOR]
    return {"levels": tuple(p.name for p in mk if p.scope == "model" and p.stage == "dppa"),
            "per_model": tuple(p.name for p in mk if p.scope == "model"),
            "settings": tuple(p.name for p in mk if p.scope == "global")}


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
    compat: Optional[str] = None  # "official": Δ rounded to bf16, a unit at density 1 drops its minima

    @property
    def official(self) -> bool:
        return self.compat == "official"

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
            specs, combine = preset(self.method_for_combine, len(models), params)[1:]
            if self.official:  # a unit at density 1 still drops its minima (compat official)
                specs = [s.with_(density1_prunes_min=True) for s in specs]
            return specs, combine
        if unit_layer(name, shape, **self.patterns) is not None:
            raise KeyError(f"{name!r} is a DPPA unit by its name but was not seen by the statistics "
                           "pre-pass (tensor names differ between mergekit and the checkpoint?)")
        # non-units: the CLI's rule (methods.nonunit_spec) applied to the uniform levels
        params["densities"] = [tuple(self.levels[k]) for k in models]
        _, specs, combine = preset(self.method_for_combine, len(models), params)
        if self.nonunit_mode == "base":
            return None, combine
        return [nonunit_spec(self.nonunit_mode, s, self.levels[k]) for s, k in zip(specs, models)], combine


def _levels(local: dict, glob: dict, label: str, keys: tuple) -> tuple:
    """A model's density levels from densities | density | sparsity (``keys``; model value over
    global)."""
    own = [k for k in keys if k in local]
    if len(own) > 1:
        raise ValueError(f"model {label!r}: set only one of {', '.join(keys)} (got {own})")
    src = local if own else glob
    key = own[0] if own else next((k for k in keys if k in glob), None)
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


def dppa_spec_params(ParameterSpec, ParameterScope, method: str) -> tuple:
    """mergekit ParameterSpecs of a DPPA method, from its registry entry: every scalar mergekit
    parameter (a list would be read as a layer gradient; the pre-pass reads those from the
    config). Whole-model settings default to None (not given): their defaults, ``compat``'s
    included, come from ``resolve_options`` on every path."""
    scopes = {"model": ParameterScope.NON_BASE, "global": ParameterScope.SHARED}
    return tuple(ParameterSpec(p.name, p.type, scopes[p.scope], default=p.default) if p.name in PER_TENSOR
                 else ParameterSpec(p.name, Optional[p.type], scopes[p.scope], default=None)
                 for p in get_method(method).params if p.mergekit and p.type is not list)


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


def _patterns(glob: dict) -> dict:
    """The unit / layer name patterns set in ``glob`` (``group_units`` keyword arguments)."""
    return {k: glob[k] for k in ("unit_pattern", "layer_pattern") if glob.get(k)}


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


class DPPAConfigError(MergeError, ValueError):
    """A DPPA parameter of a mergekit config that the pre-pass refuses: a ValueError for Python
    callers, one ``error:`` line from the CLIs."""


def _read_params(merge_config, method: str) -> tuple:
    """(global settings, ``resolve_options`` of them, {model: (levels, alphas)}) of a config,
    read before any tensor is; DPPAConfigError names the bad key and value."""
    keys = dppa_keys(method)
    try:
        glob = _settings(merge_config.parameters, keys["settings"] + keys["per_model"])
        opts = resolve_options(glob)
        per_model = {}
        for model_in in merge_config.models:
            if model_in.model == merge_config.base_model:
                continue
            ref = str(model_in.model)
            local = _settings(model_in.parameters, keys["per_model"])
            levels = _levels(local, glob, ref, keys["levels"])
            per_model[ref] = levels, resolve_alphas(local.get("alphas", glob.get("alphas")), len(levels),
                                                    what=f"model {ref!r}: alphas")
    except ValueError as exc:
        raise DPPAConfigError(f"{method}: {exc}") from None
    return glob, opts, per_model


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
    glob, opts, per_model = _read_params(merge_config, method)
    patterns = _patterns(glob)
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
    table = DPPATable(settings=opts.spec, nonunit_mode=opts.nonunit_mode, units=dict(layers), patterns=patterns,
                      method_for_combine=method, compat=opts.dp.compat)
    nbytes = 0
    for ref, (levels, alphas) in per_model.items():
        model_dir = model_dirs[ref]
        hists = dppa_stats.folder_histograms(base_dir, model_dir, list(layers), dtype=dtype,
                                             stats_dtype=opts.stats_dtype, device=device, backend=backend,
                                             compat=opts.dp.compat)
        alloc = allocate(hists, layers, levels, opts.dp, stats_dtype=opts.stats_dtype, backend=backend)
        del hists
        for name in layers:
            table.densities[(ref, name)] = tuple(float(d) for d in alloc.densities[name])
        table.alphas[ref] = alphas
        table.levels[ref] = levels
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
    keys = dppa_keys(method)
    glob = {k: _shared(parameters, k) for k in keys["settings"] if k in parameters[0]}
    opts = resolve_options(glob)
    patterns = _patterns(glob)
    named = [(g, p, dt) for g, p, dt in zip(groups, parameters, input_dtypes) if g.base is not None]
    layers = group_units({g.metadata.name or "": tuple(g.base.tensor.shape) for g, _, _ in named}, **patterns)
    table = DPPATable(settings=opts.spec, nonunit_mode=opts.nonunit_mode, units=dict(layers), patterns=patterns,
                      method_for_combine=method, compat=opts.dp.compat)
    ids = list(dict.fromkeys(e.id for g, _, _ in named for e in g.non_base))
    for mid in ids:
        given = {repr(sorted((k, p[k].get(mid)) for k in keys["levels"] if k in p and p[k].get(mid) is not None))
                 for g, p, _ in named if any(e.id == mid for e in g.non_base)}
        if len(given) > 1:
            raise ValueError(f"dppa: model {mid!r}'s density levels are whole-model settings and must not "
                             f"vary between tensors, got {sorted(given)}")
        mp = next(p for g, p, _ in named if any(e.id == mid for e in g.non_base))
        local = {k: mp[k].get(mid) for k in keys["levels"] if k in mp and mp[k].get(mid) is not None}
        levels = _levels(local, {}, str(mid), keys["levels"])
        hists = {}
        with torch.no_grad():
            for g, _, dt in named:
                name = g.metadata.name or ""
                entry = next((e for e in g.non_base if e.id == mid), None)
                if name in layers and entry is not None:
                    delta = dppa_stats.form_delta(g.base.tensor, entry.tensor, dt, compat=opts.dp.compat)
                    hists[name] = dppa_stats.unit_histogram(delta, opts.stats_dtype, backend)
        unit_layers = {n: layers[n] for n in hists}
        alloc = allocate(hists, unit_layers, levels, opts.dp, stats_dtype=opts.stats_dtype, backend=backend)
        for name in unit_layers:
            table.densities[(str(mid), name)] = tuple(float(x) for x in alloc.densities[name])
        table.levels[str(mid)] = levels
        table.alphas[str(mid)] = resolve_alphas(None, len(levels))
    warnings.warn(f"{method}: no DPPA statistics pre-pass is active; the statistics come from the {len(named)} "
                  f"tensor(s) of this call ({len(layers)} DPPA unit(s) among them, the rest merged with "
                  f"nonunit_mode {opts.nonunit_mode!r}). Run prepare_dppa(config, options) for whole-model "
                  "statistics.",
                  stacklevel=2)
    return table
