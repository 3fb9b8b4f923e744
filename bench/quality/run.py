"""Command line of the quality harness: ``python -m bench.quality [--quick] [--out DIR] [--cache DIR]``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: python bench/quality/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "bench.quality"

import torch  # noqa: E402

from .config import FULL, QUICK  # noqa: E402
from .experiment import reference_accuracies, run_merging, run_retention  # noqa: E402
from .family import is_cached, load_or_train  # noqa: E402
from .report import markdown, plots  # noqa: E402
from .scoring import Scorer  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny models and data (seconds; for tests)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "quality",
                   help="where tables, plots and results.json go")
    p.add_argument("--cache", type=Path, default=ROOT / "bench" / "results" / "tmp" / "quality-cache",
                   help="trained models, keyed by the training configuration (reruns skip training)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: the models are so small that a second OpenMP thread "
                        "mostly waits, badly so on a shared machine)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs (no matplotlib needed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.threads < 1:
        print(f"error: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        raise SystemExit(2)
    torch.set_num_threads(args.threads)
    cfg = QUICK if args.quick else FULL
    log = print
    load_before, t0 = os.getloadavg(), time.perf_counter()
    cached = is_cached(cfg, args.cache)
    fam = load_or_train(cfg, args.cache, progress=not args.no_progress, log=log)
    scorer = Scorer(cfg, fam.tokenizer, fam.splits)
    reference = reference_accuracies(cfg, fam, scorer)
    log("test accuracy: " + "; ".join(f"{k}: " + ", ".join(f"{t} {v:.3f}" for t, v in accs.items())
                                      for k, accs in reference.items()))
    retention = run_retention(cfg, fam, scorer, reference, log=log)
    merging = run_merging(cfg, fam, scorer, log=log)
    run = {"wall_seconds": time.perf_counter() - t0, "train_seconds": fam.info["train_seconds"],
           "cached": cached,
           "evaluations": scorer.calls, "threads": args.threads, "load_before": load_before,
           "load_after": os.getloadavg(), "quick": args.quick, "torch": torch.__version__,
           "training_key": cfg.training_key()}
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"run": run, "family": fam.info, "reference": reference, "retention": retention, "merging": merging}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "README.md").write_text(markdown(cfg, fam.info, reference, retention, merging, run))
    if not args.no_plots:
        plots(cfg, reference, retention, merging, args.out)
    log(f"wrote {args.out}/README.md, results.json{'' if args.no_plots else ', retention.png, merging.png'} "
        f"in {run['wall_seconds']:.0f} s")
    return results


if __name__ == "__main__":
    main()
