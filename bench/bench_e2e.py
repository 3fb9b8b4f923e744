"""End-to-end benchmark: ``dppa merge`` and ``dppa-mergekit-yaml`` vs ``mergekit-yaml``, Llama-shaped.

Not a test. Generates (once) a bf16 family of base + 3 fine-tuned models, sharded, with realistic
deltas (base ~ N(0, 0.02), ft = bf16(base + heavy-tailed Δ with σ ≈ 5e-4), never zero), warms the
page cache, then times each run as a child process under ``/usr/bin/time -v`` (psutil polling
when absent) and appends wall time and peak RSS to ``bench/results/e2e_cpu.csv``, one row as each
run ends, and at the end the ratio of the median wall times (``mergekit-yaml`` / ours) of each
method both ran, with the machine's load average. With ``--devices cpu,cuda`` each run is also
timed on the GPU (``dppa merge --device cuda``, ``mergekit-yaml --cuda``); rows then carry the
device and the GPU's name and go to ``bench/results/e2e_gpu.csv``.

    python bench/bench_e2e.py                 # ~270M parameters per model
    python bench/bench_e2e.py --layers 11 --only mergekit:ties,dppa:ties,fastpath:ties --repeat 3  # 207M: 10x
    python bench/bench_e2e.py --double        # also the 2x deeper model (flat-RSS check)
    python bench/bench_e2e.py --repeat 5      # five runs of each, for medians
    python bench/bench_e2e.py --devices cpu,cuda --only dppa:ties,mergekit:ties   # on a GPU machine
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
FAST = os.path.join(os.path.dirname(sys.executable), "dppa-mergekit-yaml")
# tools: mergekit (mergekit-yaml), dppa (dppa merge), fastpath (dppa-mergekit-yaml: mergekit's CLI
# and layout, our engine when the run is eligible). The family's tokenizer_config.json alone would
# make mergekit rebuild a tokenizer with transformers, which the fast path does not reproduce: the
# fastpath runs pass --no-copy-tokenizer (mergekit-yaml keeps its defaults).
FAST_ARGS = ["--quiet", "--no-copy-tokenizer"]
RUNS = [("mergekit", "ties"), ("mergekit", "task_arithmetic"), ("dppa", "ties"), ("dppa", "task_arithmetic"),
        ("dppa", "dppa"), ("fastpath", "ties")]


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


def check_fast(args: list) -> None:
    """Stop unless dppa-mergekit-yaml takes its fast path for ``args`` (else mergekit's pipeline
    would be timed under the fast path's name)."""
    from dppa_kernels.integrations import mergekit_cli
    from dppa_kernels.integrations.mergekit_fast import Unsupported, plan_fast

    opts = mergekit_cli.parse_fast(args)
    if opts is None:
        sys.exit(f"bench_e2e: dppa-mergekit-yaml {' '.join(args)}: command line not understood by the fast path")
    try:
        plan_fast(opts, opts["config_file"], opts["out_path"]).inputs.close()
    except Unsupported as exc:
        sys.exit(f"bench_e2e: dppa-mergekit-yaml would not take its fast path: {exc}")


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

    try:  # the GPU machine may have neither git nor the repository's .git
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=REPO, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    from dppa_kernels.backends.registry import resolve

    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "torch": torch.__version__, "commit": commit, "backend": resolve("auto", torch.device("cpu"))}


def append_row(path: str, row: dict) -> None:
    """Append one row (header first in a new file): an interrupted run keeps the rows it wrote."""
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def summarise(rows: list) -> list:
    """(method, device, tool, mergekit median s, the tool's median s, ratio) of each method that
    mergekit-yaml and another tool ran."""
    from statistics import median

    walls: dict = {}
    for r in rows:
        if r["rc"] == 0 and r["params_m"] == rows[0]["params_m"]:
            walls.setdefault((r["method"], r.get("device", "cpu"), r["tool"]), []).append(r["wall_s"])
    out = []
    for (method, device, tool), w in sorted(walls.items()):
        theirs = walls.get((method, device, "mergekit"))
        if tool != "mergekit" and theirs:
            out.append((method, device, tool, median(theirs), median(w), median(theirs) / median(w)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/dppa-bench-e2e")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--double", action="store_true", help="also run the 2x deeper model (dppa runs only)")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--only", default="", help="comma list of tool:method to run, e.g. dppa:dppa")
    ap.add_argument("--csv", default=None, help="default bench/results/e2e_cpu.csv (e2e_gpu.csv with cuda)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of each (tool, method); one CSV row per run")
    ap.add_argument("--devices", default="cpu", help="comma list of cpu, cuda: each run on each device")
    args = ap.parse_args()
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if not devices or any(d not in ("cpu", "cuda") for d in devices):
        ap.error(f"--devices: expected a comma list of cpu, cuda, got {args.devices[:80]!r}")
    gpu_rows = "cuda" in devices  # rows with device columns, in their own CSV
    args.csv = args.csv or os.path.join(HERE, "results", "e2e_gpu.csv" if gpu_rows else "e2e_cpu.csv")
    info = machine()
    import torch

    if "cuda" in devices and not torch.cuda.is_available():
        print("bench_e2e: no CUDA device here: the cuda runs are skipped", flush=True)
        devices.remove("cuda")
    gpu = torch.cuda.get_device_name() if gpu_rows and torch.cuda.is_available() else ""
    from dppa_kernels.backends.registry import resolve
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
            for _ in range(args.repeat):
                for device in devices:
                    if tool == "mergekit":
                        cmd = [MERGEKIT, cfg, out, "--quiet"] + (["--cuda"] if device == "cuda" else [])
                    elif tool == "fastpath":
                        cmd = [FAST, cfg, out, *FAST_ARGS] + (["--cuda"] if device == "cuda" else [])
                        check_fast(cmd[1:])
                    else:
                        cmd = [sys.executable, "-m", "dppa_kernels", "merge", cfg, "--out", out, "--no-progress",
                               "--device", device]
                    wall, rss, rc = timed(cmd)
                    row = dict(date=dt.datetime.now().isoformat(timespec="seconds"), tool=tool, method=method,
                               params_m=round(n_params(layers) / 1e6, 1), models=4, dtype="bfloat16",
                               wall_s=round(wall, 2), peak_rss_mb=round(rss, 1), rc=rc, **info)
                    if gpu_rows:
                        row.update(device=device, gpu=gpu, backend=resolve("auto", torch.device(device)))
                    print(row, flush=True)
                    append_row(args.csv, row)
                    rows.append(row)
                    shutil.rmtree(out, ignore_errors=True)
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    label = {"dppa": "dppa merge", "fastpath": "dppa-mergekit-yaml"}
    for method, device, tool, theirs, ours, ratio in summarise(rows):
        print(f"{method} on {device}: mergekit-yaml {theirs:.2f} s, {label[tool]} {ours:.2f} s: {ratio:.1f}x "
              f"(medians; load average {load})", flush=True)


if __name__ == "__main__":
    main()
