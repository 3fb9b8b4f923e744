"""Per-tensor work: deltas from raw tensors, the merge of one tensor by its recipe."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..dppa.stats import form_delta
from ..ops import merge_planned
from .errors import MergeError, brief, clip
from .recipe import Recipe
from .workspace import Workspace



def form_deltas(task, labels: Sequence[str], raw: Sequence[torch.Tensor], workspace: Optional[Workspace] = None,
                *, check_finite: bool = True) -> tuple[torch.Tensor, list]:
    """(base in the working dtype, Δ_i = (ft_i − base) rounded to the working dtype).

    The subtraction runs in float32 (float64 for float64 work), then rounds once: the same values
    as mergekit's subtraction in the working dtype (a DPPA merge under ``compat: official``
    rounds Δ to bf16 instead, held in the working dtype: ``dppa.stats.form_delta``). NaN/Inf in
    any delta is an error: found here by one reduction per delta, or with ``check_finite=False``
    by the merge's own passes
    (:func:`merge_tensor` on a fast backend). With a ``workspace`` the deltas are views of its
    buffers (valid until the next tensor's deltas).
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
        d = form_delta(base, ft, wd, compat=task.dppa_params.get("compat"), out=out)
        # One reduction detects NaN/Inf; the exact count runs only when it fires (or overflows).
        if check_finite and not bool(torch.isfinite(d.sum())):
            check_deltas_finite(task, labels[i:i + 1], [d])
        deltas.append(d)
        del d
    return base, deltas


def check_deltas_finite(task, labels: Sequence[str], deltas: Sequence[torch.Tensor]) -> None:
    """Raise the engine's error for the first delta holding NaN/Inf (an exact count)."""
    for label, d in zip(labels, deltas):
        bad = int((~torch.isfinite(d)).sum())
        if bad:
            raise MergeError(f"tensor {brief(task.name)}: the delta of model {brief(label)} has {bad} NaN/Inf value(s)")


def merge_tensor(task, base: torch.Tensor, deltas: list, recipe: Recipe, *, seed: int, backend: str,
                 labels: Sequence[str] = (), check_finite: bool = False,
                 plans_out: Optional[list] = None) -> torch.Tensor:
    """The merged tensor by its recipe (validated by the plan stage) on ``backend`` (resolved by the
    driver); ``plans_out`` receives the plans the merge applied (see merge_deltas). With
    ``check_finite`` a fast backend finds NaN/Inf in the deltas inside its passes."""
    if recipe.mode == "base":
        return base.to(task.out_dtype)
    check_as = None
    if check_finite:
        check_as = [f"deltas[{i}]" for i in range(len(deltas))] + ["base"]
    try:
        return merge_planned(deltas, base, recipe.specs, recipe.weights, recipe.combine, seed=seed, name=task.name,
                             out_dtype=task.out_dtype, backend=backend, plans_out=plans_out, check_as=check_as)
    except (ValueError, TypeError) as exc:
        if check_finite:
            check_deltas_finite(task, labels, deltas)  # the error names the model
        raise MergeError(f"tensor {brief(task.name)}: {clip(exc)}") from None
