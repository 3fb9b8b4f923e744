"""Ray executor benchmark: ``dppa merge`` with the local executor vs the Ray executor (1 and 2
workers) on the synthetic Llama-shaped family of bench_e2e.py (~271M parameters per model).

Not a test. Each run is a child process that imports the package, then (Ray) starts a local
cluster of ``workers`` CPUs and warms one worker per CPU (both timed and reported apart from the
merge), then times ``run_merge``. Reported per run: the merge's wall time, the driver's peak RSS,
each Ray worker's peak RSS, the Ray start-up and warm-up costs, and the per-task timeline (which
shard or statistics group ran in which worker process, when). Rows go to
``bench/results/ray_cpu.csv`` and the timeline to ``bench/results/ray_timeline_cpu.csv``, with the
machine's load average; the summary prints each Ray run's wall time over the local executor's.
A control run, ``local-omp1``, is the local executor with one OpenMP thread (on a loaded machine
two spinning OpenMP threads can cost more than they give, which would flatter Ray's 1-CPU tasks).

The output is split into shards of ``--shard-size`` (default 100M: six shards of this family, as
a 70B model has ~28 shards at the default 5B), so that there is per-shard work to spread.

    python bench/bench_ray.py                           # ties and dppa: local, ray x1, ray x2
    python bench/bench_ray.py --methods ties --repeat 3
    python bench/bench_ray.py --omp1          # every process with one OpenMP thread (a loaded machine)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_e2e as E  # noqa: E402  (the family, its configs, the machine's description)

RESULTS = os.path.join(HERE, "results")
# (label, executor, Ray workers, extra environment): "local-omp1" is a control, the local executor
# with one OpenMP thread: on a loaded machine two spinning OpenMP threads can cost more than they give
RUNS = [("local", "local", None, {}), ("local-omp1", "local", None, {"OMP_NUM_THREADS": "1"}),
        ("ray", "ray", 1, {}), ("ray", "ray", 2, {})]


def child(args) -> None:
    """One timed merge in this process; prints one JSON line."""
    from dppa_kernels.engine import MergeOptions, run_merge
    from dppa_kernels.engine.ray_tasks import peak_rss_mib

    out = {"startup_s": 0.0, "warmup_s": 0.0, "worker_rss_mib": {}, "timeline": []}
    executor = args.executor
    if args.executor == "ray":
        import ray

        from dppa_kernels.engine.ray_executor import RayExecutor

        executor = RayExecutor(workers=args.workers, progress=False)
        executor.connect()  # a local cluster of `workers` CPUs
        out["startup_s"] = executor.startup_s
        t = time.perf_counter()  # each worker process imports torch and the package once
        ray.get([ray.remote(_warm).options(num_cpus=1).remote() for _ in range(args.workers)])
        out["warmup_s"] = time.perf_counter() - t
    t = time.perf_counter()
    run_merge(args.config, MergeOptions(out=args.out, executor=executor, shard_size=args.shard_size, progress=False,
                                        force=True))
    out["wall_s"] = time.perf_counter() - t
    out["driver_rss_mib"] = peak_rss_mib()
    if args.executor == "ray":
        t0 = min(x.start for x in executor.timeline)
        for x in executor.timeline:
            out["worker_rss_mib"][x.pid] = max(out["worker_rss_mib"].get(x.pid, 0), x.peak_rss_mib)
            out["timeline"].append(dict(kind=x.kind, index=x.index, pid=x.pid, start_s=round(x.start - t0, 3),
                                        end_s=round(x.end - t0, 3), bytes=x.bytes_written))
    print(json.dumps(out))


def _warm() -> int:
    import dppa_kernels.engine.ray_tasks  # noqa: F401 (what the first task would import)

    return os.getpid()


def overlap_s(timeline: list) -> float:
    """Seconds during which at least two tasks ran at once (0: no parallel work)."""
    edges = sorted([(t["start_s"], 1) for t in timeline] + [(t["end_s"], -1) for t in timeline])
    busy, prev, total = 0, 0.0, 0.0
    for x, d in edges:
        if busy >= 2:
            total += x - prev
        busy, prev = busy + d, x
    return total


def gantt(timeline: list, width: int = 60) -> str:
    if not timeline:
        return ""
    end = max(t["end_s"] for t in timeline) or 1.0
    lines = []
    for pid in sorted({t["pid"] for t in timeline}):
        row = [" "] * width
        for t in (t for t in timeline if t["pid"] == pid):
            a, b = int(t["start_s"] / end * (width - 1)), int(t["end_s"] / end * (width - 1))
            ch = str(t["index"] % 10) if t["kind"] == "shard" else "s"
            for k in range(a, b + 1):
                row[k] = ch
        lines.append(f"    worker {pid:>7} |{''.join(row)}| {end:.1f} s")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--executor", default="local", help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", default="/tmp/dppa-bench-ray")
    ap.add_argument("--layers", type=int, default=16, help="16: ~271M parameters per model")
    ap.add_argument("--methods", default="ties,dppa")
    ap.add_argument("--shard-size", type=int, default=100_000_000)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--omp1", action="store_true",
                    help="every run (the drivers too) with OMP_NUM_THREADS=1: a fair comparison on a loaded machine")
    ap.add_argument("--csv", default=os.path.join(RESULTS, "ray_cpu.csv"))
    ap.add_argument("--timeline-csv", default=os.path.join(RESULTS, "ray_timeline_cpu.csv"))
    args = ap.parse_args()
    if args.child:
        return child(args)
    info = E.machine()
    root = os.path.join(args.workdir, f"L{args.layers}")
    base, fts = E.ensure_family(root, args.layers)
    E.warm(root)
    walls: dict = {}
    for method in args.methods.split(","):
        cfg = E.config(os.path.join(args.workdir, f"{method}-L{args.layers}.yaml"), method, base, fts)
        for rep in range(args.repeat):
            for label, executor, workers, env in RUNS:
                out = os.path.join(args.workdir, f"out-{method}-{label}{workers or ''}")
                cmd = [sys.executable, os.path.abspath(__file__), "--child", "--executor", executor, "--workers",
                       str(workers or 1), "--config", cfg, "--out", out, "--shard-size", str(args.shard_size)]
                load = os.getloadavg()[0]
                env = {**os.environ, **env, **({"OMP_NUM_THREADS": "1"} if args.omp1 else {})}
                r = subprocess.run(cmd, capture_output=True, text=True, env=env)
                shutil.rmtree(out, ignore_errors=True)
                if r.returncode:
                    print(r.stderr[-3000:], file=sys.stderr)
                    continue
                res = json.loads(r.stdout.strip().splitlines()[-1])
                run = f"{method}-{label}{workers or ''}-{rep}"
                workers_rss = sorted(res["worker_rss_mib"].values())
                row = dict(date=dt.datetime.now().isoformat(timespec="seconds"), run=run, method=method,
                           executor=label, workers=workers or 0, params_m=round(E.n_params(args.layers) / 1e6, 1),
                           shard_size=args.shard_size, omp_threads=env.get("OMP_NUM_THREADS", "default"),
                           wall_s=round(res["wall_s"], 2),
                           ray_startup_s=round(res["startup_s"], 2), ray_warmup_s=round(res["warmup_s"], 2),
                           driver_rss_mib=round(res["driver_rss_mib"]),
                           worker_rss_mib=" ".join(str(round(x)) for x in workers_rss),
                           tasks=len(res["timeline"]), parallel_s=round(overlap_s(res["timeline"]), 2),
                           load1_start=round(load, 2), load1_end=round(os.getloadavg()[0], 2), **info)
                E.append_row(args.csv, row)
                for t in res["timeline"]:
                    E.append_row(args.timeline_csv, dict(run=run, date=row["date"], **t))
                walls.setdefault((method, label, workers), []).append(res["wall_s"])
                print(f"{run:>18}: merge {res['wall_s']:.1f} s (ray start {res['startup_s']:.1f} s, warm-up "
                      f"{res['warmup_s']:.1f} s), driver RSS {row['driver_rss_mib']} MiB, workers "
                      f"{row['worker_rss_mib'] or '-'} MiB, two tasks at once for {row['parallel_s']} s, "
                      f"load {load:.1f}", flush=True)
                if res["timeline"]:
                    print(gantt(res["timeline"]), flush=True)
    from statistics import median

    for (method, label, workers), w in sorted(walls.items(), key=str):
        for base in ("local", "local-omp1"):
            ref = walls.get((method, base, None))
            if label == "ray" and ref:
                print(f"{method}: ray x{workers} / {base} = {median(w) / median(ref):.2f} "
                      f"({median(w):.1f} s / {median(ref):.1f} s)")


if __name__ == "__main__":
    main()
