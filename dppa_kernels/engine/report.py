"""The merge report, built from the plans the merge applied (no second apply, no reference re-run).

Per tensor and model, the realised density is the fraction of the delta the applied
``ApplyPlan`` keeps: exact for dense, threshold (magnitude, DPPA bands, breadcrumbs) and mask
(DELLA) plans, from the keep counts and the selected tie counts. A DARE plan holds the draw's keys
and threshold, not its outcome: its row reports the draw's keep probability and lists the model in
``expected`` (counting the draw would cost a pass as long as the merge's). On the reference
backend, which hands out no plans, the reference's factors are counted.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Optional

import torch

from .. import __version__
from .. import reference as R
from ..backends.base import ApplyPlan
from ..ops import _partition_lengths, keep_counts
from ..spec import SparsifySpec
from .config import is_dppa


def _level_keeps(spec: SparsifySpec, delta: torch.Tensor) -> list:
    """Keep count per partition of each level of a threshold plan (as ``ops.make_plan`` sets them)."""
    lengths = _partition_lengths(delta, spec.partition, spec.block_size)
    if spec.method == "bands":
        return [keep_counts(lengths, d, spec.count_rule) for d in spec.densities]
    return [lengths if spec.density >= 1.0 else keep_counts(lengths, spec.density, spec.count_rule)]


def _threshold_kept(plan: ApplyPlan, spec: SparsifySpec, delta: torch.Tensor) -> int:
    """Elements a threshold plan keeps with a non-zero factor. In level j of partition p,
    #key > τ = k − budget (τ is the k-th largest key); ``gt`` keeps those, ``ge`` adds every tie,
    ``exact_k`` adds ``budget`` ties: k in all."""
    if spec.method == "breadcrumbs":  # the window is exact by construction
        return R.breadcrumbs_window(delta.numel(), spec.density, spec.gamma)[1]
    kept, prev = 0, 0
    for j, k in enumerate(_level_keeps(spec, delta)):
        budget, eq = plan.budget[:, j], plan.c_eq[:, j]
        level = k if plan.tie_mode == "exact_k" else (k - budget) + (eq if plan.tie_mode == "ge" else 0)
        c = int(level.sum())
        kept += (c - prev) if plan.factors[j] != 0 else 0
        prev = c
    return kept


def kept_fraction(plan: Optional[ApplyPlan], spec: SparsifySpec, delta: torch.Tensor, *, seed: int = 0,
                  name: str = "", stream: int = 0) -> tuple[float, bool]:
    """(fraction of ``delta`` kept by the applied ``plan``, whether it is exact). ``plan`` None:
    the reference backend's merge, whose factors are counted."""
    n = delta.numel()
    if n == 0:
        return 0.0, True
    if plan is None:
        f = R.sparsify_factor(delta.cpu(), spec, seed=seed, name=name, stream=stream)
        return float((f != 0).sum()) / n, True
    if plan.kind == "dense":
        return 1.0, True
    if plan.kind == "mask":
        return int(torch.count_nonzero(plan.mask)) / n, True
    if plan.kind == "dare":
        return min(plan.thr32, 1 << 32) / 4294967296.0, False
    return _threshold_kept(plan, spec, delta) / n, True


def tensor_row(recipe, deltas: list, plans: list, *, seed: int, name: str) -> dict:
    """{target, realised[, expected]} of one merged tensor, one value per model."""
    m = len(deltas)
    if recipe.mode == "base":
        return {"target": [0.0] * m, "realised": [0.0] * m, "mode": "base"}
    target = [list(s.densities) if s.method == "bands" else (1.0 if s.method == "none" else s.density)
              for s in recipe.specs]
    plans = list(plans) or [None] * m
    realised, expected = [], []
    for i, (d, s, p) in enumerate(zip(deltas, recipe.specs, plans)):
        frac, exact = kept_fraction(p, s, d, seed=seed, name=name, stream=i)
        realised.append(frac)
        if not exact:
            expected.append(i)
    row = {"target": target, "realised": realised}
    if expected:
        row["expected"] = expected  # these models' values are the DARE keep probability
    return row


def build_report(cfg, plan, opts, backend: str, device, timings: dict, tensors: dict, dppa_report,
                 copied: list, resuming: bool, dropped: list) -> dict:
    """``merge_report.json``: method, options, versions, timings, per-model and per-tensor densities."""
    per_model = {}
    numel = {t.name: t.out_bytes // t.out_dtype.itemsize for t in plan.tasks}
    units = [t.name for t in plan.tasks if t.unit] if is_dppa(cfg.merge_method) else []
    names = units or [t.name for t in plan.tasks if t.floating]
    for i, label in enumerate(plan.labels):
        have = [n for n in names if "realised" in tensors.get(n, {})]
        num = sum(tensors[n]["realised"][i] * numel[n] for n in have)
        den = sum(numel[n] for n in have)
        per_model[label] = num / den if den else None
    exact = not any(tensors[n].get("expected") for n in names if n in tensors)
    options = {f.name: getattr(opts, f.name) for f in fields(opts)}
    if not isinstance(options.get("executor", ""), str):
        options["executor"] = type(options["executor"]).__name__
    return {
        "method": cfg.merge_method, "config": cfg.model_dump(mode="json", exclude_none=True),
        "options": options, "backend": backend, "backend_requested": opts.backend, "device": str(device),
        "dppa_kernels": __version__, "torch": torch.__version__, "seed": opts.seed,
        "n_tensors": len(plan.tasks), "n_shards": plan.n_shards, "files_copied": copied,
        "resumed": resuming, "shards_redone_on_resume": dropped,
        "realised_density": per_model, "realised_density_scope": "units" if units else "all floating tensors",
        "realised_density_exact": exact, "timings": timings, "dppa": dppa_report, "tensors": tensors,
    }
