"""CPU backend benchmark: exact threshold, fused prune / merge, against torch and mergekit.

Realistic bf16 deltas Δ = bf16(base + N(0, σ)) − bf16(base), base ~ N(0, 0.02) (many ties, exact
zeros included, never all-zero), shapes 4096×4096 and 4096×14336, density 0.2. For each op:
median (p20/p80) wall time over ≥ 5 runs, elements/s, elements/s per core, and speedup of our
backend over each baseline (baseline ms / our ms). Baselines that take long run fewer times (the
row says how many); the sort-based reference is skipped on a shape where it is projected to take
more than 60 s (the row says so). Rows are appended to bench/results/cpu_bench.csv.

    python bench/bench_cpu.py [--shapes 4096x4096,4096x14336] [--reps 7] [--no-write]
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dppa_kernels import reference as R  # noqa: E402
from dppa_kernels.backends.base import ApplyPlan  # noqa: E402
from dppa_kernels.backends.cpu import CpuBackend  # noqa: E402
from dppa_kernels.reference import rng  # noqa: E402
from dppa_kernels.spec import CombineSpec, SparsifySpec  # noqa: E402

OUT = ROOT / "bench" / "results" / "cpu_bench.csv"
FIELDS = ["date", "git_commit", "cpu_model", "torch", "threads", "op", "provider", "dtype", "shape", "density",
          "ms", "p20_ms", "p80_ms", "reps", "elem_per_s", "elem_per_s_per_core", "speedup", "note"]
DENSITY, EPSILON, SLOW_LIMIT_S = 0.2, 0.15, 60.0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return "unknown"


def realistic_delta(shape, sigma, gen):
    base = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    ft = (base.float() + torch.randn(shape, generator=gen) * sigma).to(torch.bfloat16)
    return (ft.float() - base.float()).to(torch.bfloat16), base


def timeit(fn, reps: int, slow_s: float = 10.0):
    """(median, p20, p80) in ms and the number of timed runs; slow functions get 3 runs (min)."""
    t0 = time.perf_counter()
    fn()  # warm-up (also decides whether the function is slow)
    first = time.perf_counter() - t0
    reps = reps if first < slow_s else 3
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    ts.sort()
    q = lambda f: ts[min(len(ts) - 1, int(f * (len(ts) - 1) + 0.5))] * 1e3  # noqa: E731
    return q(0.5), q(0.2), q(0.8), reps


class Recorder:
    def __init__(self, shape, nt):
        self.shape, self.n, self.nt = shape, math.prod(shape), nt
        self.rows, self.ours = [], {}

    def add(self, op, provider, res, threads=None, note="", ours=False):
        threads = threads or self.nt
        ms, p20, p80, reps = res
        eps = self.n / (ms / 1e3)
        if ours:
            self.ours.setdefault(op, ms)
        ref_ms = self.ours.get(op)
        speedup = 1.0 if ours else (ms / ref_ms if ref_ms else float("nan"))
        self.rows.append(dict(op=op, provider=provider, dtype="bf16", shape="x".join(map(str, self.shape)),
                              density=DENSITY, ms=round(ms, 3), p20_ms=round(p20, 3), p80_ms=round(p80, 3), reps=reps,
                              elem_per_s=f"{eps:.4g}", elem_per_s_per_core=f"{eps / threads:.4g}",
                              speedup=round(speedup, 2), threads=threads, note=note))
        print(f"  {op:<16} {provider:<26} {ms:10.2f} ms  {eps / 1e9:7.3f} G/s  {eps / threads / 1e9:7.3f} G/s/core"
              f"  {'' if ours else f'{speedup:8.1f}x slower than ours'} {note}", flush=True)

    def skip(self, op, provider, why):
        self.rows.append(dict(op=op, provider=provider, dtype="bf16", shape="x".join(map(str, self.shape)),
                              density=DENSITY, ms="", p20_ms="", p80_ms="", reps=0, elem_per_s="",
                              elem_per_s_per_core="", speedup="", threads=self.nt, note=f"skipped: {why}"))
        print(f"  {op:<16} {provider:<26} skipped: {why}", flush=True)


def run_shape(shape, reps, nt, projections):
    be = CpuBackend()
    gen = torch.Generator().manual_seed(0)
    (x, base), (x2, _), (x3, _) = [realistic_delta(shape, s, gen) for s in (1e-4, 5e-4, 2e-3)]
    deltas = [x, x2, x3]
    n = x.numel()
    rec = Recorder(shape, nt)
    kk = R.keep_count(n, DENSITY)
    k = torch.tensor([kk])
    zeros = 100.0 * float((x == 0).float().mean())
    print(f"shape {shape}: n = {n}, {zeros:.1f} % exact zeros in Δ_1, threads = {nt}")

    def slow(name, fn, op, provider):
        """Run a slow baseline unless the smaller shape projects it beyond the limit (n log n)."""
        proj = projections.get(name)
        if proj is not None:
            t_small, n_small = proj
            est = t_small * n * math.log(n) / (n_small * math.log(n_small))
            if est > SLOW_LIMIT_S:
                rec.skip(op, provider, f"projected {est:.0f} s > {SLOW_LIMIT_S:.0f} s from the smaller shape")
                return
        res = timeit(fn, reps)
        projections[name] = (res[0] / 1e3, n)
        rec.add(op, provider, res)

    # ---- exact threshold (k-th largest |x|, counts above / equal), tensor partition
    select = lambda: be.select(x, k, "tensor", None, None)  # noqa: E731
    rec.add("threshold", "dppa-cpu", timeit(select, reps), ours=True)
    torch.set_num_threads(1)
    rec.add("threshold", "dppa-cpu (1 thread)", timeit(select, reps), threads=1, note="same op on one core")
    torch.set_num_threads(nt)
    slow("ref_threshold", lambda: R.magnitude_threshold_ref(x, DENSITY), "threshold", "reference (sort)")
    rec.add("threshold", "torch.topk", timeit(lambda: torch.topk(x.abs().reshape(-1), kk, sorted=False), reps))
    rec.add("threshold", "torch.sort", timeit(lambda: torch.sort(x.abs().reshape(-1)), reps))
    rec.add("threshold", "torch.kthvalue", timeit(lambda: torch.kthvalue(x.abs().reshape(-1).float(), n - kk + 1),
                                                   reps), note="fp32 (kthvalue)")
    try:
        from mergekit import sparsify as mk
    except Exception as exc:  # optional dependency
        mk = None
        rec.skip("threshold", "mergekit.magnitude", f"mergekit not importable ({exc.__class__.__name__})")
    if mk is not None:
        rec.add("threshold", "mergekit.magnitude", timeit(lambda: mk.magnitude(x, DENSITY), reps),
                note="argsort mask + multiply")

    # ---- single-tensor sparsifiers: ours (select + fused apply) vs mergekit
    comb1 = CombineSpec("sum")

    def prune():
        t, a, e = be.select(x, k, "tensor", None, None)
        plan = ApplyPlan("thresholds", tau_key=t.reshape(1, 1), budget=(k - a).clamp(min=0).reshape(1, 1),
                         c_eq=e.reshape(1, 1), factors=(1.0,))
        return be.apply([x], None, [plan], [1.0], comb1, torch.bfloat16)

    rec.add("prune_magnitude", "dppa-cpu", timeit(prune, reps), ours=True, note="exact_k")
    k1, k2 = rng.stream_keys(0, "w", 0)
    dare = ApplyPlan("dare", k1=k1, k2=k2, thr32=rng.threshold32(DENSITY))
    rec.add("dare", "dppa-cpu", timeit(lambda: be.apply([x], None, [dare], [1.0], comb1, torch.bfloat16), reps),
            ours=True)

    def della():
        mask = be.della_mask(x, DENSITY, EPSILON, k1, k2)
        return be.apply([x], None, [ApplyPlan("mask", mask=mask)], [1.0], comb1, torch.bfloat16)

    rec.add("della", "dppa-cpu", timeit(della, reps), ours=True, note="per-row ranks")
    if mk is not None:
        rec.add("prune_magnitude", "mergekit.magnitude", timeit(lambda: mk.magnitude(x, DENSITY), reps))
        rec.add("dare", "mergekit.bernoulli", timeit(lambda: mk.bernoulli(x, DENSITY), reps))
        rec.add("della", "mergekit.della_magprune", timeit(lambda: mk.della_magprune(x, DENSITY, EPSILON), reps))

    # ---- TIES merge of 3 deltas + base: select per model + one fused apply
    ties = CombineSpec("ties", elect="weighted_sum", divisor="weights", normalize=True)
    weights = [1.0, 1.0, 1.0]

    def merge():
        plans = []
        for d in deltas:
            t, a, e = be.select(d, k, "tensor", None, None)
            plans.append(ApplyPlan("thresholds", tau_key=t.reshape(1, 1), budget=(k - a).clamp(min=0).reshape(1, 1),
                                   c_eq=e.reshape(1, 1), factors=(1.0,)))
        return be.apply(deltas, base, plans, weights, ties, torch.bfloat16)

    rec.add("merge_ties3", "dppa-cpu", timeit(merge, reps), ours=True, note="3 selects + fused apply; exact_k")
    spec = SparsifySpec("magnitude", density=DENSITY)
    slow("ref_merge", lambda: R.merge_ref(deltas, base, [spec] * 3, weights, ties), "merge_ties3",
         "reference (sort, fp64)")
    return rec.rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,4096x14336")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    ok, why = CpuBackend().available()
    if not ok:
        print(f"CPU backend unavailable: {why}")
        return 1
    nt = torch.get_num_threads()
    meta = dict(date=datetime.datetime.now().isoformat(timespec="seconds"), git_commit=git_commit(),
                cpu_model=cpu_model(), torch=torch.__version__)
    print(f"{meta['cpu_model']}, torch {meta['torch']}, {nt} threads, commit {meta['git_commit']}")
    rows, projections = [], {}
    for s in args.shapes.split(","):
        shape = tuple(int(v) for v in s.lower().split("x"))
        rows += run_shape(shape, args.reps, nt, projections)
    if not args.no_write:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        new = not OUT.exists()
        with OUT.open("a", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=FIELDS)
            if new:
                w.writeheader()
            for r in rows:
                w.writerow({**meta, **r})
        print(f"appended {len(rows)} rows to {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
