"""The fast path of ``dppa-mergekit-yaml``: mergekit's YAML and options, our streaming engine.

When the config and the options are entirely within what the engine reproduces exactly,
``dppa-mergekit-yaml`` runs the engine's stages directly (the models opened and the merge planned
once, while deciding eligibility; then the execute stage; then mergekit 0.1.5's output layout,
written as such), without importing mergekit, transformers or PEFT; otherwise it runs
mergekit's own pipeline with our backend installed (the fallback). The merged tensors are
bit-identical to the fallback's for the same ``--random-seed`` (tests/test_integration_mergekit_fast.py).

Eligible (anything else falls back; ``-v`` prints the one-line reason):

* ``merge_method``: one of the engine's methods (``dppa_kernels.methods.engine_methods()``:
  mergekit's GTA methods, dppa, dppa_ties, consensus, ...); top-level keys ``merge_method``, ``base_model``,
  ``models``, ``parameters``, ``dtype``, ``out_dtype`` only (no ``slices``, ``modules``,
  ``tokenizer``, ``tokenizer_source``, ``chat_template``); only the method's mergekit parameters
  (its registry entry's, ``Param.mergekit``; those read by the DPPA statistics pass as plain
  values); a value for every tensor of each parameter mergekit requires (``Param.required``: the
  ``weight`` of a GTA method).
* Models: local folders of safetensors weights (no ``+lora``, no ``@revision``, no hub ids), all
  with one architecture that mergekit defines in JSON, whose planned tensors are exactly the
  base model's tensors under their own names; floating point, one dtype per tensor across the
  models (or a ``dtype`` in the config), bf16 / fp16 / fp32; ``out_dtype`` equal to the working
  dtype or a working dtype of fp32 (mergekit rounds to the working dtype first).
* The base model listed under ``models`` is dropped (mergekit merges it as the base).
* Options: ``--random-seed`` (the DARE/DELLA seed, default 0), ``--out-shard-size``,
  ``--copy-tokenizer``, ``--write-model-card``, ``--quiet``, ``-v``, ``--cuda`` / ``--device``
  (cpu, cuda[:N], auto), ``-j`` (torch threads); ``--allow-crimes``, ``--lazy-unpickle``,
  ``--clone-tensors``, ``--async-write``, ``--write-threads`` cannot change the output here and
  are accepted. Any of ``--no-safe-serialization``, ``--read-to-gpu``, ``--low-cpu-memory``,
  ``--multi-gpu``, ``--gpu-rich``, ``--unsafe-truncate-embeddings``, ``--trust-remote-code``,
  ``--lora-merge-cache``, ``--lora-merge-dtype``, ``--transformers-cache`` falls back.
* mergekit 0.1.5 installed (its architecture definitions are read as data files).

Output (mergekit 0.1.5's layout): ``model.safetensors`` (one shard) or
``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json``, with mergekit's tensor
order and shard split (greedy, ``--out-shard-size`` bytes); ``config.json``; with
``--write-model-card`` ``README.md`` and ``mergekit_config.yml``; with ``--copy-tokenizer`` the
tokenizer files mergekit copies. Differences, by design: config.json is the base model's
config.json with only the dtype field updated (mergekit re-serialises it through transformers,
which may add default fields, rename ``torch_dtype`` to ``dtype`` and restamp
``transformers_version``); the README.md text is our own; the index's metadata has no
``mergekit_version``; safetensors headers are written by our engine (same tensors, names, dtypes,
shapes, ``format: pt`` metadata); no ``merge_report.json`` is written. The output is
staged next to the output folder and moved in only when complete (into an existing folder file
by file, replacing same-named files like mergekit-yaml).

Not reproduced (:class:`Unsupported`) and refused (:class:`~dppa_kernels.engine.MergeError`) are
different outcomes: the first hands the run to mergekit's pipeline, the second ends it with an
error whichever path would run (an output overlapping an input, a corrupt, truncated or pickle
input, a NaN/Inf delta, different architectures without ``--allow-crimes``, a failed write).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from ..engine.errors import MergeError, brief, clip, write_failed
from . import mergekit_layout as L

TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype")
DTYPE_NAMES = ("bfloat16", "float16", "float32")
_REFUSED_FLAGS = ("unsafe_truncate_embeddings", "low_cpu_memory", "trust_remote_code", "read_to_gpu",
                  "multi_gpu", "gpu_rich")
_REFUSED_VALUES = ("transformers_cache", "lora_merge_cache", "lora_merge_dtype")
_EXACT_DTYPES = {"bfloat16", "float16", "float32"}  # torch dtype names the fast path merges in


class Unsupported(Exception):
    """The fast path does not reproduce this run (the message says why): mergekit's own pipeline
    runs it instead. Anything else that stops the fast path is a refusal, never a fallback."""


@dataclass
class FastPlan:
    """Everything the fast path needs, settled before anything is written."""

    config: dict  # the engine's config: the base model's own entries dropped from models
    source: str  # the YAML text as the user wrote it
    out: str
    device: str
    seed: int
    shard_size: int
    quiet: bool
    verbosity: int
    num_threads: Optional[int]
    write_card: bool
    tokenizer: list = field(default_factory=list)  # file names copied from the base model
    config_dtype: Optional[str] = None  # the dtype mergekit writes into config.json
    allow_crimes: bool = False
    inputs: Any = None  # engine.inputs.Inputs: the models, opened once (closed by run_fast)
    merge_plan: Any = None  # engine.plan.MergePlan: the plan run_fast executes


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def _option_reason(opts: dict) -> Optional[str]:
    for key in _REFUSED_FLAGS:
        if opts.get(key):
            return f"option {_flag(key)}"
    for key in _REFUSED_VALUES:
        if opts.get(key) is not None:
            return f"option {_flag(key)}"
    if not opts.get("safe_serialization", True):
        return "option --no-safe-serialization"
    return None


def _device(opts: dict) -> tuple:
    """(the engine's device, "") or (None, reason)."""
    dev = opts.get("device") or ("cuda" if opts.get("cuda") else "cpu")
    import torch

    if dev == "auto":
        if torch.cuda.is_available():
            dev = "cuda"
        elif hasattr(torch, "xpu") and torch.xpu.is_available():
            return None, "--device auto picks xpu"
        else:
            dev = "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", dev):
        return None, f"--device {brief(dev)}"
    if dev.startswith("cuda") and not torch.cuda.is_available():
        return None, f"--device {dev} but no CUDA GPU is visible"
    return dev, ""


