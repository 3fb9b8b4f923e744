"""DPPA phase 1: exact per-unit histograms of every model's delta, then the DP allocation.

Statistics are whole-model (DPPA.md §4), so every unit delta is streamed once before any tensor
is merged. The host then computes each model's DP densities and band thresholds from the
histograms. In resident mode the base and deltas stay on the device for phase 2.
"""

from __future__ import annotations

import torch

from ..dppa import stats as S
from ..dppa.allocation import DPSettings, allocate as dp_allocate, mean_density
from ..dppa.thresholds import UnitBands
from ..dppa.units import unmatched_linears, warn_unmatched
from .compute import form_deltas
from .workspace import Workspace
from .errors import MergeError, brief, clip


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
    for task, raw in stream:
        base, deltas = form_deltas(task, labels, raw, ws)
        del raw
        for i, d in enumerate(deltas):
            h = buf[i, slot[task.name]]
            h.copy_(S.unit_histogram(d, sdtype, backend))
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
