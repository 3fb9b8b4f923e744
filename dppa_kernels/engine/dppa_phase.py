"""DPPA phase 1: exact per-unit histograms of every model's delta, then the DP allocation.

Statistics are whole-model (docs/methods.md, DPPA), so every unit delta is streamed once before any tensor
is merged. The host then computes each model's DP densities and band thresholds from the
histograms. In resident mode the base and deltas stay on the device for phase 2.

The engine reaches this module through one seam, :func:`prepare`: a hook between the plan and
the execute stages that reads the statistics through the executor, allocates, and gives every
unit tensor its recipe.
"""

from __future__ import annotations

import json
import os
import time
from typing import Optional

import torch

from ..dppa import stats as S
from ..dppa.allocation import DPSettings, allocate as dp_allocate, mean_density
from ..dppa.thresholds import UnitBands
from ..dppa.units import unmatched_linears, warn_unmatched
from ..ops import histogram_planned
from .compute import check_deltas_finite, form_deltas
from .shards import write_json_atomic
from .workspace import Workspace
from .errors import MergeError, brief, clip

ALLOC_CACHE = "dppa_allocation.json"


def prepare(job, executor, todo: set, *, cache_dir: Optional[str], resuming: bool) -> tuple[dict, dict, dict]:
    """The DPPA stage hook: (allocation report, per-unit report rows, timings); sets each unit's
    recipe on the plan. ``todo``: the names of the tensors this run merges (their deltas may stay
    resident in the executor). With ``cache_dir`` the allocation is saved there for ``--resume``
    and, when resuming, read back instead of recomputed."""
    plan = job.plan
    sdtype = stats_dtype(plan)
    cache = os.path.join(cache_dir, ALLOC_CACHE) if cache_dir else None
    t1 = time.perf_counter()
    if resuming and cache and os.path.exists(cache):
        try:
            with open(cache) as f:
                c = json.load(f)
            dens = {int(k): v for k, v in c["densities"].items()}
            plan.set_unit_densities(dens)
            return c["report"], c["units"], {"phase1_s": 0.0, "phase1_cached": True}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # unreadable (the run died while writing it): compute the statistics again
    units = [t for t in plan.tasks if t.unit]
    hists, resident = executor.statistics(job, units, sdtype=sdtype, keep=todo)
    timings = {"phase1_s": time.perf_counter() - t1}
    t = time.perf_counter()
    dens, report = allocate(plan, hists, plan.labels, backend=job.backend, sdtype=sdtype)
    rows = unit_report(plan, hists, dens, plan.labels, sdtype)
    del hists
    report["resident"] = resident
    timings["allocation_s"] = time.perf_counter() - t
    plan.set_unit_densities(dens)
    if cache:
        write_json_atomic(cache, {"densities": dens, "report": report, "units": rows})
    return report, rows, timings


def stats_dtype(plan) -> torch.dtype:
    name = (plan.cfg.parameters or {}).get("stats_dtype", "bfloat16")
    try:
        return S.stats_dtype_of(name)
    except ValueError:
        raise MergeError(f"stats_dtype must be one of {sorted(S.STATS_DTYPES)}, got {brief(name)}") from None


def resident_fits(plan, device: torch.device, mode: str) -> bool:
    """Whether phase 1 keeps the unit tensors on the device (auto: CUDA with room to spare)."""
    if mode in ("on", "off"):
        return mode == "on"
    if device.type != "cuda":
        return False  # on the host, resident copies would make RSS grow with the model
    need = sum(t.out_bytes // t.out_dtype.itemsize * t.work_dtype.itemsize * (len(plan.models) + 1)
               for t in plan.tasks if t.unit)
    free, _ = torch.cuda.mem_get_info(device)
    return need < 0.7 * free


def collect(plan, stream, labels, *, backend: str, sdtype: torch.dtype, resident: bool):
    """{model index: {unit: int32 hist}} and {unit: (base, deltas)} when resident.

    ``stream`` yields (task, raw tensors) for the unit tasks, on the device.
    """
    units = [t.name for t in plan.tasks if t.unit]
    # One block for all histograms: thousands of small long-lived buffers interleaved with the
    # streamed tensors would fragment the heap and make RSS grow with the model.
    buf = torch.zeros((len(plan.models), len(units), 32768), dtype=torch.int32)
    slot = {n: j for j, n in enumerate(units)}
    hists = {i: {} for i in range(len(plan.models))}
    kept = {}
    ws = None if resident else Workspace()
    in_pass = backend != "reference"  # the histogram pass finds NaN/Inf in the deltas
    for task, raw in stream:
        base, deltas = form_deltas(task, labels, raw, ws, check_finite=not in_pass)
        del raw
        for i, d in enumerate(deltas):
            h = buf[i, slot[task.name]]
            try:
                h.copy_(histogram_planned(d, sdtype, backend=backend, check_as=labels[i] if in_pass else None))
            except ValueError:
                check_deltas_finite(task, labels[i:i + 1], [d])  # the engine's error, naming the model
                raise
            hists[i][task.name] = h
        if resident:
            kept[task.name] = (base, deltas)
        del base, deltas
    return hists, kept


def allocate(plan, hists, labels, *, backend: str, sdtype: torch.dtype) -> tuple[dict, dict]:
    """(per-unit densities per model, report section) from the histograms. Each model's entry
    reports its levels, the N-weighted mean density per level after clamping (``mean_density``;
    exact unless units were clamped, or with ``renormalize``) and how many units were clamped."""
    gp = plan.cfg.parameters or {}
    layers = {t.name: t.layer for t in plan.tasks if t.unit}
    sizes = {t.name: t.out_bytes // t.out_dtype.itemsize for t in plan.tasks if t.unit}
    try:
        settings = DPSettings.from_params(gp)
    except (ValueError, TypeError) as exc:
        raise MergeError(f"DPPA settings: {clip(exc)}") from None
    unmatched = unmatched_linears({t.name: tuple(t.shape) for t in plan.tasks if t.floating}, layers,
                                  layer_pattern=gp.get("layer_pattern"))
    warn_unmatched(unmatched)
    dens, report = {}, {"models": [], "unmatched_linear": unmatched}
    for i, label in enumerate(labels):
        try:
            alloc = dp_allocate({n: h for n, h in hists[i].items()}, layers, plan.levels[i], settings,
                                stats_dtype=sdtype, backend=backend)
        except (ValueError, TypeError) as exc:
            raise MergeError(f"model {brief(label)}: DPPA allocation failed: {clip(exc)}") from None
        dens[i] = alloc.densities
        report["models"].append({
            "model": label, "levels": plan.levels[i], "mean_density": mean_density(alloc, sizes),
            "layer_offset": {str(k): v for k, v in alloc.layer_offset.items()},
            "unit_offset": alloc.unit_offset, "clamped": len(alloc.clamped),
        })
    return dens, report


def unit_report(plan, hists, dens, labels, sdtype: torch.dtype) -> dict:
    """{unit: {target, thresholds}} per model, from the histograms (the realised densities come
    from the plans the merge applies)."""
    count_rule = (plan.cfg.parameters or {}).get("count_rule", "dppa")
    out = {}
    for t in plan.tasks:
        if t.unit:
            bands = [UnitBands.from_hist(hists[i][t.name], dens[i][t.name], sdtype, count_rule)
                     for i in range(len(labels))]
            out[t.name] = {"target": [list(dens[i][t.name]) for i in range(len(labels))],
                           "thresholds": [b.thresholds() for b in bands]}
    return out