def _plain(v: Any) -> bool:
    scalar = (bool, int, float, str)
    return isinstance(v, scalar) or (isinstance(v, list) and all(isinstance(x, scalar) for x in v))


def _covers_all(setting: Any) -> bool:
    """Whether a mergekit setting gives every tensor a value (no filter list without a catch-all)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting and all(isinstance(c, dict) for c in setting):
        return any(c.get("filter") in (None, "*") and _covers_all(c.get("value")) for c in setting)
    return setting is not None and setting != []


def _param_reason(method: str, glob: dict, models: list) -> Optional[str]:
    """Why the parameters are not the method's mergekit parameters (its registry entry's), or None."""
    from ..methods import get_method

    entry = get_method(method)
    per_model = entry.names(scope="model", mergekit=True)
    global_ok = per_model + entry.names(scope="global", mergekit=True)
    plain = ()
    if entry.dppa:  # read by the DPPA statistics pre-pass (and the settings it hands on) from the config as is
        from .mergekit_dppa import dppa_keys

        keys = dppa_keys(method)
        plain = keys["per_model"] + keys["settings"]
    for where, params, valid in [("parameters", glob, global_ok)] + \
            [(f"models[{i}].parameters", p, per_model) for i, p in enumerate(models)]:
        if not isinstance(params, dict):
            return f"{where} is not a mapping"
        for k, v in params.items():
            if k not in valid:
                return f"parameter {brief(k)} in {where} for {method}"
            if k in plain and not _plain(v):
                return f"parameter {brief(k)} in {where} is not a plain value"
    for key in (p.name for p in entry.params if p.required):
        for i, p in enumerate(models):
            if not _covers_all(p.get(key, glob.get(key))):
                return f"models[{i}] has no {key} for every tensor (mergekit requires one)"
    return None


def _config_reason(data: Any) -> Optional[str]:
    if not isinstance(data, dict):
        return "the config is not a mapping"
    extra = [k for k in data if k not in TOP_KEYS]
    if extra:
        return f"config key {brief(extra[0])}"
    from ..methods import engine_methods

    if data.get("merge_method") not in engine_methods():
        return f"merge_method {brief(data.get('merge_method'))}"
    if not isinstance(data.get("base_model"), str):
        return "no base_model path"
    models = data.get("models")
    if not isinstance(models, list) or not models:
        return "no models: list"
    for i, m in enumerate(models):
        if not isinstance(m, dict) or set(m) - {"model", "parameters"} or not isinstance(m.get("model"), str):
            return f"models[{i}] is not a plain {{model, parameters}} entry"
    for key in ("dtype", "out_dtype"):
        if data.get(key) is not None and data[key] not in DTYPE_NAMES:
            return f"{key} {brief(data[key])}"
    for ref in [data["base_model"]] + [m["model"] for m in models]:
        if "+" in ref or "@" in ref:
            return f"model reference {brief(ref)} (LoRA or revision syntax)"
        if not os.path.isdir(ref):
            return f"model {brief(ref)} is not a local folder"
    return None


def _engine_config(data: dict) -> Union[dict, str]:
    """The config for our engine: the base model's own entries dropped (mergekit merges the base
    as the base, never as a model), or a reason."""
    base = data["base_model"]
    models = [m for m in data["models"] if m["model"] != base]
    if not models:
        return "no model besides the base model"
    refs = [m["model"] for m in models]
    if len(set(refs)) != len(refs):
        return "a model is listed twice"
    out = {k: v for k, v in data.items() if k != "models" and v is not None}
    out["models"] = [{"model": m["model"], **({"parameters": m["parameters"]} if m.get("parameters") else {})}
                     for m in models]
    reason = _param_reason(data["merge_method"], data.get("parameters") or {},
                           [m.get("parameters") or {} for m in models])
    return reason or out


def _open_and_plan(cfg: dict, shard_size: int, opts: dict):
    """Open every input and plan the merge once (nothing is written): (inputs, plan), the plan
    the run then executes. Raises Unsupported when the fast path cannot reproduce the run, and
    MergeError for inputs refused on every path."""
    from ..engine import parse_config
    from ..engine.inputs import open_inputs
    from ..engine.plan import build_plan
    from ..engine.source import find_weights, pickle_error

    refs = [cfg["base_model"]] + [m["model"] for m in cfg["models"]]
    for ref in refs:  # before any file is opened: a pickle is never loaded here
        files, is_pickle, _ = find_weights(os.path.abspath(ref), ref)
        if is_pickle:
            refusal = pickle_error(ref, files, bool(opts.get("allow_pickle")))
            if refusal:
                raise MergeError(refusal)
            raise Unsupported(f"model {brief(ref)} has pickle weights")
    try:
        parsed = parse_config(cfg)
    except MergeError as exc:  # mergekit has its own rules here (it clamps, skips, truncates)
        raise Unsupported(f"the engine cannot plan it: {clip(exc)}") from None
    inputs = open_inputs(parsed, allow_crimes=bool(opts.get("allow_crimes")))  # corrupt, truncated: refused
    try:
        try:
            plan = build_plan(parsed, inputs.base, inputs.models, out_dtype=None, shard_size=shard_size,
                              truncate_vocab=False, order="name")
        except MergeError as exc:
            raise Unsupported(f"the engine cannot plan it: {clip(exc)}") from None
        reason = _layout_reason(cfg, inputs, plan)
        if reason:
            raise Unsupported(reason)
    except BaseException:
        inputs.close()
        raise
    return inputs, plan


def _layout_reason(cfg: dict, inputs, plan) -> Optional[str]:
    """Why mergekit would write other tensors, names or dtypes than the plan (None: it would not)."""
    import torch

    sources = [inputs.base] + inputs.models
    configs = [s.config for s in sources]
    if any(c is None for c in configs):
        return "a model has no config.json"
    names, why = L.expected_tensors(configs, [set(s.tensors) for s in sources], L.mergekit_dir())
    if names is None:
        return why
    if set(names) != set(inputs.base.tensors):
        extra = sorted(set(inputs.base.tensors) - set(names))
        return f"mergekit would not write the base model's tensor {brief(extra[0])}" if extra else \
            "mergekit would write tensors the base model lacks"
    fixed = cfg.get("dtype") is not None
    for t in plan.tasks:
        dts = {s.tensors[t.name].dtype for s in sources}
        if not t.floating:
            return f"tensor {brief(t.name)} is not floating point"
        if not fixed and len(dts) > 1:
            return f"tensor {brief(t.name)} has several dtypes across the models"
        if str(t.work_dtype).replace("torch.", "") not in _EXACT_DTYPES:
            return f"tensor {brief(t.name)} would merge in {t.work_dtype}"
        if t.out_dtype != t.work_dtype and t.work_dtype != torch.float32:
            return f"out_dtype {t.out_dtype} differs from the working dtype {t.work_dtype}"
    return None


def _check_out(out: str, cfg: dict) -> None:
    """Refusals about the output folder (they hold for mergekit's pipeline too)."""
    from ..engine.outdir import check_overlap

    if os.path.exists(out) and not os.path.isdir(out):
        raise MergeError(f"output {clip(out)} exists and is not a folder")
    check_overlap(out, [(ref, os.path.abspath(ref)) for ref in [cfg["base_model"]] + [m["model"] for m in cfg["models"]]])


def plan_fast(opts: dict, config_file: str, out_path: str) -> FastPlan:
    """A :class:`FastPlan`; raises :class:`Unsupported` (one line: why this run must take mergekit's
    path) or MergeError (refused on every path)."""
    from ..engine.config import read_yaml
    from ..engine.outdir import resolve_out
    from ..engine.source import model_file

    reason = _option_reason(opts)
    if reason:
        raise Unsupported(reason)
    if L.mergekit_dir() is None:
        raise Unsupported("mergekit is not installed")
    if L.mergekit_version() != L.MERGEKIT_VERSION:
        raise Unsupported(f"mergekit {L.mergekit_version()} (the fast path reproduces {L.MERGEKIT_VERSION})")
    data, source = read_yaml(config_file)
    reason = _config_reason(data)
    if reason:
        raise Unsupported(reason)
    cfg = _engine_config(data)
    if isinstance(cfg, str):
        raise Unsupported(cfg)
    dev, why = _device(opts)
    if dev is None:
        raise Unsupported(why)
    size = int(opts.get("out_shard_size") or L.DEFAULT_SHARD_SIZE)
    size = size if size > 0 else 1 << 62  # mergekit: no limit
    out = resolve_out(out_path)
    _check_out(out, cfg)
    inputs, merge_plan = _open_and_plan(cfg, size, opts)
    try:
        base = os.path.abspath(cfg["base_model"])
        tok = []
        if opts.get("copy_tokenizer", True):
            tok = L.tokenizer_files(base)
            if tok is None:
                raise Unsupported("mergekit would rebuild the tokenizer with transformers")
        for fn in ["config.json"] + tok:  # refuse links out of the model folder before merging
            model_file(base, fn)
    except BaseException:
        inputs.close()
        raise
    seed = opts.get("random_seed")
    return FastPlan(config=cfg, source=source, out=out, device=dev, seed=0 if seed is None else int(seed),
                    shard_size=size, quiet=bool(opts.get("quiet")), verbosity=int(opts.get("verbosity") or 0),
                    num_threads=opts.get("num_threads"), write_card=bool(opts.get("write_model_card", True)),
                    tokenizer=tok, config_dtype=cfg.get("out_dtype") or cfg.get("dtype"),
                    allow_crimes=bool(opts.get("allow_crimes")), inputs=inputs, merge_plan=merge_plan)


def _setup(plan: FastPlan) -> None:
    level = logging.DEBUG if plan.verbosity > 1 else logging.INFO if plan.verbosity == 1 else logging.WARNING
    logging.basicConfig(level=level)
    if plan.num_threads is not None:
        import torch

        torch.set_num_threads(plan.num_threads)
        try:
            torch.set_num_interop_threads(plan.num_threads)
        except RuntimeError:  # already set, or parallel work already started
            pass


def run_fast(plan: FastPlan) -> dict:
    """Run the planned merge through the engine's execute stage into a staging folder written in
    mergekit's layout, then move it into place, holding the output folder's lock throughout.
    Raises MergeError, with nothing moved into the output, when the merge is refused or a write
    fails."""
    from ..engine.executor import MergeJob
    from ..engine.local_executor import LocalExecutor
    from ..engine.outdir import output_lock
    from ..engine.run import resolve_backend, resolve_device
    from ..engine.shards import Journal
    from ..engine.stages import execute

    _setup(plan)
    t0 = time.perf_counter()
    parent, name = os.path.split(plan.out)
    staging = os.path.join(parent, f".{name}.dppa-fast")
    mplan = plan.merge_plan
    try:
        device = resolve_device(plan.device)
        backend = resolve_backend("auto", device)
        with output_lock(plan.out):
            shutil.rmtree(staging, ignore_errors=True)
            try:
                os.makedirs(staging)
                names = L.shard_names(mplan.n_shards)
                job = MergeJob(mplan, staging, names, str(device), backend, plan.seed, report=False)
                execute(job, LocalExecutor(progress=not plan.quiet), Journal(None))  # no resume: in memory
                L.write_layout(staging, plan, mplan, names)
                L.move_into(staging, plan.out)
            except OSError as exc:  # disk full or permissions while laying out or moving the files
                raise write_failed(exc.filename or staging, exc) from None
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    finally:
        plan.inputs.close()
    summary = {"method": mplan.cfg.merge_method, "n_tensors": len(mplan.tasks), "n_shards": mplan.n_shards,
               "device": str(device), "backend": backend, "seconds": time.perf_counter() - t0}
    if plan.verbosity:
        print(f"dppa-mergekit-yaml: fast path: {summary['method']}, {summary['n_tensors']} tensors on "
              f"{summary['device']} ({summary['backend']} backend), {summary['seconds']:.1f} s -> {plan.out}",
              file=sys.stderr)
    return summary
