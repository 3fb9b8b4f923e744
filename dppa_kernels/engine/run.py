"""``run_merge``: config in, sharded safetensors out (the engine behind ``dppa merge``).

Steps: validate the config and every input header (nothing written yet) → plan → for DPPA,
phase 1 statistics and the host allocation → phase 2 merge, streamed through a reader thread and
written shard by shard into a temporary folder → side files and report → rename into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from tqdm import tqdm

from .. import __version__
from ..backends.registry import resolve
from .background_writer import BackgroundWriter
from .config import DTYPE_NAMES, is_dppa, load_config
from .compute import form_deltas, merge_tensor, realised_density, specs_for
from .dppa_phase import allocate, collect, resident_fits, stats_dtype, unit_report
from .errors import MergeError, brief, clip
from .outdir import (REPORT, check_output, check_side_files, copy_side_files, discard, drop_unfinished, finalize,
                     output_lock, side_sources, write_text)
from .plan import build_plan, check_architectures
from .prefetch import prefetch
from .shards import JOURNAL, Journal, ShardWriter, write_json_atomic
from .source import ModelSource
from .workspace import Workspace

ALLOC_CACHE = "dppa_allocation.json"
DEFAULT_SHARD_SIZE = 5_000_000_000


@dataclass
class MergeOptions:
    out: str
    device: str = "cpu"
    backend: str = "auto"
    out_dtype: Optional[str] = None
    shard_size: int = DEFAULT_SHARD_SIZE
    resume: bool = False
    force: bool = False
    seed: int = 0
    progress: bool = True
    allow_pickle: bool = False
    allow_crimes: bool = False  # merge models whose config.json model_type / architectures differ
    truncate_vocab: bool = False
    resident: str = "auto"
    prefetch: int = 2
    tensor_order: str = "natural"  # or "name": mergekit's output order (plan.build_plan)
    tensor_report: bool = True  # per-tensor realised densities in the report (DELLA's: a reference re-run)


def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise MergeError(f"--device {brief(name)} is not a device (use cpu or cuda[:N])") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MergeError(f"--device {brief(name)}: no CUDA GPU is visible to torch {torch.__version__}")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MergeError(f"--device {brief(name)}: only {torch.cuda.device_count()} GPU(s) visible")
    elif dev.type != "cpu":
        raise MergeError(f"--device {brief(name)}: only cpu and cuda[:N] are supported")
    return dev


def _fingerprint(cfg, plan, opts: MergeOptions) -> str:
    data = {"config": cfg.model_dump(mode="json"), "seed": opts.seed, "out_dtype": opts.out_dtype,
            "shard_size": opts.shard_size, "truncate_vocab": opts.truncate_vocab, "version": __version__,
            "inputs": [s.fingerprint() for s in [plan.base] + plan.models]}
    if opts.tensor_order != "natural":
        data["tensor_order"] = opts.tensor_order
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _bar(opts, total, desc):
    return tqdm(total=total, desc=desc, unit="tensor", disable=not opts.progress, dynamic_ncols=True, leave=True)


def run_merge(config_path: str, opts: MergeOptions) -> dict:
    """Run one merge; returns the report (also written to ``merge_report.json``).

    Holds an exclusive lock on ``opts.out`` for the whole run (a concurrent merge into the same
    folder fails at once). A fresh run that fails leaves nothing behind; a resumed run that fails
    keeps its temporary folder for the next ``--resume``."""
    t0 = time.perf_counter()
    cfg, yaml_text = load_config(config_path)
    if opts.out_dtype is not None and opts.out_dtype not in DTYPE_NAMES:
        raise MergeError(f"--dtype {brief(opts.out_dtype)} is not supported; valid: {', '.join(DTYPE_NAMES)}")
    device = _device(opts.device)
    try:
        be_name = resolve(opts.backend, device)
    except (ValueError, RuntimeError) as exc:
        raise MergeError(f"--backend {brief(opts.backend)}: {clip(exc)}") from None
    if cfg.tokenizer_source == "union":
        raise MergeError("tokenizer_source: union is not supported (use base or a model path)")
    base = ModelSource(cfg.base_model, cfg.base_model, allow_pickle=opts.allow_pickle)
    models = [ModelSource(m.model, m.model, allow_pickle=opts.allow_pickle) for m in cfg.models]
    inputs = [(s.label, s.path) for s in [base] + models]
    tok = base.path
    if cfg.tokenizer_source not in (None, "base"):
        tok = os.path.abspath(os.path.expanduser(cfg.tokenizer_source))
        if not os.path.isdir(tok):
            raise MergeError(f"tokenizer_source {brief(cfg.tokenizer_source)}: folder {clip(tok)} does not exist")
        inputs.append(("tokenizer_source", tok))
    check_architectures(base, models, opts.allow_crimes)
    plan = build_plan(cfg, base, models, out_dtype=opts.out_dtype, shard_size=opts.shard_size,
                      truncate_vocab=opts.truncate_vocab, order=opts.tensor_order)
    check_side_files(side_sources(base.path, tok))
    fingerprint = _fingerprint(cfg, plan, opts)  # reads every input file: before anything is created
    try:
        with output_lock(opts.out):
            tmp, resuming = check_output(opts.out, inputs, force=opts.force, resume=opts.resume,
                                         config=os.path.abspath(config_path))
            return _merge(cfg, yaml_text, plan, base, models, tok, tmp, resuming, fingerprint, device, be_name,
                          opts, t0)
    finally:
        for s in [base] + models:
            s.close()


def _merge(cfg, yaml_text, plan, base, models, tok, tmp, resuming, fingerprint, device, be_name, opts, t0) -> dict:
    """Everything after the checks: the merge into ``tmp``, side files, report, rename into place."""
    timings = {"plan_s": time.perf_counter() - t0}
    labels = [m.label for m in models]
    journal = Journal(tmp, fingerprint)
    dropped = journal.load_verified() if resuming else []  # a refusal here leaves the partial intact
    writer = None
    try:
        drop_unfinished(tmp)
        writer = BackgroundWriter(ShardWriter(tmp, plan, journal))
        todo = [t for t in plan.tasks if not writer.is_done(t.shard)]
        pin = device.type == "cuda"

        def load(task):
            return [s.read(task.name, pin=pin, mapped=not pin) for s in [base] + models]

        report_tensors, dppa_report, dens, resident = {}, None, None, {}
        if is_dppa(cfg.merge_method):
            dens, dppa_report, unit_rows, resident, ph = _phase1(plan, tmp, resuming, todo, labels, load, device,
                                                                  be_name, opts)
            report_tensors.update(unit_rows)
            timings.update(ph)
        t2 = time.perf_counter()
        bar = _bar(opts, len(todo), "merge" if dens is None else "phase 2/2 merge")
        reads = [t for t in todo if t.name not in resident]
        stream = prefetch(reads, load, device, depth=opts.prefetch)
        ws = Workspace(device)
        for task in todo:
            if task.name in resident:
                b, deltas = resident.pop(task.name)
            else:
                got, raw = next(stream)
                assert got is task
                if task.floating:
                    b, deltas = form_deltas(task, labels, raw, ws)
                else:
                    b, deltas = raw[0], []
                del raw
            if task.floating:
                w, specs, combine, mode = specs_for(task, cfg.merge_method, len(models), levels=plan.levels,
                                                    unit_densities=[dens[i][task.name] for i in range(len(models))]
                                                    if task.unit else None, labels=labels)
                plans: list = []
                out = merge_tensor(task, b, deltas, w, specs, combine, mode, seed=opts.seed, backend=be_name,
                                   plans_out=plans)
                if opts.tensor_report or task.unit:  # DPPA units: counted from the plans applied
                    row = _tensor_row(task, deltas, specs, mode, opts.seed, be_name, plans)
                    report_tensors[task.name] = {**report_tensors.get(task.name, {}), **row}
                del plans
            else:
                out = b
            # the writer holds the tensor past this iteration: it must not live in the workspace
            assert not ws.owns(out), f"tensor {task.name!r}: merge output aliases a workspace buffer"
            writer.add(task, out.cpu())
            del b, deltas, out
            bar.update(1)
        stream.close()
        bar.close()
        writer.join()  # every shard written and committed before the index
        timings["merge_s"] = time.perf_counter() - t2
        writer.write_index()
        out_name = str(plan.tasks[0].out_dtype).replace("torch.", "") if plan.tasks else None
        copied = copy_side_files(tmp, base.path, tok, out_name)
        write_text(os.path.join(tmp, "mergekit_config.yml"), yaml_text)
        timings["total_s"] = time.perf_counter() - t0
        report = _report(cfg, plan, opts, be_name, device, timings, report_tensors, dppa_report, copied,
                         resuming, dropped, writer)
        write_json_atomic(os.path.join(tmp, REPORT), report)
        finalize(tmp, opts.out, drop=[JOURNAL, ALLOC_CACHE])
        return report
    except BaseException as exc:
        if writer is not None:
            writer.abort()
        if not (resuming or isinstance(exc, KeyboardInterrupt)):
            discard(tmp)  # a fresh run leaves nothing; an interrupted or resumed one stays resumable
        raise


def _phase1(plan, tmp, resuming, todo, labels, load, device, be_name, opts):
    """DPPA statistics and allocation (cached in the temp folder for --resume)."""
    sdtype = stats_dtype(plan)
    cache = os.path.join(tmp, ALLOC_CACHE)
    timings = {}
    t1 = time.perf_counter()
    units = [t for t in plan.tasks if t.unit]
    if resuming and os.path.exists(cache):
        try:
            with open(cache) as f:
                c = json.load(f)
            dens = {int(k): v for k, v in c["densities"].items()}
            return dens, c["report"], c["units"], {}, {"phase1_s": 0.0, "phase1_cached": True}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # unreadable (the run died while writing it): compute the statistics again
    resident = resident_fits(plan, device, opts.resident)
    bar = _bar(opts, len(units), "phase 1/2 statistics")
    hists, kept = collect(plan, prefetch(units, load, device, depth=opts.prefetch, progress=bar), labels,
                          backend=be_name, sdtype=sdtype, resident=resident)
    bar.close()
    timings["phase1_s"] = time.perf_counter() - t1
    t = time.perf_counter()
    dens, report = allocate(plan, hists, labels, backend=be_name, sdtype=sdtype)
    rows = unit_report(plan, hists, dens, labels, sdtype)
    del hists
    report["resident"] = resident
    timings["allocation_s"] = time.perf_counter() - t
    write_json_atomic(cache, {"densities": dens, "report": report, "units": rows})
    todo_names = {x.name for x in todo}
    kept = {k: v for k, v in kept.items() if k in todo_names}
    return dens, report, rows, kept, timings


def _tensor_row(task, deltas, specs, mode, seed, backend, plans=()) -> dict:
    if mode == "base":
        return {"target": [0.0] * len(deltas), "realised": [0.0] * len(deltas), "mode": "base"}
    target = [list(s.densities) if s.method == "bands" else (1.0 if s.method == "none" else s.density)
              for s in specs]
    plans = list(plans) or [None] * len(deltas)  # none from the reference backend
    real = [realised_density(d, s, seed=seed, name=task.name, stream=i, backend=backend, plan=p)
            for i, (d, s, p) in enumerate(zip(deltas, specs, plans))]
    return {"target": target, "realised": real}


def _report(cfg, plan, opts, be_name, device, timings, tensors, dppa_report, copied, resuming, dropped, writer):
    per_model = {}
    numel = {t.name: t.out_bytes // t.out_dtype.itemsize for t in plan.tasks}
    units = [n for n, t in ((t.name, t) for t in plan.tasks) if t.unit] if is_dppa(cfg.merge_method) else []
    floats = [t for t in plan.tasks if t.floating]
    for i, label in enumerate(m.label for m in plan.models):
        names = units or [t.name for t in floats]
        have = [n for n in names if "realised" in tensors.get(n, {})]
        num = sum(tensors[n]["realised"][i] * numel[n] for n in have)
        den = sum(numel[n] for n in have)
        per_model[label] = num / den if den else None
    opt = asdict(opts)
    return {
        "method": cfg.merge_method, "config": cfg.model_dump(mode="json", exclude_none=True),
        "options": opt, "backend": be_name, "backend_requested": opts.backend, "device": str(device),
        "dppa_kernels": __version__, "torch": torch.__version__, "seed": opts.seed,
        "n_tensors": len(plan.tasks), "n_shards": plan.n_shards, "files_copied": copied,
        "resumed": resuming, "shards_redone_on_resume": dropped,
        "realised_density": per_model, "realised_density_scope": "units" if units else "all floating tensors",
        "timings": timings, "dppa": dppa_report, "tensors": tensors,
    }

