"""mergekit backend: our kernels behind mergekit's merge-method names, plus ``dppa``/``dppa_ties``.

One line from Python (the same as ``dppa-mergekit-yaml config.yml OUT``)::

    from dppa_kernels.integrations.mergekit import run_merge
    run_merge(config, "OUT", options)  # a drop-in for mergekit.merge.run_merge

or, to keep calling mergekit yourself::

    from dppa_kernels.integrations import mergekit as dk
    dk.install()                      # idempotent; dk.uninstall() restores mergekit exactly
    dk.prepare_dppa(config, options)  # only for merge_method dppa / dppa_ties
    mergekit.merge.run_merge(config, "OUT", options)

Hook (mergekit 0.1.5 API, detected by feature: ``mergekit.merge_methods.register``):

* ``install(override=True)`` replaces, in mergekit's method registry, each
  ``GeneralizedTaskArithmeticMerge`` entry (task_arithmetic, ties, dare_ties, dare_linear,
  breadcrumbs, breadcrumbs_ties, della, della_linear) by an instance of a subclass built from the
  **same field values**: the parameter spec, defaults and name are mergekit's own, only
  ``merge_group`` runs our fused kernel. mergekit has no public "replace", so the swap writes its
  registry dict; ``uninstall()`` puts the original objects back. ``override=False`` leaves those
  names alone and registers ``<name>_fast`` twins instead, through the public ``register()``.
* The methods mergekit lacks (``dppa``, ``dppa_ties``, ``consensus``, ...: those of
  :mod:`dppa_kernels.methods` marked ``mergekit="ours"``) are registered through ``register()``
  in both modes, with parameter specs derived from their registry entries.

Semantics are mergekit 0.1.5's (docs/methods.md), except where mergekit rounds: we compute in
fp32 and round once to the base dtype (mergekit rounds the weighted deltas, the sum and the
weights to the working dtype; in fp32 the results are identical). Magnitude ties at the cut are
broken by index instead of by sort order. DARE/DELLA draw from our counter-hash RNG keyed by
(seed, tensor name, model index), so they match mergekit only statistically but are reproducible
across task orders, devices and ``--multi-gpu``; the seed is ``install(seed=...)``, which
``dppa-mergekit-yaml`` sets from ``--random-seed`` (default 0). Inputs of a dtype our kernels do
not take (fp64), groups without a base, and groups for which autograd records (grad enabled and an
input requiring grad, e.g. ``merge_state_dicts`` on modules) go to mergekit's own code; ``dppa``
has no mergekit code, so it runs on the differentiable in-package reference there.

Devices: tensors arrive on mergekit's math device (``--cuda``, ``--read-to-gpu``,
``--low-cpu-memory``, possibly as non-contiguous views); our ops pick the backend by device and
never modify inputs. ``--multi-gpu`` runs one thread per GPU: the methods keep no mutable state
during a merge (the DPPA table is read-only), so they are thread-safe.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from typing import Any, Optional

import torch

from ..dppa.stats import form_delta
from ..methods import get_method, methods, preset, sparsifiers
from ..ops import merge_prepared
from ._deps import records_grad, require
from .mergekit_dppa import (DPPATable, active_table, call_table, dppa_spec_params, in_memory_call, in_memory_table,
                            prepare_dppa, set_dppa_table)

__all__ = ["install", "uninstall", "is_installed", "installed", "run_merge", "prepare_dppa",
           "set_dppa_table", "DPPATable", "gta_names", "own_names"]

_FAST_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def gta_names() -> tuple:
    """mergekit's generalized-task-arithmetic methods that ``install()`` runs on our kernels."""
    return tuple(n for n, m in methods().items() if m.mergekit == "gta")


def own_names() -> tuple:
    """The methods ``install()`` adds to mergekit."""
    return tuple(n for n, m in methods().items() if m.mergekit == "ours")


def _sparsifier_of(mergekit_value) -> str:
    """Our sparsifier for mergekit's SparsificationMethod value (None: no sparsification)."""
    if mergekit_value is None:
        return "none"
    return next(n for n, sp in sparsifiers().items() if sp.mergekit == mergekit_value)

