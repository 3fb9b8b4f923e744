"""The fast path of ``dppa-mergekit-yaml``: mergekit's YAML and options, our streaming engine.

When the config and the options are entirely within what the engine reproduces exactly,
``dppa-mergekit-yaml`` runs :func:`dppa_kernels.engine.run_merge` directly, without importing
mergekit, transformers or PEFT, and writes mergekit 0.1.5's output layout; otherwise it runs
mergekit's own pipeline with our backend installed (the fallback). The merged tensors are
bit-identical to the fallback's for the same ``--random-seed`` (tests/test_integration_mergekit_fast.py).

Eligible (anything else falls back; ``-v`` prints the one-line reason):

* ``merge_method``: task_arithmetic, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties,
  della, della_linear, dppa, dppa_ties; top-level keys ``merge_method``, ``base_model``,
  ``models``, ``parameters``, ``dtype``, ``out_dtype`` only (no ``slices``, ``modules``,
  ``tokenizer``, ``tokenizer_source``, ``chat_template``); each method's own mergekit parameters
  (the dppa keys for dppa / dppa_ties); a ``weight`` for every model of a GTA method (mergekit
  requires it).
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
shapes, ``format: pt`` metadata); the engine's ``merge_report.json`` is not kept (nor are its
per-tensor realised densities computed: DELLA's would re-run the reference). The output is
staged next to the output folder and moved in only when complete (into an existing folder file
by file, replacing same-named files like mergekit-yaml); an engine error before that falls back.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from . import mergekit_layout as L

FAST_METHODS = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
                "della", "della_linear", "dppa", "dppa_ties")
TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype")
DTYPE_NAMES = ("bfloat16", "float16", "float32")
_GTA_MODEL = ("weight", "density")
_GTA_EXTRA = {"breadcrumbs": ("gamma",), "breadcrumbs_ties": ("gamma",), "della": ("epsilon",),
              "della_linear": ("epsilon",)}
_GTA_GLOBAL = ("normalize", "rescale", "lambda", "int8_mask")
# the keys dppa / dppa_ties read inside mergekit (integrations.mergekit_dppa), all plain values
_DPPA_MODEL = ("densities", "density", "sparsity", "alphas")
_DPPA_GLOBAL = ("offset_lambda", "outlier_mult_layer", "outlier_mult_unit", "density_clamp", "compat",
                "tie_mode", "count_rule", "band_combine", "stats_dtype", "nonunit_mode", "unit_pattern",
                "layer_pattern")
_REFUSED_FLAGS = ("unsafe_truncate_embeddings", "low_cpu_memory", "trust_remote_code", "read_to_gpu",
                  "multi_gpu", "gpu_rich")
_REFUSED_VALUES = ("transformers_cache", "lora_merge_cache", "lora_merge_dtype")
_EXACT_DTYPES = {"bfloat16", "float16", "float32"}  # torch dtype names the fast path merges in


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
        return None, f"--device {dev}"
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
    dppa = method in ("dppa", "dppa_ties")
    per_model = ("weight",) + (_DPPA_MODEL if dppa else _GTA_MODEL[1:] + _GTA_EXTRA.get(method, ()))
    global_ok = per_model + (("normalize", "lambda") + _DPPA_GLOBAL if dppa else _GTA_GLOBAL)
    for where, params, valid in [("parameters", glob, global_ok)] + \
            [(f"models[{i}].parameters", p, per_model) for i, p in enumerate(models)]:
        if not isinstance(params, dict):
            return f"{where} is not a mapping"
        for k, v in params.items():
            if k not in valid:
                return f"parameter {k!r} in {where} for {method}"
            if dppa and k not in ("weight", "normalize", "lambda") and not _plain(v):
                return f"parameter {k!r} in {where} is not a plain value"
    if not dppa:
        for i, p in enumerate(models):
            if not _covers_all(p.get("weight", glob.get("weight"))):
                return f"models[{i}] has no weight for every tensor (mergekit requires one)"
    return None


def _config_reason(data: Any) -> Optional[str]:
    if not isinstance(data, dict):
        return "the config is not a mapping"
    extra = [k for k in data if k not in TOP_KEYS]
    if extra:
        return f"config key {extra[0]!r}"
    if data.get("merge_method") not in FAST_METHODS:
        return f"merge_method {data.get('merge_method')!r}"
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
            return f"{key} {data[key]!r}"
    for ref in [data["base_model"]] + [m["model"] for m in models]:
        if "+" in ref or "@" in ref:
            return f"model reference {ref!r} (LoRA or revision syntax)"
        if not os.path.isdir(ref):
            return f"model {ref!r} is not a local folder"
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


def _inputs_reason(cfg: dict, shard_size: int) -> Optional[str]:
    """Open every input and plan the merge with the engine (nothing is written)."""
    from ..engine import MergeError, parse_config
    from ..engine.plan import build_plan
    from ..engine.source import ModelSource

    import torch

    sources = []
    try:
        ecfg = parse_config(cfg)
        sources = [ModelSource(cfg["base_model"])] + [ModelSource(m["model"]) for m in cfg["models"]]
        plan = build_plan(ecfg, sources[0], sources[1:], out_dtype=None, shard_size=shard_size,
                          truncate_vocab=False, order="name")
    except MergeError as exc:
        return f"the engine cannot plan it: {exc}"
    finally:
        for s in sources:
            s.close()
    configs = [s.config for s in sources]
    if any(c is None for c in configs):
        return "a model has no config.json"
    root = L.mergekit_dir()
    names, why = L.expected_tensors(configs, [set(s.tensors) for s in sources], root)
    if names is None:
        return why
    if set(names) != set(sources[0].tensors):
        extra = sorted(set(sources[0].tensors) - set(names))
        return f"mergekit would not write the base model's tensor {extra[0]!r}" if extra else \
            "mergekit would write tensors the base model lacks"
    fixed = cfg.get("dtype") is not None
    for t in plan.tasks:
        dts = {s.tensors[t.name].dtype for s in sources}
        if not t.floating:
            return f"tensor {t.name!r} is not floating point"
        if not fixed and len(dts) > 1:
            return f"tensor {t.name!r} has several dtypes across the models"
        if str(t.work_dtype).replace("torch.", "") not in _EXACT_DTYPES:
            return f"tensor {t.name!r} would merge in {t.work_dtype}"
        if t.out_dtype != t.work_dtype and t.work_dtype != torch.float32:
            return f"out_dtype {t.out_dtype} differs from the working dtype {t.work_dtype}"
    return None


def _out_reason(out: str, cfg: dict) -> Optional[str]:
    if os.path.exists(out) and not os.path.isdir(out):
        return f"output {out} exists and is not a folder"
    real = os.path.realpath(out)
    for ref in [cfg["base_model"]] + [m["model"] for m in cfg["models"]]:
        p = os.path.realpath(ref)
        if real == p or real.startswith(p + os.sep) or p.startswith(real + os.sep):
            return f"output {out} overlaps input model {ref!r}"
    return None


def plan_fast(opts: dict, config_file: str, out_path: str) -> Union[FastPlan, str]:
    """A :class:`FastPlan`, or the reason (one line) why this run must take mergekit's path."""
    import yaml

    reason = _option_reason(opts)
    if reason:
        return reason
    if L.mergekit_dir() is None:
        return "mergekit is not installed"
    if L.mergekit_version() != L.MERGEKIT_VERSION:
        return f"mergekit {L.mergekit_version()} (the fast path reproduces {L.MERGEKIT_VERSION})"
    try:
        with open(config_file, encoding="utf-8") as f:
            source = f.read()
        data = yaml.safe_load(source)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return f"cannot read the config ({type(exc).__name__})"
    reason = _config_reason(data)
    if reason:
        return reason
    cfg = _engine_config(data)
    if isinstance(cfg, str):
        return cfg
    dev, why = _device(opts)
    if dev is None:
        return why
    size = int(opts.get("out_shard_size") or L.DEFAULT_SHARD_SIZE)
    size = size if size > 0 else 1 << 62  # mergekit: no limit
    out = os.path.abspath(out_path)
    reason = _out_reason(out, cfg) or _inputs_reason(cfg, size)
    if reason:
        return reason
    tok = []
    if opts.get("copy_tokenizer", True):
        tok = L.tokenizer_files(os.path.abspath(cfg["base_model"]))
        if tok is None:
            return "mergekit would rebuild the tokenizer with transformers"
    seed = opts.get("random_seed")
    return FastPlan(config=cfg, source=source, out=out, device=dev, seed=0 if seed is None else int(seed),
                    shard_size=size, quiet=bool(opts.get("quiet")), verbosity=int(opts.get("verbosity") or 0),
                    num_threads=opts.get("num_threads"), write_card=bool(opts.get("write_model_card", True)),
                    tokenizer=tok, config_dtype=cfg.get("out_dtype") or cfg.get("dtype"))


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


