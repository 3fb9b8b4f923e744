"""Public operations: validate once, then dispatch to a backend.

Every function takes ``backend="auto" | "reference" | "torch" | "cpu" | "triton" | "cuda"``.
``reference`` runs the pure-torch definitions in :mod:`dppa_kernels.reference`; the others run
the same semantics through the primitives of :mod:`dppa_kernels.backends.base`.
Inputs are never modified.

``check_finite=True`` (the default) refuses NaN/Inf inputs with a ValueError naming the tensor.
On the fast backends the check costs (almost) nothing: the select / histogram pass that reads a
tensor anyway reports non-finite keys, and the fused apply pass checks the inputs no select read
(the base, and deltas of methods without a threshold). The reference checks explicitly.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Mapping, Optional, Sequence, Union

import torch

from . import _validate as V
from . import reference as R
from .backends.base import NonFiniteInput
from .backends.registry import get_backend, resolve
from .methods import get_sparsifier, methods, preset, sparsifiers
from .plans import _partition_lengths, keep_counts, make_plan, make_plans  # noqa: F401  (part of this module's API)
from .spec import CombineSpec, SparsifySpec
from .vocab import STATS_DTYPES


def prune_methods() -> tuple:
    """The sparsifiers :func:`prune` offers (those that need one delta only)."""
    return tuple(n for n, sp in sparsifiers().items() if sp.prune)


def _prepare(tensors: Sequence[torch.Tensor], names: Sequence[str], check_finite: bool, backend: str):
    """The backend name; float64 only on the reference, which checks NaN/Inf here (the fast backends
    check inside their passes)."""
    for t, n in zip(tensors, names):
        V.check_tensor(t, n)
    name = resolve(backend, tensors[0].device)
    if name != "reference":
        for t, n in zip(tensors, names):
            if t.dtype == torch.float64:
                raise TypeError(f"{n} is float64: only backend='reference' accepts float64")
    elif check_finite:
        for t, n in zip(tensors, names):
            V.check_finite(t, n)
    return name


def magnitude_threshold(
    x: torch.Tensor,
    density: float,
    *,
    partition: str = "tensor",
    block_size: Optional[int] = None,
    count_rule: str = "floor",
    key_dtype: Optional[torch.dtype] = None,
    return_counts: bool = False,
    check_finite: bool = True,
    backend: str = "auto",
) -> Union[torch.Tensor, dict]:
    """Exact k-th largest |x| per partition, k = keep count of ``density`` (see ``reference.threshold``).

    Returns τ (dtype ``key_dtype`` or x's dtype; +inf where nothing is kept): a 0-d tensor for
    ``partition="tensor"``, else one value per row/block. With ``return_counts=True`` a dict with
    ``tau``, ``tau_key``, ``c_above`` (#|x| > τ), ``c_eq`` (#|x| == τ) and ``k``.
    """
    density = V.check_density(density)
    spec = SparsifySpec("magnitude", density=density, partition=partition, block_size=block_size,
                        count_rule=count_rule, key_dtype=key_dtype)
    V.check_sparsify_spec(spec, "arguments")
    name = _prepare([x], ["x"], check_finite, backend)
    kd = key_dtype or x.dtype
    if name == "reference" or x.numel() == 0:
        res = R.magnitude_threshold_ref(x, density, partition=partition, block_size=block_size,
                                        count_rule=count_rule, key_dtype=key_dtype)
    else:
        k = keep_counts(_partition_lengths(x, partition, block_size), density, count_rule)
        be, xc = get_backend(name), x.contiguous()
        tau, above, eq = V.checked_pass(lambda c: be.select(xc, k, partition, block_size, key_dtype, check_finite=c),
                                  x, "x" if check_finite else None)
        res = {"tau_key": tau, "c_above": above, "c_eq": eq, "k": k, "tau": R.key_to_value(tau, kd)}
    if return_counts:
        return res
    tau = res["tau"].to(x.device)
    return tau.reshape(()) if partition == "tensor" else tau


def sparsify_spec(method: str, *, density: Optional[float] = None, tie_mode: Optional[str] = None,
                  **params: Any) -> SparsifySpec:
    """SparsifySpec for :func:`prune`'s ``method`` and keyword parameters (validated)."""
    if method not in prune_methods():
        raise ValueError(f"method must be one of {prune_methods()}, got {method!r}")
    fields = set(SparsifySpec.__dataclass_fields__) - {"method", "density", "tie_mode"}
    unknown = set(params) - fields
    if unknown:
        raise ValueError(f"unknown parameter(s) {sorted(unknown)} for prune(method={method!r}); "
                         f"valid: {sorted(fields | {'density', 'tie_mode', 'seed', 'name'})}")
    if method == "bands":
        if density is not None and "densities" not in params:
            params["densities"] = (density,)
        params.setdefault("count_rule", "dppa")
        params["densities"] = tuple(params.get("densities", ()))
        params["alphas"] = tuple(params.get("alphas", (1.0,) * len(params["densities"])))
        tie_mode = tie_mode or "gt"
        density = 1.0
    elif density is None and get_sparsifier(method).uses_density:
        raise ValueError(f"density is required for prune(method={method!r})")
    spec = SparsifySpec(method, density=V.check_density(1.0 if density is None else density),
                        tie_mode=tie_mode or "exact_k", **params)
    V.check_sparsify_spec(spec, "arguments")
    return spec


def prune(
    x: torch.Tensor,
    method: str,
    *,
    density: Optional[float] = None,
    seed: Optional[int] = None,
    name: Optional[str] = None,
    tie_mode: Optional[str] = None,
    check_finite: bool = True,
    backend: str = "auto",
    **method_params: Any,
) -> torch.Tensor:
    """Sparsify one delta; returns a new tensor of x's dtype.

    methods: ``magnitude`` (top-k of |x|, ``tie_mode`` exact_k by default), ``dare`` (random keep
    with probability density; hash RNG keyed by ``seed`` (default 0) and ``name``), ``della``
    (MagPrune, ``epsilon``), ``breadcrumbs`` (``gamma``), ``bands`` (DPPA partition amplification:
    ``densities`` non-decreasing, ``alphas`` one factor each, ``band_combine``; tie_mode ``gt`` and
    count_rule ``dppa`` by default). Options: ``partition``, ``block_size``, ``count_rule``,
    ``rescale`` (none / inv_density / l1), ``key_dtype``.
    """
    spec = sparsify_spec(method, density=density, tie_mode=tie_mode, **method_params)
    seed = 0 if seed is None else seed
    name = name or ""
    be_name = _prepare([x], ["x"], check_finite, backend)
    if be_name == "reference":
        return R.sparsify_ref(x, spec, seed=seed, name=name).to(x.dtype)
    return _apply_one(be_name, [x], None, [spec], [1.0], CombineSpec(), seed, name, x.dtype,
                      names=["x"] if check_finite else None)


def _apply_one(be_name, deltas, base, specs, weights, combine, seed, name, out_dtype, plans_out=None, names=None):
    """Plans, then the fused pass. ``names``: the inputs' names (deltas, then base) to check for
    NaN/Inf, each in the first pass that reads it; None: no check."""
    if deltas[0].numel() == 0:  # nothing to select or apply; backends need not handle it
        return torch.empty(deltas[0].shape, dtype=out_dtype, device=deltas[0].device)
    be = get_backend(be_name)
    deltas = [d.contiguous() for d in deltas]
    plans = make_plans(be, deltas, specs, weights, seed=seed, name=name, check_as=names)
    if plans_out is not None:
        plans_out.extend(plans)
    base = None if base is None else base.contiguous()
    check = [i for i, p in enumerate(plans) if not p.finite_checked] + ([len(deltas)] if base is not None else [])
    run = lambda c: be.apply(deltas, base, plans, weights, combine, out_dtype, check_finite=c)  # noqa: E731
    if not names:
        return run(())
    try:
        return run(tuple(check))
    except NonFiniteInput as exc:
        inputs = deltas + [base]
        for i in exc.inputs:
            V.check_finite(inputs[i], names[i])  # raises for the first candidate that holds one
    return run(())  # none did: a finite value overflowed fp32 in the merge


def merge_deltas(
    deltas: Sequence[torch.Tensor],
    base: Optional[torch.Tensor] = None,
    *,
    method: str = "ties",
    weights: Optional[Sequence[float]] = None,
    specs: Optional[Sequence[SparsifySpec]] = None,
    combine: Optional[CombineSpec] = None,
    seed: int = 0,
    name: str = "",
    out_dtype: Optional[torch.dtype] = None,
    check_finite: bool = True,
    backend: str = "auto",
    plans_out: Optional[list] = None,
    **params: Any,
) -> torch.Tensor:
    """Sparsify M deltas and combine them: base + λ·combine(w_i·Δ'_i), cast once to ``out_dtype``.

    ``method`` is a mergekit name (task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs,
    breadcrumbs_ties, della, della_linear) or ``dppa`` / ``dppa_ties``; ``params`` are mergekit's
    (``density``, ``weight``, ``normalize``, ``rescale``, ``lambda``, ``gamma``, ``epsilon``; per-model
    lists allowed) plus ours (``densities``, ``alphas``, ``tie_mode``, ``count_rule``, ...). Or pass
    explicit ``specs`` (one SparsifySpec per delta) and ``combine``. Model i's random stream is i.
    ``plans_out``, a list, receives each delta's ApplyPlan (thresholds, the DELLA mask drawn, ...)
    so that callers can report on them without redoing the work; on the reference it receives
    only the plans of a method that merges every delta together (their masks).

    ``dppa`` / ``dppa_ties`` here see one tensor, so they apply **uniform** bands: every delta is
    cut at ``densities`` (default (0.1, 0.2)) × ``alphas`` (default (1, 1)) with no dynamic
    allocation, which needs whole-model statistics. For the whole-model method use
    :class:`dppa_kernels.dppa.DPPA` (or ``dppa merge``); a warning says so once per process.
    """
    if specs is None and getattr(methods().get(method), "dppa", False):
        _warn_uniform_bands()
    if not isinstance(deltas, (list, tuple)) or not deltas:
        raise ValueError("deltas must be a non-empty list of tensors")
    for i, d in enumerate(deltas):
        V.check_tensor(d, f"deltas[{i}]")
    V.check_same(deltas, "deltas")
    if base is not None:
        V.check_tensor(base, "base")
        if tuple(base.shape) != tuple(deltas[0].shape):
            raise ValueError(f"base has shape {tuple(base.shape)}, expected {tuple(deltas[0].shape)} like deltas[0]")
        if base.device != deltas[0].device:
            raise ValueError(f"base is on {base.device}, deltas[0] on {deltas[0].device}")
    if specs is None:
        if weights is not None:
            params["weight"] = list(weights)
        if "lam" in params:
            params["lambda"] = params.pop("lam")
        w, specs, combine_p = preset(method, len(deltas), params)
        combine = combine or combine_p
    else:
        if len(specs) != len(deltas):
            raise ValueError(f"specs has {len(specs)} entries, expected one per delta ({len(deltas)})")
        w = [1.0] * len(deltas) if weights is None else [float(x) for x in weights]
        combine = combine or CombineSpec()
    if len(w) != len(deltas):
        raise ValueError(f"weights has {len(w)} values, expected {len(deltas)}")
    V.check_specs(specs)
    V.check_combine_spec(combine)
    names = [f"deltas[{i}]" for i in range(len(deltas))] + ["base"]
    be_name = _prepare(list(deltas) + ([base] if base is not None else []), names, check_finite, backend)
    out_dtype = out_dtype or (base.dtype if base is not None else deltas[0].dtype)
    if be_name == "reference":
        return _merge_ref(deltas, base, specs, w, combine, seed, name, out_dtype, plans_out)
    return _apply_one(be_name, deltas, base, specs, w, combine, seed, name, out_dtype, plans_out,
                      names=names if check_finite else None)


@functools.lru_cache(maxsize=None)
def _warn_uniform_bands() -> None:
    warnings.warn("merge_deltas(method='dppa'/'dppa_ties') applies uniform bands to each tensor (no dynamic "
                  "allocation across the model); use dppa_kernels.dppa.DPPA for whole-model DPPA", stacklevel=3)


def merge_prepared(deltas: Sequence[torch.Tensor], base: Optional[torch.Tensor], specs: Sequence[SparsifySpec],
                   weights: Sequence[float], combine: CombineSpec, *, seed: int = 0, name: str = "",
                   out_dtype: torch.dtype, backend: str = "auto") -> torch.Tensor:
    """:func:`merge_deltas` for callers that built ``specs`` / ``combine`` with ``methods.preset``
    from validated values (the integrations, once per tensor of a model): only the tensors'
    shape, dtype and device agreement is checked, and NaN/Inf is not. The semantics are
    merge_deltas'; per-call overhead matters on small tensors."""
    V.check_same(list(deltas) + ([base] if base is not None else []), "deltas")
    return merge_planned(deltas, base, specs, weights, combine, seed=seed, name=name, out_dtype=out_dtype,
                         backend=resolve(backend, deltas[0].device))


def merge_planned(deltas: Sequence[torch.Tensor], base: Optional[torch.Tensor], specs: Sequence[SparsifySpec],
                  weights: Sequence[float], combine: CombineSpec, *, seed: int, name: str, out_dtype: torch.dtype,
                  backend: str, plans_out: Optional[list] = None,
                  check_as: Optional[Sequence[str]] = None) -> torch.Tensor:
    """:func:`merge_deltas` with nothing checked or resolved, for the merge engine: it validates
    each recipe (specs, combine, weights) once per run, resolves ``backend`` once (a backend name,
    never "auto") and reads tensors of the planned shapes and dtypes. ``check_as``: names of the
    deltas and then the base, to find NaN/Inf inside the passes that read them (a ValueError
    naming the input, as merge_deltas'; the reference backend does not check). ``plans_out`` as
    in merge_deltas."""
    if backend == "reference":
        return _merge_ref(deltas, base, specs, weights, combine, seed, name, out_dtype, plans_out)
    return _apply_one(backend, list(deltas), base, specs, weights, combine, seed, name, out_dtype, plans_out,
                      names=check_as)


def _merge_ref(deltas, base, specs, weights, combine, seed, name, out_dtype, plans_out):
    """The reference merge; ``plans_out`` receives the plans of a method that merges every delta
    together (their mask is what it kept); other methods' reference hands out none."""
    if plans_out is not None and get_sparsifier(specs[0].method).joint:
        plans_out.extend(make_plans(None, deltas, specs, weights, seed=seed, name=name))
    return R.merge_ref(deltas, base, specs, weights, combine, seed=seed, name=name, out_dtype=out_dtype)


def tensor_histogram(x: torch.Tensor, *, stats_dtype: torch.dtype = torch.bfloat16, check_finite: bool = True,
                     backend: str = "auto") -> torch.Tensor:
    """32768-bin histogram (int64, CPU) of the magnitude key of x rounded to ``stats_dtype``."""
    be_name = _prepare([x], ["x"], check_finite, backend)
    if stats_dtype not in STATS_DTYPES.values():
        raise ValueError(f"stats_dtype must be torch.bfloat16 or torch.float16, got {stats_dtype}")
    return histogram_planned(x, stats_dtype, backend=be_name, check_as="x" if check_finite else None)


def histogram_planned(x: torch.Tensor, stats_dtype: torch.dtype, *, backend: str,
                      check_as: Optional[str] = None) -> torch.Tensor:
    """:func:`tensor_histogram` with nothing checked or resolved, for the merge engine (as
    :func:`merge_planned`). ``check_as``: the name of x, to find NaN/Inf inside the pass (the
    reference backend does not check)."""
    if backend == "reference":
        return R.histogram_ref(x, stats_dtype)
    return V.histogram_checked(get_backend(backend), x.contiguous(), stats_dtype, check_as)


def dp_densities(
    stats: Mapping[str, torch.Tensor],
    *,
    densities: Sequence[float] = (0.1, 0.2),
    layers: Optional[Mapping[str, Any]] = None,
    offset_lambda: float = 0.08,
    outlier_mult_layer: float = 3.0,
    outlier_mult_unit: float = 5.0,
    density_clamp: tuple = (0.0, 1.0),
    stats_dtype: torch.dtype = torch.bfloat16,
    unit_pattern: Optional[str] = None,
    layer_pattern: Optional[str] = None,
    compat: Optional[str] = None,
    backend: str = "auto",
) -> R.DPAllocation:
    """DPPA Dynamic Pruning allocation (docs/methods.md) for one fine-tuned model.

    ``stats`` maps tensor names to either deltas (their histograms are taken with ``backend``) or
    precomputed 32768-bin histograms (1-D int tensors of length 32768). Units and their layers come
    from ``layers`` or from the names (``reference.naming`` defaults, overridable by regex).
    ``densities`` are the levels 1 − s_j (one for DP, K for K bands). Returns a DPAllocation whose
    ``densities[name]`` lists one density per level.
    """
    for j, d in enumerate(densities):
        V.check_density(d, f"densities[{j}]")
    if any(b < a for a, b in zip(densities, list(densities)[1:])):
        raise ValueError(f"densities must be non-decreasing, got {tuple(densities)}")
    if offset_lambda < 0:
        raise ValueError(f"offset_lambda must be >= 0, got {offset_lambda}")
    lo, hi = density_clamp
    if not (0.0 <= lo <= hi <= 1.0):
        raise ValueError(f"density_clamp must satisfy 0 <= lo <= hi <= 1, got {density_clamp}")
    if layers is None:
        pats = {k: v for k, v in (("unit_pattern", unit_pattern), ("layer_pattern", layer_pattern)) if v}
        shapes = {n: (None if _is_hist(t) else tuple(t.shape)) for n, t in stats.items()}
        layers = R.group_units(shapes, **pats)
    hists = {}
    for n in layers:
        if n not in stats:
            raise ValueError(f"layers names tensor {n!r}, which is missing from stats")
        t = stats[n]
        hists[n] = t.to(torch.int64).cpu() if _is_hist(t) else tensor_histogram(t, stats_dtype=stats_dtype,
                                                                                  backend=backend)
    return R.dp_allocate(hists, layers, densities, offset_lambda=offset_lambda,
                         outlier_mult_layer=outlier_mult_layer, outlier_mult_unit=outlier_mult_unit,
                         density_clamp=density_clamp, stats_dtype=stats_dtype, compat=compat)


def _is_hist(t: torch.Tensor) -> bool:
    return t.dim() == 1 and t.numel() == R.HIST_BINS and not t.is_floating_point()