_lock = threading.RLock()
_state: dict = {"installed": False, "replaced": {}, "added": [], "backend": "auto", "seed": 0}


def _mergekit():
    mk = require("mergekit", "mergekit", "dppa_kernels.integrations.mergekit")
    mm = require("mergekit.merge_methods", "mergekit", "dppa_kernels.integrations.mergekit")
    if not hasattr(mm, "register") or not hasattr(mm, "GroupMergeMethod"):
        raise ImportError("dppa_kernels.integrations.mergekit needs mergekit >= 0.1.5 (the "
                          "merge_methods.register API); pip install -U 'mergekit>=0.1.5'")
    return mk, mm


def _registry():
    _mergekit()
    from mergekit.merge_methods import registry

    return registry


def _preset_name(sparsifier: str) -> str:
    """A preset with this sparsifier (its combine is replaced by the caller's)."""
    return next(n for n, m in methods().items() if m.sparsifier == sparsifier and m.mergekit == "gta")


def _no_autocast(device: torch.device):
    """Autocast off for our call (mergekit's own executor already turns it off: then a no-op)."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _build_classes():
    """Subclasses of mergekit's classes, created on first use (mergekit is optional)."""
    if "classes" in _state:
        return _state["classes"]
    _, mm = _mergekit()
    from mergekit.merge_methods.base import (BasePolicy, InputContract, MergeMethodSpec,
                                             ParameterScope, ParameterSpec)

    class FastGeneralizedTaskArithmeticMerge(mm.GeneralizedTaskArithmeticMerge):
        """mergekit's GTA method (same fields, same spec) with a fused merge_group."""

        def merge_group(self, group, /, **parameters: Any) -> torch.Tensor:
            base, entries = group.base, group.non_base
            if base is None or not entries or base.tensor.dtype not in _FAST_DTYPES \
                    or any(e.tensor.dtype != base.tensor.dtype for e in entries) \
                    or records_grad(e.tensor for e in group.entries):
                return super().merge_group(group, **parameters)
            sp = self.sparsification_method
            sparsifier = _sparsifier_of(None if sp is None else getattr(sp, "value", sp))
            consensus = self.consensus_method
            p = {"weight": tuple(float(parameters["weight"][e.id]) for e in entries),
                 "density": tuple(_density(parameters["density"][e.id], sparsifier) for e in entries),
                 "normalize": bool(parameters["normalize"]), "rescale": bool(parameters["rescale"]),
                 "lambda": float(parameters["lambda"])}
            for key in ("gamma", "epsilon"):
                if key in parameters:
                    p[key] = tuple(float(parameters[key][e.id]) for e in entries)
            if sparsifier == "della":
                _check_della(p["density"], p["epsilon"])
            if consensus is not None:
                p["elect"] = "count" if getattr(consensus, "value", consensus) == "count" else "weighted_sum"
            weights, specs, combine = _gta_plan(sparsifier, consensus is not None, len(entries),
                                                tuple(sorted(p.items())))
            return _merge(group, specs, weights, combine, grad=False)

    class DPPAMerge(mm.GroupMergeMethod):
        """DPPA (bands with per-unit DP densities from the pre-pass table) inside mergekit."""

        def __init__(self, name: str):
            self.method_name = name
            self.spec = MergeMethodSpec(
                name=name,
                pretty_name="DPPA" + (" + TIES" if name == "dppa_ties" else ""),
                reference_url=f"https://arxiv.org/abs/{get_method(name).reference}",
                parameters=dppa_spec_params(ParameterSpec, ParameterScope, name),
                contract=InputContract(base=BasePolicy.REQUIRED),
            )

        def __call__(self, groups, /, **kwargs: Any):
            # the in-memory entry point (merge_state_dicts, merge_tensors): every tensor is at hand
            with in_memory_call():
                return super().__call__(groups, **kwargs)

        def _execute(self, groups, parameters, options, *, input_dtypes, out_dtype=None):
            table = in_memory_table(self.method_name, groups, parameters, input_dtypes, backend=_state["backend"])
            with call_table(table):
                return super()._execute(groups, parameters, options, input_dtypes=input_dtypes, out_dtype=out_dtype)

        def merge_group(self, group, /, **parameters: Any) -> torch.Tensor:
            base, entries = group.base.tensor, group.non_base
            if not entries:
                return base
            table = active_table(self.method_name)
            name = group.metadata.name or ""
            models = [str(e.id) for e in entries]
            weights = [float(parameters["weight"][e.id]) for e in entries]
            specs, combine = table.specs(name, models, tuple(base.shape), normalize=parameters["normalize"],
                                         lam=parameters["lambda"])
            if specs is None:  # nonunit_mode "base": the base tensor unchanged
                return base
            return _merge(group, specs, weights, combine, compat=table.compat)

    class RegistryMerge(mm.GroupMergeMethod):
        """A method of our registry that mergekit lacks: its spec and presets come from the entry."""

        def __init__(self, name: str):
            self.method_name = name
            entry = get_method(name)
            scopes = {"model": ParameterScope.NON_BASE, "global": ParameterScope.SHARED}
            self.spec = MergeMethodSpec(
                name=name, pretty_name=entry.title, reference_url=f"https://arxiv.org/abs/{entry.reference}",
                parameters=tuple(ParameterSpec(p.name, Optional[p.type], scopes[p.scope], default=p.default)
                                 for p in entry.params if p.mergekit),
                contract=InputContract(base=BasePolicy.REQUIRED),
            )

        def merge_group(self, group, /, **parameters: Any) -> torch.Tensor:
            base, entries = group.base.tensor, group.non_base
            if not entries:
                return base
            entry = get_method(self.method_name)
            p = {}
            for param in entry.params:
                if not param.mergekit or param.name not in parameters:
                    continue
                v = parameters[param.name]
                v = tuple(v[e.id] for e in entries) if param.scope == "model" else v
                if v is not None and not (isinstance(v, tuple) and None in v):
                    p[param.name] = v
            weights, specs, combine = preset(self.method_name, len(entries), p)
            return _merge(group, specs, weights, combine)

    _state["classes"] = (FastGeneralizedTaskArithmeticMerge, DPPAMerge, RegistryMerge)
    return _state["classes"]


