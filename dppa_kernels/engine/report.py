"""The merge report, built from the plans the merge applied (no second apply, no reference re-run).

Per tensor and model, the realised density is what the spec's sparsifier says its applied
``ApplyPlan`` kept (``Sparsifier.realised``, the one home of that count): exact for dense,
threshold and mask plans. A plan that holds only the terms of a random draw (DARE's keys and
threshold) reports the sparsifier's ``expected`` fraction instead (the draw's keep probability)
and lists the model in ``expected``: counting the draw would cost a pass as long as the merge's.
On the reference backend, which hands out no plans, the sparsifier counts without one.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Optional

import torch

from .. import __version__
from ..backends.base import ApplyPlan
from ..methods import get_sparsifier
from ..spec import SparsifySpec
from .config import is_dppa


def kept_fraction(plan: Optional[ApplyPlan], spec: SparsifySpec, delta: torch.Tensor, *, seed: int = 0,
                  name: str = "", stream: int = 0) -> tuple[float, bool]:
    """(fraction of ``delta`` kept by the applied ``plan``, whether it is exact). ``plan`` None:
    the reference backend's merge."""
    if delta.numel() == 0:
        return 0.0, True
    sp = get_sparsifier(spec.method, "spec.method")
    guess = sp.expected(spec, plan)
    if guess is not None:
        return guess, False
    return sp.realised(delta, spec, seed=seed, name=name, stream=stream, plan=plan), True


def tensor_row(recipe, deltas: list, plans: list, *, seed: int, name: str) -> dict:
    """{target, realised[, expected]} of one merged tensor, one value per model."""
    m = len(deltas)
    if recipe.mode == "base":
        return {"target": [0.0] * m, "realised": [0.0] * m, "mode": "base"}
    target = [get_sparsifier(s.method, "spec.method").target(s) for s in recipe.specs]
    plans = list(plans) or [None] * m
    realised, expected = [], []
    for i, (d, s, p) in enumerate(zip(deltas, recipe.specs, plans)):
        frac, exact = kept_fraction(p, s, d, seed=seed, name=name, stream=i)
        realised.append(frac)
        if not exact:
            expected.append(i)
    row = {"target": target, "realised": realised}
    if expected:
        row["expected"] = expected  # these models' values are expected fractions (a random draw's)
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
