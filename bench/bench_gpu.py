"""GPU benchmark: exact thresholds, DELLA masks and fused prune+merge vs torch / mergekit baselines.

One run on one GPU:

1. measures the device's copy bandwidth (device-to-device copy of 2 GiB, read + write bytes);
2. exact per-tensor threshold (k-th largest |Δ|, density 0.2) on bf16 and fp32 deltas of
   4096×4096, 4096×14336 and 128256×4096: ours (cuda, triton) vs ``torch.topk``, ``torch.kthvalue``
   and the ``torch.argsort``-based mask of mergekit's ``magnitude``; µs, GB/s on one read of Δ,
   % of the copy bandwidth, speedup of ours over each baseline;
3. DELLA keep mask (density 0.3, ε 0.1, per-row ranks) on the same deltas, and for 16-bit dtypes
   also on rows over 32768 columns (``DELLA_LONG_ROWS``): ours (the Triton kernel,
   through the cuda and triton backends) vs the torch reference path that ops used before it
   (``reference.sparsify.della_factor`` on the GPU tensor) and mergekit's ``della_magprune`` when
   importable; bytes = one read of Δ + one byte of mask per element;
4. fused prune + merge of M = 3 deltas and a base (TIES at density 0.2; DPPA with two bands):
   time, effective GB/s on the minimal bytes (M + 2)·N·b, % of copy bandwidth, vs mergekit's
   ``GeneralizedTaskArithmeticMerge.merge_group`` on the same GPU tensors (mergekit takes the
   fine-tuned tensors and forms Δ itself; ours takes the Δ).

Timing: CUDA events around each call, warm-up first, median (and p20/p80) of ``--runs`` (≥ 50)
calls, rotating through enough distinct input buffers to defeat the L2 cache; inputs are realistic
deltas Δ = bf16(base + N(0, σ)) − bf16(base) (heavy ties, never zeros or smooth data). Slow
baselines are capped by ``--max-seconds`` per case (the number of runs is recorded).

Rows are appended to ``bench/results/gpu.csv`` (or ``--csv``; device, driver, CUDA, torch, triton,
commit, date) as they are measured, so an interrupted run keeps them; a provider that raises is
reported and left out. ``python bench/plot_gpu.py`` draws the PNG. Exits cleanly on a
machine without CUDA.

    python bench/bench_gpu.py [--runs 50] [--shapes 4096x4096,4096x14336,128256x4096] [--quick]
                              [--sections threshold,della,merge] [--csv PATH]
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "gpu.csv"
FIELDS = ["date", "commit", "device", "driver", "cuda", "torch", "triton", "section", "op", "provider", "dtype",
          "shape", "density", "m", "runs", "median_us", "p20_us", "p80_us", "bytes", "gbps", "pct_copy",
          "copy_gbps", "speedup_vs", "note"]


def _env():
    import torch

    try:
        import triton

        tv = triton.__version__
    except Exception:
        tv = "n/a"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                                timeout=10).stdout.strip()
    except Exception:
        commit = "unknown"
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    except Exception:
        driver = "unknown"
    return {"date": _dt.datetime.now().isoformat(timespec="seconds"), "commit": commit,
            "device": torch.cuda.get_device_name(), "driver": driver, "cuda": torch.version.cuda,
            "torch": torch.__version__, "triton": tv}


def _time(fn, inputs, runs, warmup=10, max_seconds=None):
    """Median/p20/p80 in µs of fn(inputs[i % len]) with CUDA events; inputs rotate (L2-cold)."""
    import torch

    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn(inputs[0])  # first call: JIT compile / autotune, excluded
    b.record()
    b.synchronize()
    if a.elapsed_time(b) > 1000.0:  # seconds-long baselines: one more warm-up is enough
        warmup = 1
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    torch.cuda.synchronize()
    times = []
    budget = max_seconds if max_seconds else float("inf")
    spent = 0.0
    for i in range(runs):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(inputs[i % len(inputs)])
        b.record()
        b.synchronize()
        t = a.elapsed_time(b) * 1e3
        times.append(t)
        spent += t / 1e6
        if spent > budget and len(times) >= 5:
            break
    times.sort()
    q = lambda f: times[min(len(times) - 1, int(f * len(times)))]  # noqa: E731
    return statistics.median(times), q(0.2), q(0.8), len(times)


def _copy_bandwidth(runs):
    import torch

    n = (2 << 30) // 4
    src = torch.rand(n, device="cuda")
    dst = torch.empty_like(src)
    med, _, _, _ = _time(lambda s: dst.copy_(s), [src], runs)
    return 2 * src.numel() * 4 / (med * 1e-6) / 1e9  # read + write


def _deltas(shape, dtype, count, sigma=5e-4, seed=0):
    import torch

    g = torch.Generator(device="cuda").manual_seed(seed)
    out = []
    for _ in range(count):
        base = (torch.randn(shape, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        ft = (base.float() + torch.randn(shape, device="cuda", generator=g) * sigma).to(torch.bfloat16)
        out.append((ft.float() - base.float()).to(dtype))
        del base, ft
    return out


def _n_buffers(nbytes, l2=50 << 20, mem_cap=24 << 30):
    """Enough distinct buffers to exceed 2× L2, within a memory cap."""
    return max(1, min(8, -(-2 * l2 // max(nbytes, 1)), max(1, mem_cap // max(nbytes, 1))))


def bench_threshold(env, copy_gbps, shapes, dtypes, runs, max_seconds, rows, density=0.2):
    import torch

    import dppa_kernels as dk
    from dppa_kernels.backends.registry import availability

    for dtype in dtypes:
        for shape in shapes:
            n = shape[0] * shape[1]
            nbytes = n * torch.finfo(dtype).bits // 8
            xs = _deltas(shape, dtype, _n_buffers(nbytes))
            k = max(1, int(density * n))
            provs = {}
            for be in ("cuda", "triton"):
                if availability()[be][0]:
                    provs[f"ours_{be}"] = lambda x, be=be: dk.magnitude_threshold(x, density, backend=be,
                                                                                   check_finite=False)
            provs["torch.topk"] = lambda x: torch.topk(x.abs().view(-1), k, sorted=False).values.min()
            provs["torch.kthvalue"] = lambda x: torch.kthvalue(x.abs().view(-1).float(), n - k + 1).values

            def _argsort_mask(x):  # mergekit magnitude(): argsort of |x| and a scattered mask
                w = x.abs().reshape(-1)
                mask = torch.zeros(n, dtype=x.dtype, device=x.device)
                mask[torch.argsort(w, descending=True)[:k]] = 1
                return mask

            provs["torch.argsort(mergekit)"] = _argsort_mask
            res = {}
            for name, fn in provs.items():
                res[name] = _guarded(name, lambda: _time(fn, xs, runs, max_seconds=max_seconds))
            for name, r in res.items():
                if r is None:
                    continue
                med, p20, p80, nr = r
                gbps = nbytes / (med * 1e-6) / 1e9
                speed = ";".join(f"{b}={res[b][0] / med:.1f}x" for b in res if not b.startswith("ours") and res[b]
                                 and name.startswith("ours"))
                rows.append(dict(env, section="threshold", op="exact_threshold", provider=name,
                                 dtype=str(dtype).replace("torch.", ""), shape=f"{shape[0]}x{shape[1]}",
                                 density=density, m=1, runs=nr, median_us=f"{med:.1f}", p20_us=f"{p20:.1f}",
                                 p80_us=f"{p80:.1f}", bytes=nbytes, gbps=f"{gbps:.1f}",
                                 pct_copy=f"{100 * gbps / copy_gbps:.1f}", copy_gbps=f"{copy_gbps:.1f}",
                                 speedup_vs=speed, note="bytes = one read of Δ"))
                print(f"threshold {dtype} {shape} {name:26s} {med:10.1f} µs {gbps:8.1f} GB/s "
                      f"{100 * gbps / copy_gbps:5.1f}% {speed}")
            del xs
            torch.cuda.empty_cache()


def _mergekit_della():
    try:
        from mergekit.sparsify import SparsificationMethod, sparsify
    except Exception as exc:  # mergekit absent or a different version
        return None, f"mergekit unavailable: {exc!r}"
    return (lambda x, density, epsilon: sparsify(x, density, SparsificationMethod.della_magprune,
                                                  epsilon=epsilon)), ""


# rows over the register sort (32768 columns): the counting path of 16-bit keys
DELLA_LONG_ROWS = [(512, 53248), (1, 1 << 24)]


def bench_della(env, copy_gbps, shapes, dtypes, runs, max_seconds, rows, density=0.3, epsilon=0.1):
    import torch

    from dppa_kernels.backends.registry import availability, get_backend
    from dppa_kernels.reference import rng
    from dppa_kernels.reference import sparsify as SP

    k1, k2 = rng.stream_keys(0, "bench", 0)
    mk, why = _mergekit_della()
    for dtype in dtypes:
        for shape in shapes + (DELLA_LONG_ROWS if dtype != torch.float32 else []):
            n = shape[0] * shape[1]
            nbytes = n * torch.finfo(dtype).bits // 8 + n  # read Δ, write the bool mask
            xs = _deltas(shape, dtype, _n_buffers(nbytes))
            provs = {}
            for be in ("cuda", "triton"):
                if availability()[be][0] and get_backend(be).della_mask is not None:
                    provs[f"ours_{be}"] = lambda x, be=be: get_backend(be).della_mask(x, density, epsilon, k1, k2)
            provs["torch.reference"] = lambda x: SP.della_factor(x, density, epsilon, 0, "bench") > 0
            if mk is not None:
                provs["mergekit.della_magprune"] = lambda x: mk(x, density, epsilon)
            res = {name: _guarded(name, lambda: _time(fn, xs, runs, max_seconds=max_seconds))
                   for name, fn in provs.items()}
            res = {name: r for name, r in res.items() if r is not None}
            for name, (med, p20, p80, nr) in res.items():
                gbps = nbytes / (med * 1e-6) / 1e9
                speed = ";".join(f"{b}={res[b][0] / med:.1f}x" for b in res
                                 if name.startswith("ours") and not b.startswith("ours"))
                rows.append(dict(env, section="della", op="della_mask", provider=name,
                                 dtype=str(dtype).replace("torch.", ""), shape=f"{shape[0]}x{shape[1]}",
                                 density=f"{density};eps={epsilon}", m=1, runs=nr, median_us=f"{med:.1f}",
                                 p20_us=f"{p20:.1f}", p80_us=f"{p80:.1f}", bytes=nbytes, gbps=f"{gbps:.1f}",
                                 pct_copy=f"{100 * gbps / copy_gbps:.1f}", copy_gbps=f"{copy_gbps:.1f}",
                                 speedup_vs=speed, note="bytes = one read of Δ + 1 B of mask per element"
                                 + ("" if mk else f"; {why}")))
                print(f"della {dtype} {shape} {name:26s} {med:10.1f} µs {gbps:8.1f} GB/s "
                      f"{100 * gbps / copy_gbps:5.1f}% {speed}")
            del xs
            torch.cuda.empty_cache()


def _mergekit_gta(method):
    try:
        from mergekit.merge_methods.base import TensorEntry, TensorGroup
        from mergekit.merge_methods.generalized_task_arithmetic import (ConsensusMethod,
                                                                        GeneralizedTaskArithmeticMerge)
        from mergekit.sparsify import SparsificationMethod
    except Exception as exc:  # mergekit absent or a different version
        return None, f"mergekit unavailable: {exc!r}"
    gta = GeneralizedTaskArithmeticMerge(consensus_method=ConsensusMethod.sum,
                                         sparsification_method=SparsificationMethod.magnitude,
                                         default_normalize=True, default_rescale=False, method_name="ties",
                                         method_pretty_name="TIES", method_reference_url=None)

    def run(base, fts, weights, density):
        group = TensorGroup(entries=[TensorEntry("base", base, is_base=True)]
                            + [TensorEntry(f"m{i}", t) for i, t in enumerate(fts)])
        ids = [f"m{i}" for i in range(len(fts))]
        return gta.merge_group(group, density=dict.fromkeys(ids, density), weight=dict(zip(ids, weights)),
                               rescale=False, int8_mask=False, normalize=True, **{"lambda": 1.0})

    return run, ""


def bench_merge(env, copy_gbps, shapes, dtypes, runs, max_seconds, rows, m=3, density=0.2):
    import torch

    import dppa_kernels as dk
    from dppa_kernels.backends.registry import availability

    mk, why = _mergekit_gta("ties")
    for dtype in dtypes:
        for shape in shapes:
            n = shape[0] * shape[1]
            b = torch.finfo(dtype).bits // 8
            minimal = (m + 2) * n * b
            nsets = _n_buffers(minimal, mem_cap=20 << 30)
            sets = []
            for s in range(nsets):
                ds = _deltas(shape, dtype, m, seed=100 + s)
                base = (torch.randn(shape, device="cuda") * 0.02).to(dtype)
                sets.append((base, ds))
            w = [1.0, 0.7, 0.5]
            cases = {}
            for be in ("cuda", "triton"):
                if availability()[be][0]:
                    cases[("ties", f"ours_{be}")] = lambda st, be=be: dk.merge_deltas(
                        st[1], st[0], method="ties", density=density, weight=w, backend=be, check_finite=False)
                    cases[("dppa_2bands", f"ours_{be}")] = lambda st, be=be: dk.merge_deltas(
                        st[1], st[0], method="dppa", weight=w, densities=[0.1, 0.2], alphas=[1.8, 1.0],
                        backend=be, check_finite=False)
                    # the default tie rule (exact_k) ranks ties; gt shows what that ranking costs
                    cases[("dppa_2bands_gt", f"ours_{be}")] = lambda st, be=be: dk.merge_deltas(
                        st[1], st[0], method="dppa", weight=w, densities=[0.1, 0.2], alphas=[1.8, 1.0],
                        tie_mode="gt", backend=be, check_finite=False)
            res = {key: _guarded(key, lambda: _time(fn, sets, runs, max_seconds=max_seconds))
                   for key, fn in cases.items()}
            if mk is not None:
                # mergekit forms Δ = ft − base itself: give it fine-tuned tensors with the same Δ
                fsets = [(base, [(base.float() + d.float()).to(dtype) for d in ds]) for base, ds in sets]
                res[("ties", "mergekit.GTA")] = _guarded("mergekit.GTA", lambda: _time(
                    lambda st: mk(st[0], st[1], w, density), fsets, runs, max_seconds=max_seconds))
                del fsets
            res = {key: r for key, r in res.items() if r is not None}
            for (op, prov), (med, p20, p80, nr) in res.items():
                gbps = minimal / (med * 1e-6) / 1e9
                base_t = res.get(("ties", "mergekit.GTA"))
                speed = f"mergekit.GTA={base_t[0] / med:.1f}x" if base_t and prov.startswith("ours") and op == "ties" \
                    else ""
                rows.append(dict(env, section="merge", op=op, provider=prov, dtype=str(dtype).replace("torch.", ""),
                                 shape=f"{shape[0]}x{shape[1]}", density=density if op == "ties" else "0.1;0.2",
                                 m=m, runs=nr, median_us=f"{med:.1f}", p20_us=f"{p20:.1f}", p80_us=f"{p80:.1f}",
                                 bytes=minimal, gbps=f"{gbps:.1f}", pct_copy=f"{100 * gbps / copy_gbps:.1f}",
                                 copy_gbps=f"{copy_gbps:.1f}", speedup_vs=speed,
                                 note="bytes = (M+2)·N·b minimal" + ("" if mk else f"; {why}")))
                print(f"merge {op:12s} {dtype} {shape} {prov:14s} {med:10.1f} µs {gbps:8.1f} GB/s "
                      f"{100 * gbps / copy_gbps:5.1f}% {speed}")
            del sets
            torch.cuda.empty_cache()


def _guarded(name, fn):
    """fn(), or None when it raises: one failing provider must not lose the others' numbers."""
    import torch

    try:
        return fn()
    except Exception as exc:
        print(f"  {name}: failed: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        if isinstance(exc, torch.cuda.OutOfMemoryError):
            torch.cuda.empty_cache()
        return None


class _CsvRows(list):
    """Rows written to the CSV as they are added: an interrupted run keeps what it measured."""

    def __init__(self, path, smoke):
        super().__init__()
        self.path, self.smoke = path, smoke

    def append(self, row):
        super().append(row)
        _write([row], self.path, self.smoke)

    def extend(self, rows):
        for r in rows:
            self.append(r)


def _write(rows, path=RESULTS, smoke=False):
    if smoke:
        for r in rows:
            r["note"] = (r.get("note", "") + "; smoke run (fewer than 50 runs)").lstrip("; ")
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            wr.writeheader()
        for r in rows:
            wr.writerow({k: r.get(k, "") for k in FIELDS})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--max-seconds", type=float, default=30.0, help="time cap per (case, provider)")
    ap.add_argument("--shapes", default="4096x4096,4096x14336,128256x4096")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    ap.add_argument("--quick", action="store_true", help="4096x4096 only, 20 runs (smoke test, not a result)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--no-della", action="store_true", help="skip the DELLA mask section")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma list of " + ", ".join(SECTIONS))
    ap.add_argument("--csv", type=Path, default=RESULTS, help=f"rows are appended here (default {RESULTS})")
    a = ap.parse_args(argv)
    sections = [s.strip() for s in a.sections.split(",") if s.strip()]
    if any(s not in SECTIONS for s in sections):
        ap.error(f"--sections: expected a comma list of {', '.join(SECTIONS)}, got {a.sections[:80]!r}")
    if a.no_della:
        sections = [s for s in sections if s != "della"]
    try:
        import torch
    except Exception:
        print("bench_gpu: torch is not importable; nothing to do")
        return 0
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device available; this benchmark runs on a GPU only. Nothing was measured.")
        return 0
    os.environ.setdefault("TRITON_INTERPRET", "0")
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    dtypes = [getattr(torch, d) for d in a.dtypes.split(",")]
    runs = a.runs
    if a.quick:
        shapes, runs = [(4096, 4096)], 20
    elif runs < 50:
        print("bench_gpu: --runs below 50 (the reporting minimum); results are marked in the note column")
    env = _env()
    copy_gbps = _copy_bandwidth(max(runs, 20))
    print(f"{env['device']} (driver {env['driver']}): copy bandwidth {copy_gbps:.1f} GB/s")
    rows = [dict(env, section="ceiling", op="copy", provider="torch.copy_", runs=max(runs, 20),
                 gbps=f"{copy_gbps:.1f}", copy_gbps=f"{copy_gbps:.1f}", pct_copy="100.0",
                 bytes=2 * (2 << 30), note="device-to-device copy of 2 GiB, read + write bytes")]
    out = _CsvRows(a.csv, smoke=a.quick or runs < 50)
    out.extend(rows)
    for section in sections:
        SECTIONS[section](env, copy_gbps, shapes, dtypes, runs, a.max_seconds, out)
    print(f"appended {len(out)} rows to {a.csv}")
    if not a.no_plot:
        subprocess.run([sys.executable, str(HERE / "plot_gpu.py"), "--csv", str(a.csv),
                        "--out", str(a.csv.with_suffix(".png"))], check=False)
    return 0


SECTIONS = {"threshold": bench_threshold, "della": bench_della, "merge": bench_merge}

if __name__ == "__main__":
    sys.exit(main())
