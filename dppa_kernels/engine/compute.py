"""Per-tensor work: deltas from raw tensors, the specs of each model, the merge, realised densities."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import reference as R
from ..methods import get_sparsifier, preset
from ..ops import merge_deltas
from ..backends.base import ApplyPlan
from ..spec import SparsifySpec
from .config import is_dppa
from .errors import MergeError, brief, clip
from .workspace import Workspace

STATS_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
                "fp16": torch.float16}


def form_deltas(task, labels: Sequence[str], raw: Sequence[torch.Tensor],
                workspace: Optional[Workspace] = None) -> tuple[torch.Tensor, list]:
    """(base in the working dtype, Δ_i = (ft_i − base) rounded to the working dtype).

    The subtraction runs in float32 (float64 for float64 work), then rounds once: the same values
    as mergekit's subtraction in the working dtype. NaN/Inf in any delta is an error. With a
    ``workspace`` the deltas are views of its buffers (valid until the next tensor's deltas).
    """
    wd = task.work_dtype
    base = raw[0].to(wd)
    deltas = []
    for i, (label, ft) in enumerate(zip(labels, raw[1:])):
        if task.truncate_rows is not None and ft.shape[0] != task.truncate_rows:
            ft = ft[: task.truncate_rows]
        # torch's 16-bit subtraction computes each element in fp32 and rounds once (the same bits
        # as an fp32 subtraction rounded to the working dtype), without fp32 temporaries.
        out = workspace.view(i, base.shape, wd) if workspace is not None else None
        d = torch.sub(ft.to(wd), base, out=out)
        # One reduction detects NaN/Inf; the exact count runs only when it fires (or overflows).
        if not bool(torch.isfinite(d.sum())):
            bad = int((~torch.isfinite(d)).sum())
            if bad:
                raise MergeError(f"tensor {brief(task.name)}: the delta of model {brief(label)} has {bad} NaN/Inf value(s)")
        deltas.append(d)
        del d
    return base, deltas


def default_alphas(k: int) -> list[float]:
    """DPPA's search start (1.8 on the top band, 0 below) for k levels."""
    return [1.8] + [0.0] * (k - 1)


def dppa_alphas(task, levels: list, labels: Sequence[str]) -> list:
    given = task.merge_params.get("alphas") or [None] * len(levels)
    out = []
    for lv, a, label in zip(levels, given, labels):
        a = default_alphas(len(lv)) if a is None else list(a)
        if len(a) != len(lv):
            raise MergeError(f"model {brief(label)}: alphas {brief(a)} must have one factor per density level "
                             f"{brief(lv)}")
        out.append(a)
    return out


def specs_for(task, method: str, n: int, *, levels=None, unit_densities=None, labels=()) -> tuple:
    """(weights, specs, combine, mode) of one tensor; mode is 'merge' or 'base' (copy the base)."""
    p = dict(task.merge_params)
    if not is_dppa(method):
        w, specs, combine = preset(method, n, p)
        return w, specs, combine, "merge"
    alphas = dppa_alphas(task, levels, labels)
    mode = task.dppa_params.get("nonunit_mode", "dense")
    if mode not in ("dense", "official", "base", "prune"):
        raise MergeError(f"nonunit_mode must be one of dense, official, base, prune; got {brief(mode)}")
    p["alphas"] = alphas
    p["densities"] = unit_densities if task.unit else levels
    w, specs, combine = preset(method, n, p)
    if task.unit or mode == "prune":
        return w, specs, combine, "merge"
    if mode == "base":
        return w, specs, combine, "base"
    if mode == "dense":
        return w, [SparsifySpec("none")] * n, combine, "merge"
    # official: the whole dense delta × max α (the official code's side effect, docs/methods.md)
    off = [s.with_(densities=(1.0,), alphas=(max(a),), tie_mode="ge") for s, a in zip(specs, alphas)]
    return w, off, combine, "merge"


def merge_tensor(task, base: torch.Tensor, deltas: list, weights, specs, combine, mode: str, *, seed: int,
                 backend: str, plans_out: Optional[list] = None) -> torch.Tensor:
    """The merged tensor; ``plans_out`` receives the plans the merge applied (see merge_deltas)."""
    if mode == "base":
        return base.to(task.out_dtype)
    try:
        return merge_deltas(deltas, base, specs=specs, combine=combine, weights=weights, seed=seed, name=task.name,
                            out_dtype=task.out_dtype, check_finite=False, backend=backend, plans_out=plans_out)
    except (ValueError, TypeError) as exc:
        raise MergeError(f"tensor {brief(task.name)}: {clip(exc)}") from None


def band_stats(hist: torch.Tensor, spec: SparsifySpec) -> tuple[list, float]:
    """(threshold value per level, realised density) of a bands spec, exact from the histogram."""
    n = int(hist.sum())
    rows = R.band_thresholds(hist, spec.densities, spec.key_dtype, spec.count_rule)
    taus = [float(R.key_to_value(torch.tensor(r[0]), spec.key_dtype)) for r in rows]
    kept = []
    for tau, above, eq, k in rows:
        kept.append({"gt": above, "ge": above + eq}.get(spec.tie_mode, k))
    factors = R.band_factors(spec.alphas, spec.band_combine)
    total, prev = 0, 0
    for f, c in zip(factors, kept):
        total += (c - prev) if f > 0 else 0
        prev = c
    return taus, (total / n if n else 0.0)


def realised_density(delta: torch.Tensor, spec: SparsifySpec, *, seed: int, name: str, stream: int,
                     hist: Optional[torch.Tensor] = None, backend: str = "reference",
                     plan: Optional[ApplyPlan] = None) -> float:
    """Fraction of the delta's elements that survive ``spec`` (exact; analytic where possible),
    from its sparsifier. ``plan``: the plan the merge applied (a mask is counted, not redrawn)."""
    if delta.numel() == 0:
        return 0.0
    return get_sparsifier(spec.method).realised(delta, spec, seed=seed, name=name, stream=stream, hist=hist,
                                               backend=backend, plan=plan)
