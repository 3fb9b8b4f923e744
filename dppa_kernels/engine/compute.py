"""Per-tensor work: deltas from raw tensors, the specs of each model, the merge, realised densities."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import reference as R
from ..dppa.defaults import default_alphas
from ..dppa.thresholds import plan_kept
from ..methods import NONUNIT_MODES, nonunit_spec, preset
from ..ops import merge_deltas
from ..reference import rng
from ..backends.base import ApplyPlan
from ..backends.registry import get_backend
from ..spec import CombineSpec, SparsifySpec
from .config import is_dppa
from .errors import MergeError, brief, clip
from .workspace import Workspace



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


def dppa_alphas(task, levels: list, labels: Sequence[str]) -> list:
    """Each model's band factors for ``task`` (the DPPA default preset where none are given)."""
    given = task.merge_params.get("alphas") or [None] * len(levels)
    out = []
    for lv, a, label in zip(levels, given, labels):
        a = default_alphas(len(lv)) if a is None else list(a)
        if len(a) != len(lv):
            raise MergeError(f"model {brief(label)}: alphas {brief(a)} must have one factor per density level "
                             f"{brief(lv)}")
        out.append(list(a))
    return out


def specs_for(task, method: str, n: int, *, levels=None, unit_densities=None, labels=()) -> tuple:
    """(weights, specs, combine, mode) of one tensor; mode is 'merge' or 'base' (copy the base)."""
    p = dict(task.merge_params)
    if not is_dppa(method):
        w, specs, combine = preset(method, n, p)
        return w, specs, combine, "merge"
    alphas = dppa_alphas(task, levels, labels)
    mode = task.dppa_params.get("nonunit_mode", "dense")
    if mode not in NONUNIT_MODES:
        raise MergeError(f"nonunit_mode must be one of {', '.join(NONUNIT_MODES)}; got {brief(mode)}")
    p["alphas"] = alphas
    p["densities"] = unit_densities if task.unit else levels
    w, specs, combine = preset(method, n, p)
    if task.unit:
        return w, specs, combine, "merge"
    if mode == "base":
        return w, specs, combine, "base"
    return w, [nonunit_spec(mode, s, lv) for s, lv in zip(specs, levels)], combine, "merge"


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


def _dare_kept(delta: torch.Tensor, density: float, seed: int, name: str, stream: int, backend: str) -> int:
    """Kept count of the DARE draw of (seed, name, stream): the backend applies it to a tensor of ones."""
    k1, k2 = rng.stream_keys(seed, name, stream)
    if backend == "reference":
        return int(rng.keep_mask(delta.numel(), density, k1, k2, device=delta.device).sum())
    plan = ApplyPlan("dare", k1=k1, k2=k2, thr32=rng.threshold32(density))
    ones = torch.ones(delta.numel(), dtype=torch.float32, device=delta.device)
    kept = get_backend(backend).apply([ones], None, [plan], [1.0], CombineSpec(), torch.float32)
    return int(torch.count_nonzero(kept))


def realised_density(delta: torch.Tensor, spec: SparsifySpec, *, seed: int, name: str, stream: int,
                     backend: str = "reference",
                     plan: Optional[ApplyPlan] = None) -> float:
    """Fraction of the delta's elements that survive ``spec`` (exact; analytic where possible).
    ``plan``: the plan the merge applied; a mask plan (DELLA) is counted instead of redrawn."""
    n = delta.numel()
    m = spec.method
    if n == 0:
        return 0.0
    if m == "none" or (m in ("magnitude", "breadcrumbs", "dare", "della") and spec.density >= 1.0
                       and not spec.density1_prunes_min):
        return 1.0
    if m == "magnitude" and spec.tie_mode == "exact_k" and spec.partition == "tensor":
        return R.keep_count(n, spec.density, spec.count_rule) / n
    if m == "breadcrumbs":
        return R.breadcrumbs_window(n, spec.density, spec.gamma)[1] / n
    if m == "dare":
        return _dare_kept(delta, spec.density, seed, name, stream, backend) / n
    if m == "bands" and plan is not None and plan.kind == "thresholds":
        return plan_kept(plan, spec.densities, spec.count_rule, delta) / n
    if plan is not None and plan.kind == "mask":
        return int(torch.count_nonzero(plan.mask)) / n
    f = R.sparsify_factor(delta.cpu(), spec, seed=seed, name=name, stream=stream)
    return float((f != 0).sum()) / n