def _finish(staging: str, plan: FastPlan, report: dict) -> None:
    """Turn the engine's folder into mergekit's layout (renames and small files only)."""
    import json

    from ..engine.shards import INDEX, shard_name

    n = int(report["n_shards"])
    shards = {shard_name(i, n) for i in range(n)}
    if n == 1:
        os.replace(os.path.join(staging, shard_name(0, 1)), os.path.join(staging, "model.safetensors"))
        keep = {"model.safetensors"}
    else:
        with open(os.path.join(staging, INDEX), encoding="utf-8") as f:
            index = json.load(f)
        order = sorted(index["weight_map"])  # mergekit's output order: plain name order
        L.write_index(os.path.join(staging, INDEX), {k: index["weight_map"][k] for k in order},
                      int(index["metadata"]["total_size"]))
        keep = shards | {INDEX}
    for fn in os.listdir(staging):  # the engine's side files: config, tokenizer, report, yaml
        if fn not in keep:
            os.remove(os.path.join(staging, fn))
    base = os.path.abspath(plan.config["base_model"])
    with open(os.path.join(staging, "config.json"), "w", encoding="utf-8") as f:
        f.write(L.output_config(os.path.join(base, "config.json"), plan.config_dtype))
    if plan.write_card:
        from .. import __version__

        with open(os.path.join(staging, "README.md"), "w", encoding="utf-8") as f:
            f.write(L.model_card(os.path.basename(plan.out), plan.config["merge_method"], plan.config["base_model"],
                                 [m["model"] for m in plan.config["models"]], plan.source, __version__))
        with open(os.path.join(staging, "mergekit_config.yml"), "w", encoding="utf-8") as f:
            f.write(plan.source)
    for fn in plan.tokenizer:
        shutil.copyfile(os.path.join(base, fn), os.path.join(staging, fn))


