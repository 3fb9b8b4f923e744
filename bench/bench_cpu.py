"""CPU benchmark of the calls users make (default arguments) against torch and mergekit.

Realistic bf16 deltas Δ = bf16(base + N(0, σ)) − bf16(base), base ~ N(0, 0.02) (many ties, exact
zeros included, never all-zero), shapes 4096×4096 and 4096×14336, density 0.2. Ours is the public
API as called with default arguments (``dk.magnitude_threshold(x, 0.2)``, ``dk.prune(...)``,
``dk.merge_deltas(...)``: NaN/Inf checked, backend auto = the C++ CPU backend); each op also
runs with ``check_finite=False`` (alternating with the default call), whose row gives default /
unchecked as its ``speedup`` (the cost of the check). For each op: median (p20/p80) wall time over ≥ 5 runs, elements/s, elements/s per
core, and speedup of our default call over each baseline (baseline ms / our ms). Slow baselines run
3 times; the sort-based reference is skipped where projected beyond 60 s (the row says so).

Then small merges (48×32 up to 1024×1024, 3 fp32 models, the ``dk.merge_deltas`` defaults) through
mergekit's in-memory API ``merge_state_dicts``, with and without our ``install()``: the drop-in
must be no slower than mergekit's own code at any size. Runs alternate between the two.

``--threads-sweep`` instead measures the CPU extension's size rule (``SERIAL_BELOW``: calls over
fewer elements run on one thread): a 2-model TIES apply pass and a tensor select at 2^12..2^20
elements on exactly 1 and on all threads.

Rows go to bench/results/cpu_bench.csv (replaced, or appended with ``--append``), each with the
1-minute load average at the start of its shape (a shared machine makes numbers noisy).

    python bench/bench_cpu.py [--shapes 4096x4096,4096x14336] [--reps 7] [--no-small] [--no-write]
    python bench/bench_cpu.py --threads-sweep
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import dppa_kernels as dk  # noqa: E402
from dppa_kernels import reference as R  # noqa: E402
from dppa_kernels.backends import cpu as cpu_backend  # noqa: E402
from dppa_kernels.backends.cpu import CpuBackend  # noqa: E402
from dppa_kernels.methods import preset  # noqa: E402
from dppa_kernels.plans import make_plan  # noqa: E402

OUT = ROOT / "bench" / "results" / "cpu_bench.csv"
FIELDS = ["date", "git_commit", "cpu_model", "torch", "threads", "load1", "op", "provider", "dtype", "shape",
          "density", "ms", "p20_ms", "p80_ms", "reps", "elem_per_s", "elem_per_s_per_core", "speedup", "note"]
DENSITY, EPSILON, SLOW_LIMIT_S = 0.2, 0.15, 60.0
SMALL_SHAPES = ((48, 32), (128, 128), (256, 256), (512, 512), (1024, 1024))
SMALL_METHODS = {"task_arithmetic": {}, "ties": {"density": 0.5}, "dare_ties": {"density": 0.5},
                 "breadcrumbs": {"density": 0.5, "gamma": 0.01}, "della": {"density": 0.5, "epsilon": 0.1}}


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


def load1() -> float:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def realistic_delta(shape, sigma, gen):
    base = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
    ft = (base.float() + torch.randn(shape, generator=gen) * sigma).to(torch.bfloat16)
    return (ft.float() - base.float()).to(torch.bfloat16), base


def quantiles(ts):
    ts = sorted(ts)
    q = lambda f: ts[min(len(ts) - 1, int(f * (len(ts) - 1) + 0.5))] * 1e3  # noqa: E731
    return q(0.5), q(0.2), q(0.8), len(ts)


def timeit(fn, reps: int, slow_s: float = 10.0):
    """(median, p20, p80) in ms and the number of timed runs; slow functions get 3 runs (min)."""
    t0 = time.perf_counter()
    fn()  # warm-up (also decides whether the function is slow)
    reps = reps if time.perf_counter() - t0 < slow_s else 3
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return quantiles(ts)


def interleaved(fns, reps: int, budget_s: float = 20.0):
    """quantiles() of each function, runs alternating between them and the order reversed every
    other round (fair under drifting load, and to whichever runs after the other); fewer rounds (5
    at least) when ``reps`` rounds would take longer than ``budget_s``."""
    t0 = time.perf_counter()
    for fn in fns:
        fn()
    reps = max(5, min(reps, int(budget_s / max(time.perf_counter() - t0, 1e-9))))
    ts = [[] for _ in fns]
    for r in range(reps):
        for t, fn in (zip(ts, fns) if r % 2 == 0 else reversed(list(zip(ts, fns)))):
            t0 = time.perf_counter()
            fn()
            t.append(time.perf_counter() - t0)
    return [quantiles(t) for t in ts]


class Recorder:
    def __init__(self, shape, nt, dtype="bf16", density=DENSITY):
        self.shape, self.n, self.nt, self.dtype, self.density = shape, math.prod(shape), nt, dtype, density
        self.rows, self.ours, self.load = [], {}, load1()

    def _row(self, op, provider, threads, note, **vals):
        self.rows.append(dict(op=op, provider=provider, dtype=self.dtype, shape="x".join(map(str, self.shape)),
                              density=self.density, threads=threads, load1=self.load, note=note, **vals))

    def add(self, op, provider, res, threads=None, note="", ours=False, vs=None):
        """``vs``: the speedup column is vs / res (another of our calls against this one) instead of
        baseline / our default call."""
        threads = threads or self.nt
        ms, p20, p80, reps = res
        eps = self.n / (ms / 1e3)
        if ours:
            self.ours.setdefault(op, ms)
        ref_ms = self.ours.get(op)
        speedup = vs / ms if vs else (1.0 if ours else (ms / ref_ms if ref_ms else float("nan")))
        self._row(op, provider, threads, note, ms=round(ms, 3), p20_ms=round(p20, 3), p80_ms=round(p80, 3),
                  reps=reps, elem_per_s=f"{eps:.4g}", elem_per_s_per_core=f"{eps / threads:.4g}",
                  speedup=round(speedup, 3))
        tail = "" if ours and not vs else f"{speedup:8.3f}x" + (" (default / this)" if vs else " slower than ours")
        print(f"  {op:<18} {provider:<34} {ms:10.3f} ms (p20 {p20:.3f}, p80 {p80:.3f})  {eps / 1e9:7.3f} G/s"
              f"  {tail} {note}", flush=True)

    def skip(self, op, provider, why):
        self._row(op, provider, self.nt, f"skipped: {why}", ms="", p20_ms="", p80_ms="", reps=0, elem_per_s="",
                  elem_per_s_per_core="", speedup="")
        print(f"  {op:<18} {provider:<34} skipped: {why}", flush=True)


def mergekit_sparsify():
    try:
        from mergekit import sparsify

        return sparsify
    except Exception:  # optional dependency
        return None


def ours(rec, op, call, reps, note=""):
    """Our default call and the same with check_finite=False, runs alternating (the unchecked
    row's speedup column is default / unchecked: the cost of the NaN/Inf check)."""
    default, unchecked = interleaved([lambda: call(True), lambda: call(False)], reps)
    rec.add(op, "dppa (default call)", default, ours=True, note=note)
    rec.add(op, "dppa (check_finite=False)", unchecked, vs=default[0],
            note="speedup = default / unchecked: the cost of the NaN/Inf check")


def run_shape(shape, reps, nt, projections):
    gen = torch.Generator().manual_seed(0)
    (x, base), (x2, _), (x3, _) = [realistic_delta(shape, s, gen) for s in (1e-4, 5e-4, 2e-3)]
    deltas = [x, x2, x3]
    n = x.numel()
    rec = Recorder(shape, nt)
    kk = R.keep_count(n, DENSITY)
    zeros = 100.0 * float((x == 0).float().mean())
    print(f"shape {shape}: n = {n}, {zeros:.1f} % exact zeros in Δ_1, threads = {nt}, load {rec.load}")

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

    # ---- exact threshold (k-th largest |x|), tensor partition
    ours(rec, "threshold", lambda c: dk.magnitude_threshold(x, DENSITY, check_finite=c), reps)
    torch.set_num_threads(1)
    rec.add("threshold", "dppa (default call, 1 thread)", timeit(lambda: dk.magnitude_threshold(x, DENSITY), reps),
            threads=1, note="same call on one core")
    torch.set_num_threads(nt)
    slow("ref_threshold", lambda: R.magnitude_threshold_ref(x, DENSITY), "threshold", "reference (sort)")
    rec.add("threshold", "torch.topk", timeit(lambda: torch.topk(x.abs().reshape(-1), kk, sorted=False), reps))
    rec.add("threshold", "torch.sort", timeit(lambda: torch.sort(x.abs().reshape(-1)), reps))
    rec.add("threshold", "torch.kthvalue", timeit(lambda: torch.kthvalue(x.abs().reshape(-1).float(), n - kk + 1),
                                                   reps), note="fp32 (kthvalue)")
    mk = mergekit_sparsify()
    if mk is None:
        rec.skip("threshold", "mergekit.magnitude", "mergekit not importable")
    else:
        rec.add("threshold", "mergekit.magnitude", timeit(lambda: mk.magnitude(x, DENSITY), reps),
                note="argsort mask + multiply")

    # ---- single-tensor sparsifiers: dk.prune with its defaults vs mergekit
    ours(rec, "prune_magnitude", lambda c: dk.prune(x, "magnitude", density=DENSITY, check_finite=c), reps,
         note="tie_mode exact_k")
    ours(rec, "dare", lambda c: dk.prune(x, "dare", density=DENSITY, check_finite=c), reps)
    ours(rec, "della", lambda c: dk.prune(x, "della", density=DENSITY, epsilon=EPSILON, check_finite=c), reps,
         note="per-row ranks")
    if mk is not None:
        rec.add("prune_magnitude", "mergekit.magnitude", timeit(lambda: mk.magnitude(x, DENSITY), reps))
        rec.add("dare", "mergekit.bernoulli", timeit(lambda: mk.bernoulli(x, DENSITY), reps))
        rec.add("della", "mergekit.della_magprune", timeit(lambda: mk.della_magprune(x, DENSITY, EPSILON), reps))

    # ---- TIES merge of 3 deltas + base (mergekit's ties: density, weight 1, normalize)
    ours(rec, "merge_ties3", lambda c: dk.merge_deltas(deltas, base, method="ties", density=DENSITY, check_finite=c),
         reps, note="3 selects + fused apply")
    w, specs, comb = preset("ties", 3, {"density": DENSITY})
    slow("ref_merge", lambda: R.merge_ref(deltas, base, specs, w, comb), "merge_ties3", "reference (sort, fp64)")
    try:
        from mergekit.merge_methods import merge_state_dicts

        sds = [{"w": base}] + [{"w": base + d} for d in deltas]
        slow("mk_merge", lambda: merge_state_dicts(sds, "ties", base=0, parameters={"weight": 1.0,
                                                                                    "density": DENSITY}),
             "merge_ties3", "mergekit ties (merge_state_dicts)")
    except ImportError:
        rec.skip("merge_ties3", "mergekit ties (merge_state_dicts)", "mergekit not importable")
    return rec.rows


def run_small(reps, nt):
    """3-model fp32 merges through mergekit's in-memory API: mergekit's own code vs with install()."""
    try:
        from mergekit.merge_methods import merge_state_dicts

        from dppa_kernels.integrations import mergekit as dkm
    except ImportError:
        print("small merges skipped: mergekit not importable")
        return []
    rows = []
    with dkm.installed(override=False):  # <name>_fast twins beside mergekit's own methods
        for shape in SMALL_SHAPES:
            gen = torch.Generator().manual_seed(1)
            sds = [{"w": torch.randn(shape, generator=gen)} for _ in range(3)]
            rec = Recorder(shape, nt, dtype="fp32", density="")
            print(f"small merges {shape}: load {rec.load}")
            for method, extra in SMALL_METHODS.items():
                params = {"weight": 1.0, **extra}
                mine, theirs = interleaved(
                    [lambda m=method + "_fast": merge_state_dicts(sds, m, base=0, parameters=params),
                     lambda m=method: merge_state_dicts(sds, m, base=0, parameters=params)], reps)
                rec.add(f"small_{method}", "dppa install() (merge_state_dicts)", mine, ours=True,
                        note="install(override=False): the _fast twin")
                rec.add(f"small_{method}", "mergekit (merge_state_dicts)", theirs)
            rows += rec.rows
    return rows


def _on_threads(t: int, fn):
    """fn run on exactly t threads of the CPU extension (no size rule)."""
    def run():
        cpu_backend._nthreads = lambda: -t
        return fn()
    return run


def threads_sweep(reps):
    """The size rule of the CPU extension: exactly 1 vs all threads around SERIAL_BELOW."""
    be, nt = CpuBackend(), torch.get_num_threads()
    limit = be._m.SERIAL_BELOW
    print(f"SERIAL_BELOW = {limit}; threads 1 vs {nt}; load {load1()}")
    rows = []
    for log_n in range(12, 21):
        n = 1 << log_n
        gen = torch.Generator().manual_seed(0)
        base = torch.randn(n, generator=gen).bfloat16()
        ds = [(torch.randn(n, generator=gen) * 1e-3).bfloat16() for _ in range(2)]
        w, specs, comb = preset("ties", 2, {"density": 0.5})
        plans = [make_plan(be, d, s, seed=0, name="", stream=i) for i, (d, s) in enumerate(zip(ds, specs))]
        k = torch.tensor([n // 2])
        rec = Recorder((n,), nt, density=0.5)
        for op, fn in (("sweep_apply_ties2", lambda: be.apply(ds, base, plans, w, comb, torch.bfloat16)),
                       ("sweep_select", lambda: be.select(ds[0], k, "tensor", None, None))):
            one, many = interleaved([_on_threads(1, fn), _on_threads(nt, fn)], reps)
            rec.add(op, "dppa-cpu (1 thread)", one, threads=1, ours=True, note=f"SERIAL_BELOW {limit}")
            rec.add(op, f"dppa-cpu ({nt} threads)", many, note="speedup = this / 1 thread")
        cpu_backend._nthreads = torch.get_num_threads
        rows += rec.rows
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,4096x14336")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--small-reps", type=int, default=200)
    ap.add_argument("--no-small", action="store_true", help="skip the small merges against mergekit")
    ap.add_argument("--threads-sweep", action="store_true", help="measure the one-thread size rule only")
    ap.add_argument("--append", action="store_true", help="append to the CSV instead of replacing it")
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
    if args.threads_sweep:
        rows = threads_sweep(max(args.reps, 50))
    else:
        rows, projections = [], {}
        for s in filter(None, args.shapes.split(",")):  # --shapes "": the small merges only
            rows += run_shape(tuple(int(v) for v in s.lower().split("x")), args.reps, nt, projections)
        if not args.no_small:
            rows += run_small(args.small_reps, nt)
    if not args.no_write:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        append = args.append or args.threads_sweep
        new = not OUT.exists() or not append
        with OUT.open("a" if append else "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=FIELDS)
            if new:
                w.writeheader()
            for r in rows:
                w.writerow({**meta, **r})
        print(f"{'appended' if append else 'wrote'} {len(rows)} rows to {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