@functools.lru_cache(maxsize=1024)
def _gta_plan(sparsifier: str, ties: bool, m: int, items: tuple):
    """(weights, specs, combine) of a GTA method's parameters (``items``: sorted (key, value) pairs,
    lists as tuples); cached, since a model's tensors mostly share their parameters."""
    p = {k: list(v) if isinstance(v, tuple) else v for k, v in items}
    weights, specs, combine = preset(_preset_name(sparsifier), m, p)
    return tuple(weights), tuple(specs), dataclasses.replace(combine, combine="ties" if ties else "sum")


def _density(d: float, sparsifier: str) -> float:
    d = float(d)
    # mergekit: density >= 1 keeps everything and (magnitude) <= 0 keeps nothing
    return min(max(d, 0.0), 1.0) if sparsifier in ("magnitude", "breadcrumbs", "none") else min(d, 1.0)


def _check_della(densities, epsilons) -> None:
    for d, e in zip(densities, epsilons):
        if 0.0 < d < 1.0 and (d + e >= 1 or d - e <= 0):
            raise ValueError("Epsilon must be chosen such that density +/- epsilon is in (0, 1); "
                             f"got density={d}, epsilon={e}")


def _merge(group, specs, weights, combine, grad: Optional[bool] = None, compat: Optional[str] = None) -> torch.Tensor:
    """The merge on our kernels; ``grad`` (None: find out) sends it to the differentiable reference.
    ``compat``: a DPPA table's (``"official"`` rounds Δ to bf16, as ``dppa merge`` does)."""
    base = group.base.tensor
    # Δ in the working dtype, exactly as mergekit forms it (entries are already dtype-aligned)
    deltas = [form_delta(base, e.tensor, compat=compat) for e in group.non_base]
    if grad is None:
        grad = records_grad(e.tensor for e in group.entries)
    # the in-package reference is differentiable and takes float64: it serves what the kernels cannot
    slow = grad or base.dtype not in _FAST_DTYPES
    with _no_autocast(base.device):
        return merge_prepared(deltas, base, specs, weights, combine, seed=int(_state["seed"]),
                              name=group.metadata.name or "", out_dtype=base.dtype,
                              backend="reference" if slow else _state["backend"])