def run_fast(plan: FastPlan) -> dict:
    """Merge with the engine into a staging folder, lay it out like mergekit, move it into place.
    Raises the engine's MergeError before anything is moved to the output."""
    import yaml

    from ..engine import MergeOptions, run_merge

    _setup(plan)
    t0 = time.perf_counter()
    parent, name = os.path.split(plan.out)
    staging = os.path.join(parent, f".{name}.dppa-fast")
    shutil.rmtree(staging, ignore_errors=True)
    fd, cfg_path = tempfile.mkstemp(prefix="dppa-mergekit-", suffix=".yml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yaml.safe_dump(plan.config, f, sort_keys=False)
        opts = MergeOptions(out=staging, device=plan.device, shard_size=plan.shard_size, force=True, seed=plan.seed,
                            progress=not plan.quiet, tensor_order="name", tensor_report=False)
        report = run_merge(cfg_path, opts)
        _finish(staging, plan, report)
        L.move_into(staging, plan.out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        os.remove(cfg_path)
    if plan.verbosity:
        print(f"dppa-mergekit-yaml: fast path: {report['method']}, {report['n_tensors']} tensors on "
              f"{report['device']} ({report['backend']} backend), {time.perf_counter() - t0:.1f} s -> {plan.out}",
              file=sys.stderr)
    return report
