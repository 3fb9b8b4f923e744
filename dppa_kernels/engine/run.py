"""``run_merge``: config in, sharded safetensors out (the driver behind ``dppa merge``).

Stages: ``open_inputs`` (every input header checked, nothing written) → ``plan`` (each tensor's
recipe and shard) → under the output folder's lock, ``execute`` (DPPA's statistics hook, then
the executor writes the shards into a temporary folder; the driver journals each one) →
``commit`` (index, side files, report, one rename into place).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .. import __version__
from ..backends.registry import resolve
from .config import DTYPE_NAMES, load_config
from .dppa_phase import ALLOC_CACHE
from .errors import MergeError, brief, clip
from .executor import Executor, MergeJob, SerialExecutor
from .inputs import Inputs, open_inputs
from .local_executor import LocalExecutor
from .outdir import (REPORT, check_output, check_side_files, copy_side_files, discard, drop_unfinished, finalize,
                     output_lock, side_sources, write_text)
from .plan import build_plan
from .report import build_report
from .shards import JOURNAL, Journal, shard_name, write_index, write_json_atomic
from .stages import Executed, execute

DEFAULT_SHARD_SIZE = 5_000_000_000
EXECUTORS = ("local", "serial", "ray")


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
    tensor_report: bool = True  # per-tensor realised densities in the report (from the applied plans)
    executor: Union[str, Executor] = "local"  # "local" (reader and writer threads), "serial", "ray" or an Executor
    # executor="ray" (engine/ray_executor.py): the cluster to join, tasks at a time, GPUs per task
    ray_address: Optional[str] = None
    workers: Optional[int] = None
    gpus_per_worker: Optional[float] = None


def resolve_device(name: str) -> torch.device:
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


def resolve_backend(name: str, device: torch.device) -> str:
    """The backend of the whole run, resolved once ("auto" picks the device's fastest)."""
    try:
        return resolve(name, device)
    except (ValueError, RuntimeError) as exc:
        raise MergeError(f"--backend {brief(name)}: {clip(exc)}") from None


def make_executor(opts: MergeOptions) -> Executor:
    ray_opts = {"--ray-address": opts.ray_address, "--workers": opts.workers, "--gpus-per-worker": opts.gpus_per_worker}
    given = [k for k, v in ray_opts.items() if v is not None]
    if given and opts.executor != "ray":
        raise MergeError(f"{', '.join(given)} apply to --executor ray only (executor is {brief(opts.executor)})")
    if isinstance(opts.executor, Executor):
        return opts.executor
    if opts.executor == "local":
        return LocalExecutor(prefetch_depth=opts.prefetch, progress=opts.progress, resident=opts.resident)
    if opts.executor == "serial":
        return SerialExecutor()
    if opts.executor == "ray":
        from .ray_executor import RayExecutor  # ray is an optional dependency

        return RayExecutor(opts.ray_address, workers=opts.workers, gpus_per_worker=opts.gpus_per_worker,
                           progress=opts.progress)
    raise MergeError(f"executor {brief(opts.executor)} is not one of {', '.join(EXECUTORS)}")


def _fingerprint(cfg, plan, opts: MergeOptions) -> str:
    data = {"config": cfg.model_dump(mode="json"), "seed": opts.seed, "out_dtype": opts.out_dtype,
            "shard_size": opts.shard_size, "truncate_vocab": opts.truncate_vocab, "version": __version__,
            "inputs": [s.fingerprint() for s in [plan.base] + plan.models]}
    if opts.tensor_order != "natural":
        data["tensor_order"] = opts.tensor_order
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def run_merge(config_path: str, opts: MergeOptions) -> dict:
    """Run one merge; returns the report (also written to ``merge_report.json``).

    Holds an exclusive lock on ``opts.out`` for the whole run (a concurrent merge into the same
    folder fails at once). A fresh run that fails leaves nothing behind; a resumed run that fails
    keeps its temporary folder for the next ``--resume``."""
    t0 = time.perf_counter()
    cfg, yaml_text = load_config(config_path)
    if opts.out_dtype is not None and opts.out_dtype not in DTYPE_NAMES:
        raise MergeError(f"--dtype {brief(opts.out_dtype)} is not supported; valid: {', '.join(DTYPE_NAMES)}")
    device = resolve_device(opts.device)
    backend = resolve_backend(opts.backend, device)
    executor = make_executor(opts)
    with open_inputs(cfg, allow_pickle=opts.allow_pickle, allow_crimes=opts.allow_crimes) as inputs:
        plan = build_plan(cfg, inputs.base, inputs.models, out_dtype=opts.out_dtype, shard_size=opts.shard_size,
                          truncate_vocab=opts.truncate_vocab, order=opts.tensor_order)
        plan.check_backend(backend)
        check_side_files(side_sources(inputs.base.path, inputs.tokenizer))
        fingerprint = _fingerprint(cfg, plan, opts)  # reads every input file: before anything is created
        with output_lock(opts.out):
            tmp, resuming = check_output(opts.out, inputs.folders(), force=opts.force, resume=opts.resume,
                                         config=os.path.abspath(config_path))
            job = MergeJob(plan, tmp, [shard_name(i, plan.n_shards) for i in range(plan.n_shards)], str(device),
                           backend, opts.seed, report=opts.tensor_report)
            return _merge(job, executor, inputs, yaml_text, fingerprint, resuming, opts, t0)


def _merge(job: MergeJob, executor: Executor, inputs: Inputs, yaml_text: str, fingerprint: str, resuming: bool,
           opts: MergeOptions, t0: float) -> dict:
    """The execute and commit stages, into ``job.tmp``; a failure discards a fresh run's folder."""
    timings = {"plan_s": time.perf_counter() - t0}
    journal = Journal(job.tmp, fingerprint)
    dropped = journal.load_verified() if resuming else []  # a refusal here leaves the partial intact
    try:
        drop_unfinished(job.tmp)
        done = execute(job, executor, journal, resuming=resuming, cache_dir=job.tmp)
        timings.update(done.timings)
        return _commit(job, inputs, yaml_text, done, timings, resuming, dropped, opts, t0)
    except BaseException as exc:
        if not (resuming or isinstance(exc, KeyboardInterrupt)):
            discard(job.tmp)  # a fresh run leaves nothing; an interrupted or resumed one stays resumable
        raise


def _commit(job: MergeJob, inputs: Inputs, yaml_text: str, done: Executed, timings: dict, resuming: bool,
            dropped: list, opts: MergeOptions, t0: float) -> dict:
    """The engine's layout: index, side files (config.json with the output dtype, tokenizer), the
    config as given, the report; then the temporary folder renamed into place."""
    plan, tmp = job.plan, job.tmp
    write_index(tmp, plan, job.shard_names)
    out_name = str(plan.tasks[0].out_dtype).replace("torch.", "") if plan.tasks else None
    copied = copy_side_files(tmp, inputs.base.path, inputs.tokenizer, out_name)
    write_text(os.path.join(tmp, "mergekit_config.yml"), yaml_text)
    timings["total_s"] = time.perf_counter() - t0
    report = build_report(plan.cfg, plan, opts, job.backend, job.device, timings, done.tensors, done.dppa, copied,
                          resuming, dropped)
    write_json_atomic(os.path.join(tmp, REPORT), report)
    finalize(tmp, opts.out, drop=[JOURNAL, ALLOC_CACHE])
    return report
