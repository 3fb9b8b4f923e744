"""DPPA phase 1: exact per-unit histograms of every model's delta, then the DP allocation.

Statistics are whole-model (docs/methods.md, DPPA), so every unit delta is streamed once before any tensor
is merged. The host then computes each model's DP densities and band thresholds from the
histograms. In resident mode the base and deltas stay on the device for phase 2.
"""

from __future__ import annotations

import torch

from ..ops import dp_densities, tensor_histogram
from ..spec import SparsifySpec
from .compute import STATS_DTYPES, band_stats, dppa_alphas, form_deltas
from .workspace import Workspace
from .errors import MergeError, brief, clip


def stats_dtype(plan) -> torch.dtype:
    name = (plan.cfg.parameters or {}).get("stats_dtype", "bfloat16")
    if name not in STATS_DTYPES:
        raise MergeError(f"stats_dtype must be one of {sorted(STATS_DTYPES)}, got {brief(name)}")
    return STATS_DTYPES[name]


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
            h.copy_(tensor_histogram(d, stats_dtype=sdtype, check_finite=False, backend=backend))
            hists[i][task.name] = h
        if resident:
            kept[task.name] = (base, deltas)
        del base, deltas
    return hists, kept


def allocate(plan, hists, labels, *, backend: str, sdtype: torch.dtype) -> tuple[dict, dict]:
    """(per-unit densities per model, report section) from the histograms."""
    gp = plan.cfg.parameters or {}
    layers = {t.name: t.layer for t in plan.tasks if t.unit}
    kw = {k: gp[k] for k in ("offset_lambda", "outlier_mult_layer", "outlier_mult_unit") if k in gp}
    if "density_clamp" in gp:
        kw["density_clamp"] = tuple(gp["density_clamp"])
    if "compat" in gp:
        kw["compat"] = None if gp["compat"] in (None, "none") else gp["compat"]
    dens, report = {}, {"models": []}
    for i, label in enumerate(labels):
        try:
            alloc = dp_densities({n: h for n, h in hists[i].items()}, densities=plan.levels[i], layers=layers,
                                 stats_dtype=sdtype, backend=backend, **kw)
        except (ValueError, TypeError) as exc:
            raise MergeError(f"model {brief(label)}: DPPA allocation failed: {clip(exc)}") from None
        dens[i] = alloc.densities
        report["models"].append({
            "model": label, "levels": plan.levels[i],
            "layer_offset": {str(k): v for k, v in alloc.layer_offset.items()},
            "unit_offset": alloc.unit_offset, "clamped": len(alloc.clamped),
        })
    return dens, report


def unit_report(plan, hists, dens, labels, sdtype: torch.dtype) -> dict:
    """{unit: {target, realised, thresholds}} per model, exact from the histograms."""
    out = {}
    tie = (plan.cfg.parameters or {}).get("tie_mode", "gt")
    combine = (plan.cfg.parameters or {}).get("band_combine", "max")
    for t in plan.tasks:
        if not t.unit:
            continue
        alphas = dppa_alphas(t, plan.levels, labels)
        rows = {"target": [], "realised": [], "thresholds": []}
        for i in range(len(labels)):
            spec = SparsifySpec("bands", densities=tuple(dens[i][t.name]), alphas=tuple(alphas[i]),
                                band_combine=combine, tie_mode=tie, count_rule="dppa", key_dtype=sdtype)
            taus, real = band_stats(hists[i][t.name].to(torch.int64), spec)
            rows["target"].append(list(dens[i][t.name]))
            rows["realised"].append(real)
            rows["thresholds"].append(taus)
        out[t.name] = rows
    return out
