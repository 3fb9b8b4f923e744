"""End-to-end CPU benchmark: ``mergekit-yaml`` vs ``dppa merge`` on a synthetic Llama-shaped family.

Not a test. Generates (once) a bf16 family of base + 3 fine-tuned models, sharded, with realistic
deltas (base ~ N(0, 0.02), ft = bf16(base + heavy-tailed Δ with σ ≈ 5e-4), never zero), warms the
page cache, then times each run as a child process under ``/usr/bin/time -v`` (psutil polling
when absent) and appends wall time and peak RSS to ``bench/results/e2e_cpu.csv``.

    python bench/bench_e2e.py                 # ~270M parameters per model
    python bench/bench_e2e.py --double        # also the 2x deeper model (flat-RSS check)
    python bench/bench_e2e.py --repeat 5      # five runs of each, for medians
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import re
import shutil
import subprocess
import sys
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
MERGEKIT = shutil.which("mergekit-yaml") or os.path.join(os.path.dirname(sys.executable), "mergekit-yaml")
SHAPE = dict(hidden=1024, inter=2816, vocab=32000)
RUNS = [("mergekit", "ties"), ("mergekit", "task_arithmetic"), ("dppa", "ties"), ("dppa", "task_arithmetic"),
        ("dppa", "dppa")]


def n_params(layers: int) -> int:
    h, i, v = SHAPE["hidden"], SHAPE["inter"], SHAPE["vocab"]
    return layers * (4 * h * h + 3 * h * i + 2 * h) + 2 * v * h + h


def ensure_family(root: str, layers: int) -> tuple[str, list]:
    from dppa_kernels.engine.synth import llama_family

    marker = os.path.join(root, "DONE")
    paths = (os.path.join(root, "base"), [os.path.join(root, f"ft{i}") for i in range(3)])
    if not os.path.exists(marker):
        shutil.rmtree(root, ignore_errors=True)
        t = time.time()
        llama_family(root, **SHAPE, layers=layers, n_ft=3, shard_bytes=500_000_000, seed=1)
        open(marker, "w").write(str(time.time() - t))
    return paths


def warm(root: str) -> None:
    for d, _, files in os.walk(root):
        for fn in files:
            with open(os.path.join(d, fn), "rb") as f:
                while f.read(1 << 24):
                    pass


def config(path: str, method: str, base: str, fts: list) -> str:
    per = {"weight": 1.0}
    if method == "ties":
        per["density"] = 0.2
    if method == "dppa":
        per.update(densities=[0.1, 0.2], alphas=[1.8, 0.0])
    cfg = {"merge_method": method, "base_model": base, "models": [{"model": f, "parameters": dict(per)} for f in fts],
           "dtype": "bfloat16"}
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def timed(cmd: list) -> tuple[float, float, int]:
    """(wall s, peak RSS MiB, return code) of a child process."""
    if os.path.exists("/usr/bin/time"):
        t = time.perf_counter()
        r = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
        wall = time.perf_counter() - t
        m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr)
        if r.returncode:
            print(r.stderr[-3000:], file=sys.stderr)
        return wall, (int(m.group(1)) / 1024 if m else float("nan")), r.returncode
    import psutil

    t = time.perf_counter()
    p = psutil.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while p.poll() is None:
        try:
            peak = max(peak, sum(c.memory_info().rss for c in [p] + p.children(recursive=True)))
        except psutil.Error:
            pass
        time.sleep(0.05)
    return time.perf_counter() - t, peak / 2**20, p.returncode


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import psutil

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout
    from dppa_kernels.backends.registry import resolve

    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "torch": torch.__version__, "commit": commit.strip(), "backend": resolve("auto", torch.device("cpu"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/dppa-bench-e2e")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--double", action="store_true", help="also run the 2x deeper model (dppa runs only)")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--only", default="", help="comma list of tool:method to run, e.g. dppa:dppa")
    ap.add_argument("--csv", default=os.path.join(HERE, "results", "e2e_cpu.csv"))
    ap.add_argument("--repeat", type=int, default=1, help="runs of each (tool, method); one CSV row per run")
    args = ap.parse_args()
    info = machine()
    rows = []
    sizes = [args.layers] + ([2 * args.layers] if args.double else [])
    for layers in sizes:
        root = os.path.join(args.workdir, f"L{layers}")
        base, fts = ensure_family(root, layers)
        warm(root)
        for tool, method in RUNS:
            if (tool == "mergekit" and (args.skip_mergekit or layers != args.layers)):
                continue
            if args.only and f"{tool}:{method}" not in args.only.split(","):
                continue
            cfg = config(os.path.join(args.workdir, f"{tool}-{method}-L{layers}.yaml"), method, base, fts)
            out = os.path.join(args.workdir, f"out-{tool}-{method}-L{layers}")
            shutil.rmtree(out, ignore_errors=True)
            if tool == "mergekit":
                cmd = [MERGEKIT, cfg, out, "--quiet"]
            else:
                cmd = [sys.executable, "-m", "dppa_kernels", "merge", cfg, "--out", out, "--no-progress"]
            for _ in range(args.repeat):
                wall, rss, rc = timed(cmd)
                row = dict(date=dt.datetime.now().isoformat(timespec="seconds"), tool=tool, method=method,
                           params_m=round(n_params(layers) / 1e6, 1), models=4, dtype="bfloat16",
                           wall_s=round(wall, 2), peak_rss_mb=round(rss, 1), rc=rc, **info)
                print(row, flush=True)
                rows.append(row)
                shutil.rmtree(out, ignore_errors=True)
    new = not os.path.exists(args.csv)
    with open(args.csv, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
