"""Helpers shared by the engine and CLI tests (no tests here): tiny families, configs, loading."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import torch
import yaml
from safetensors import safe_open
from typer.testing import CliRunner

from dppa_kernels.cli import app
from dppa_kernels.engine.synth import llama_family

TINY = dict(hidden=32, layers=2, inter=64, vocab=100)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def family(root, n_ft=3, **kw):
    shape = dict(TINY)
    shape.update(kw)
    return llama_family(str(root), n_ft=n_ft, shard_bytes=shape.pop("shard_bytes", 30_000), **shape)


def write_config(path, method, base, fts, params=None, model_params=None, **top):
    cfg = {"merge_method": method, "base_model": base,
           "models": [{"model": f, "parameters": dict(model_params[i] if model_params else {"weight": 1.0})}
                      for i, f in enumerate(fts)]}
    if params:
        cfg["parameters"] = params
    cfg.update(top)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return str(path)


def cli(*args):
    """Run the CLI in-process; returns the click Result (exit_code, output)."""
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def cli_subprocess(*args, env=None, **kw):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "dppa_kernels", *map(str, args)], capture_output=True, text=True,
                          env=e, cwd=ROOT, **kw)


def load_dir(path) -> dict:
    """All tensors of a HF folder (any safetensors layout)."""
    out = {}
    for fn in sorted(os.listdir(path)):
        if fn.endswith(".safetensors"):
            with safe_open(os.path.join(path, fn), "pt") as f:
                for k in f.keys():
                    out[k] = f.get_tensor(k)
    return out


def dir_digest(path, suffixes=(".safetensors", ".index.json")) -> dict:
    out = {}
    for fn in sorted(os.listdir(path)):
        if fn.endswith(suffixes):
            with open(os.path.join(path, fn), "rb") as f:
                out[fn] = hashlib.sha256(f.read()).hexdigest()
    return out


def tree_state(path) -> dict:
    """(size, mtime, sha256) of every file under path: proves inputs were not touched."""
    out = {}
    for d, _, files in os.walk(path):
        for fn in files:
            p = os.path.join(d, fn)
            st = os.stat(p)
            with open(p, "rb") as f:
                out[p] = (st.st_size, st.st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
    return out


def deltas_of(base_sd, ft_sds, name, dtype=None):
    b = base_sd[name].to(dtype) if dtype else base_sd[name]
    return b, [(ft[name].to(b.dtype).float() - b.float()).to(b.dtype) for ft in ft_sds]


def leftovers(out) -> list:
    """Temp folders next to ``out`` (none may survive a failed merge)."""
    parent, name = os.path.dirname(str(out)), os.path.basename(str(out))
    return [f for f in os.listdir(parent) if f.startswith(f".{name}.")]


assert torch  # re-exported for tests
