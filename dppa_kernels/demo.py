"""``dppa demo``: a small synthetic Llama family merged with DPPA, TIES and DARE-TIES, all local.

The configs are the package's example YAMLs (``dppa_kernels/configs``) with the model paths
pointed at the generated folders. Prints method, realised density of the kept deltas and time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from importlib import resources
from typing import Callable, Optional

import yaml

DEMO_SHAPE = dict(hidden=256, layers=4, inter=688, vocab=1024)
METHODS = ("dppa", "ties", "dare_ties")


def example_config(method: str) -> dict:
    """The packaged example config of ``method`` (paths relative: ./base, ./ft0, ...)."""
    text = resources.files("dppa_kernels").joinpath("configs", f"{method}.yaml").read_text()
    return yaml.safe_load(text)


def _pointed(cfg: dict, root: str) -> dict:
    cfg = dict(cfg)
    cfg["base_model"] = os.path.join(root, os.path.basename(cfg["base_model"]))
    cfg["models"] = [dict(m, model=os.path.join(root, os.path.basename(m["model"]))) for m in cfg["models"]]
    return cfg


def run_demo(workdir: Optional[str] = None, backend: str = "auto", keep: bool = False, progress: bool = False,
             echo: Callable[[str], None] = print) -> list[dict]:
    """Generate the family, run the three merges, print and return the table rows."""
    from .engine import MergeOptions, run_merge
    from .engine.synth import llama_family

    root = workdir or tempfile.mkdtemp(prefix="dppa-demo-")
    try:
        t = time.perf_counter()
        llama_family(root, **DEMO_SHAPE, n_ft=3, shard_bytes=2_000_000, seed=0)
        n = sum(1 for _ in os.scandir(os.path.join(root, "base")))
        echo(f"synthetic Llama family (hidden {DEMO_SHAPE['hidden']}, {DEMO_SHAPE['layers']} layers, "
             f"vocab {DEMO_SHAPE['vocab']}; base + 3 fine-tuned, {n} files each) in {root} "
             f"[{time.perf_counter() - t:.1f} s]")
        rows = []
        for method in METHODS:
            path = os.path.join(root, f"{method}.yaml")
            with open(path, "w") as f:
                yaml.safe_dump(_pointed(example_config(method), root), f, sort_keys=False)
            t = time.perf_counter()
            rep = run_merge(path, MergeOptions(out=os.path.join(root, f"merged-{method}"), backend=backend,
                                               progress=progress, shard_size=4_000_000, force=True))
            dt = time.perf_counter() - t
            dens = [v for v in rep["realised_density"].values() if v is not None]
            rows.append({"method": method, "density": sum(dens) / len(dens), "scope": rep["realised_density_scope"],
                         "seconds": dt, "backend": rep["backend"], "exact": rep.get("realised_density_exact", True)})
        echo(f"{'method':<10} {'realised density':>16} {'time':>8}  backend  (density: mean over models, "
             f"kept fraction of each delta)")
        for r in rows:
            echo(f"{r['method']:<10} {r['density']:>16.4f} {r['seconds']:>7.2f}s  {r['backend']}"
                 + ("  (units only)" if r["scope"] == "units" else "")
                 + ("" if r["exact"] else "  (DARE: the draw's keep probability)"))
        if keep or workdir:
            echo(f"outputs kept in {root}")
        return rows
    finally:
        if not keep and workdir is None:
            shutil.rmtree(root, ignore_errors=True)