def install(override: bool = True, *, backend: str = "auto", seed: int = 0) -> None:
    """Install the backend into mergekit (idempotent; a second call updates backend and seed).

    override=True: mergekit's GTA names run our kernels. override=False: they stay mergekit's and
    ``<name>_fast`` twins are added. The methods mergekit lacks (:func:`own_names`) are added in
    both modes.
    """
    with _lock:
        _state["backend"], _state["seed"] = backend, int(seed)
        if _state["installed"]:
            if _state["override"] == override:
                return
            uninstall()
            _state["backend"], _state["seed"] = backend, int(seed)
        fast_cls, dppa_cls, registry_cls = _build_classes()
        reg = _registry()
        _, mm = _mergekit()
        replaced, added = {}, []
        try:
            for name in gta_names():
                orig = reg._METHODS.get(name)
                if not isinstance(orig, mm.GeneralizedTaskArithmeticMerge):
                    continue  # absent or already replaced by someone else: leave it alone
                fields = {f.name: getattr(orig, f.name) for f in dataclasses.fields(orig)}
                if override:
                    reg._METHODS[name] = fast_cls(**fields)
                    replaced[name] = orig
                else:
                    fields["method_name"] = name + "_fast"
                    mm.register(fast_cls(**fields))
                    added.append(name + "_fast")
            for name in own_names():
                mm.register((dppa_cls if get_method(name).dppa else registry_cls)(name))
                added.append(name)
        except Exception:
            _restore(reg, replaced, added)
            raise
        _state.update(installed=True, override=override, replaced=replaced, added=added)


def _restore(reg, replaced: dict, added: list) -> None:
    for name in added:
        reg._METHODS.pop(name, None)
    for name, orig in replaced.items():
        reg._METHODS[name] = orig


def uninstall() -> None:
    """Restore mergekit's registry exactly (same objects, same order); a no-op if not installed."""
    with _lock:
        if not _state["installed"]:
            return
        _restore(_registry(), _state["replaced"], _state["added"])
        _state.update(installed=False, replaced={}, added=[])


def is_installed() -> bool:
    return bool(_state["installed"])


@contextlib.contextmanager
def installed(override: bool = True, *, backend: str = "auto", seed: int = 0):
    """``with installed(): ...`` installs for the block, then restores the previous state."""
    with _lock:
        was = (_state["installed"], _state.get("override"), _state["backend"], _state["seed"])
        install(override, backend=backend, seed=seed)
    try:
        yield
    finally:
        with _lock:
            if was[0]:
                install(was[1], backend=was[2], seed=was[3])
            else:
                uninstall()


def run_merge(merge_config, out_path: str, options=None, config_source: Optional[str] = None, *,
              override: bool = True, backend: str = "auto", seed: Optional[int] = None) -> None:
    """``mergekit.merge.run_merge`` with our backend installed for the call (and the DPPA
    statistics pre-pass run first when ``merge_method`` is dppa / dppa_ties).

    ``seed`` defaults to ``options.random_seed``, else 0.
    """
    _mergekit()
    from mergekit.merge import run_merge as mk_run_merge
    from mergekit.options import MergeOptions

    options = options or MergeOptions()
    if seed is None:
        seed = options.random_seed if options.random_seed is not None else 0
    with installed(override, backend=backend, seed=seed):
        table = None
        entry = methods().get(merge_config.merge_method)
        if entry is not None and entry.dppa:
            table = prepare_dppa(merge_config, options, backend=backend)
        try:
            mk_run_merge(merge_config, out_path, options=options, config_source=config_source)
        finally:
            if table is not None:
                set_dppa_table(None)
