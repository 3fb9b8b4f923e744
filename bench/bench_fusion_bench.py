"""FusionBench's TIES, its own code vs with ``dppa_kernels.integrations.fusion_bench.install()``.

Not a test. Generates (once) a bf16 Llama-shaped family, base + 3 fine-tuned models of ~194M
parameters each, randomly initialised here with realistic deltas (``dppa_kernels.engine.synth``),
as Hugging Face folders. Each configuration then runs in its own child process (clean peak RSS):
FusionBench's ``CausalLMPool`` loads the four models and ``TiesMergingAlgorithm`` (threshold 20,
merge ``sum``, scaling 0.3: its YAML defaults) merges them. The child reports the time of
``run()`` and of the ``ties_merging`` call inside it, and a digest of the merged state dict: the
two configurations must produce the same model. Appends one CSV row per run to
``bench/results/fusion_bench_cpu.csv`` (wall time and peak RSS of the whole child, from
``/usr/bin/time -v``) and prints the ratios.

    python bench/bench_fusion_bench.py               # ~194M parameters per model, 1 run each
    python bench/bench_fusion_bench.py --repeat 3    # three runs of each, for medians
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import hashlib
import io
import json
import os
import resource
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)
from bench_e2e import SHAPE, machine, n_params, timed, warm  # noqa: E402

CONFIGS = ("fusion_bench", "dppa_kernels")
# Peak RSS measured at 78M parameters, in copies of one bf16 model (FusionBench flattens, stacks and
# copies the task vectors several times) plus the imports: the guard below refuses a run that
# would push a shared machine out of memory.
MODEL_COPIES = {"fusion_bench": 31, "dppa_kernels": 16}
IMPORT_GB = 0.7


def ensure_family(root: str, layers: int) -> dict:
    """{pool name: path} of the base (``_pretrained_``) and three fine-tuned models."""
    from dppa_kernels.engine.synth import llama_family

    marker = os.path.join(root, "DONE")
    if not os.path.exists(marker):
        t = time.time()
        llama_family(root, **SHAPE, layers=layers, n_ft=3, shard_bytes=500_000_000, seed=1)
        open(marker, "w").write(str(time.time() - t))
    pool = {"_pretrained_": os.path.join(root, "base")}
    pool.update({f"ft{i}": os.path.join(root, f"ft{i}") for i in range(3)})
    return pool


def digest(state_dict) -> str:
    """Hash of every tensor's bytes: equal digests mean bit-identical merged models."""
    import torch

    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def child(config: str, pool_paths: dict, args, out_json: str) -> None:
    """One configuration, in this (child) process; writes its measurements to ``out_json``."""
    import importlib

    import torch
    from fusion_bench.method import TiesMergingAlgorithm
    from fusion_bench.modelpool import CausalLMPool

    ties_module = importlib.import_module("fusion_bench.method.ties_merging.ties_merging")

    if config == "dppa_kernels":
        from dppa_kernels.integrations import fusion_bench as fb

        fb.install()
    import_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    merge = ties_module.ties_merging  # FusionBench's, or ours once installed
    spent = []

    def timed_merge(*a, **k):
        t = time.perf_counter()
        out = merge(*a, **k)
        spent.append(time.perf_counter() - t)
        return out

    ties_module.ties_merging = timed_merge
    pool = CausalLMPool(models=pool_paths, tokenizer=None, model_kwargs={"torch_dtype": "bfloat16"})
    algo = TiesMergingAlgorithm(scaling_factor=0.3, threshold=args.threshold, remove_keys=[],
                                merge_func=args.merge_func)
    t = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # FusionBench's progress prints and profile
        merged = algo.run(pool)
    run_s = time.perf_counter() - t
    with open(out_json, "w") as f:
        json.dump({"run_s": run_s, "ties_s": sum(spent), "import_rss_mb": import_rss,
                   "threads": torch.get_num_threads(), "digest": digest(merged.state_dict())}, f)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/dppa-bench-fusion-bench")
    ap.add_argument("--layers", type=int, default=10, help="decoder layers (10: ~194M parameters per model)")
    ap.add_argument("--threshold", type=float, default=20)
    ap.add_argument("--merge-func", default="sum", choices=("sum", "mean", "max"))
    ap.add_argument("--repeat", type=int, default=1, help="runs of each configuration; one CSV row per run")
    ap.add_argument("--csv", default=os.path.join(HERE, "results", "fusion_bench_cpu.csv"))
    ap.add_argument("--force", action="store_true", help="run even when the memory estimate exceeds what is free")
    ap.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument("--out-json", help=argparse.SUPPRESS)
    args = ap.parse_args()
    root = os.path.join(args.workdir, f"L{args.layers}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    pool = ensure_family(root, args.layers)
    if args.child:
        return child(args.child, pool, args, args.out_json)
    import psutil

    need = IMPORT_GB + MODEL_COPIES["fusion_bench"] * n_params(args.layers) * 2 / 2**30
    have = psutil.virtual_memory().available / 2**30
    if need > 0.9 * have and not args.force:
        sys.exit(f"error: FusionBench's own TIES needs about {need:.1f} GiB at {n_params(args.layers) / 1e6:.0f}M "
                 f"parameters, only {have:.1f} GiB are available (--layers fewer, or --force)")
    warm(root)
    info = machine()
    rows = []
    for _ in range(args.repeat):
        for config in CONFIGS:
            out_json = os.path.join(args.workdir, f"{config}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--child", config, "--out-json", out_json,
                   "--workdir", args.workdir, "--layers", str(args.layers), "--threshold", str(args.threshold),
                   "--merge-func", args.merge_func]
            wall, rss, rc = timed(cmd)
            res = json.load(open(out_json)) if rc == 0 else {}
            row = dict(date=dt.datetime.now().isoformat(timespec="seconds"), config=config, method="ties",
                       merge_func=args.merge_func, threshold=args.threshold,
                       params_m=round(n_params(args.layers) / 1e6, 1), models=4, dtype="bfloat16",
                       wall_s=round(wall, 2), run_s=round(res.get("run_s", float("nan")), 2),
                       ties_s=round(res.get("ties_s", float("nan")), 2), peak_rss_mb=round(rss, 1),
                       import_rss_mb=round(res.get("import_rss_mb", float("nan")), 1), digest=res.get("digest", ""),
                       rc=rc, **info)
            print(row, flush=True)
            rows.append(row)
    by = {c: [r for r in rows if r["config"] == c and r["rc"] == 0] for c in CONFIGS}
    if all(by.values()):
        med = {c: {k: statistics.median(r[k] for r in rs) for k in ("run_s", "ties_s", "peak_rss_mb")}
               for c, rs in by.items()}
        host, ours = med["fusion_bench"], med["dppa_kernels"]
        same = len({r["digest"] for rs in by.values() for r in rs}) == 1
        print(f"same merged model: {same}; medians: run() {host['run_s'] / ours['run_s']:.2f}x, "
              f"ties_merging {host['ties_s'] / ours['ties_s']:.2f}x faster; peak RSS "
              f"{host['peak_rss_mb']:.0f} -> {ours['peak_rss_mb']:.0f} MiB")
    new = not os.path.exists(args.csv)
    with open(args.csv, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
