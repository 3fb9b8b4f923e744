"""Plot bench/results/gpu.csv: GB/s per op, shape and provider, with the measured copy bandwidth.

    python bench/plot_gpu.py [--csv bench/results/gpu.csv] [--out bench/results/gpu.png] [--device NAME]

Uses the latest row of each case (section, op, dtype, shape, provider) of the chosen device (default:
the device of the newest row), so that sections measured by separate runs plot together. GB/s is on
the logical bytes of each row (one read of Δ for thresholds, (M+2)·N·b for merges).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv", default=str(HERE / "results" / "gpu.csv"))
    ap.add_argument("--out", default=str(HERE / "results" / "gpu.png"))
    ap.add_argument("--device", default=None)
    a = ap.parse_args(argv)
    path = Path(a.csv)
    if not path.exists():
        print(f"plot_gpu: {path} does not exist; run bench/bench_gpu.py on a GPU first")
        return 0
    rows = list(csv.DictReader(path.open()))
    if not rows:
        print("plot_gpu: no rows")
        return 0
    device = a.device or rows[-1]["device"]
    latest = {}
    for r in sorted((r for r in rows if r["device"] == device and r["gbps"]), key=lambda r: r["date"]):
        latest[(r["section"], r["op"], r["dtype"], r["shape"], r["provider"])] = r
    rows = list(latest.values())
    if not rows:
        print(f"plot_gpu: no rows with GB/s for {device}")
        return 0
    dates = sorted({r["date"] for r in rows})
    last = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        print(f"plot_gpu: matplotlib is not available ({exc}); pip install matplotlib")
        return 0
    copy = float(next(r["copy_gbps"] for r in rows if r["copy_gbps"]))
    data = [r for r in rows if r["section"] in ("threshold", "merge")]
    groups = sorted({(r["section"], r["op"], r["dtype"], r["shape"]) for r in data})
    providers = sorted({r["provider"] for r in data})
    val = defaultdict(float)
    for r in data:
        val[(r["section"], r["op"], r["dtype"], r["shape"], r["provider"])] = float(r["gbps"])
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(groups)), 5))
    width = 0.8 / max(len(providers), 1)
    for j, p in enumerate(providers):
        xs = [i + j * width for i in range(len(groups))]
        ax.bar(xs, [val[(*g, p)] for g in groups], width, label=p)
    ax.axhline(copy, color="k", linestyle="--", label=f"copy bandwidth {copy:.0f} GB/s")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(groups))])
    ax.set_xticklabels([f"{op}\n{dt} {sh}" for _, op, dt, sh in groups], rotation=60, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("GB/s (logical bytes)")
    ax.set_title(f"dppa_kernels on {device} ({last})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out, dpi=120)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
