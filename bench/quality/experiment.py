"""The two measurements: retention of pruned experts, and merges of all experts."""

from __future__ import annotations

import time
from typing import Callable, Mapping

from .config import QualityConfig
from .family import Family, unit_names
from .methods import MERGE_METHODS, PRUNE_METHODS, MergeJob, PruneJob
from .scoring import Scorer, retention_ratio


def reference_accuracies(cfg: QualityConfig, fam: Family, scorer: Scorer) -> dict:
    """Test accuracy of the base and of each expert on every task."""
    out = {"base": scorer.accuracies(fam.base, cfg.tasks, "test")}
    for t in cfg.tasks:
        out[f"expert {t}"] = scorer.accuracies(fam.experts[t], cfg.tasks, "test")
    return out


def run_retention(cfg: QualityConfig, fam: Family, scorer: Scorer, reference: Mapping, *,
                  methods: Mapping[str, Callable] = PRUNE_METHODS, log: Callable[[str], None] = print) -> list:
    """One row per (method, task, density): test accuracy (mean over the outcome's states) and
    retention = that accuracy / the expert's test accuracy."""
    units = unit_names(fam.base)
    rows = []
    for t in cfg.tasks:
        dense = reference[f"expert {t}"][t]
        for d in cfg.densities:
            for name, method in methods.items():
                t0 = time.perf_counter()
                job = PruneJob(fam.base, fam.experts[t], d, units, task=t, seeds=cfg.dare_seeds,
                               factors=cfg.factor_grid, alpha_evals=cfg.alpha_evals,
                               validate=lambda s, t=t: scorer.accuracy(s, t, "validation"))
                out = method(job)
                accs = [scorer.accuracy(s, t, "test") for s in out.states]
                acc = sum(accs) / len(accs)
                rows.append({"method": name, "task": t, "density": d, "test_accuracy": acc, "test_accuracies": accs,
                             "expert_accuracy": dense, "retention": retention_ratio(acc, dense),
                             "retentions": [retention_ratio(a, dense) for a in accs], "chosen": out.chosen,
                             "seconds": round(time.perf_counter() - t0, 2)})
            log(f"retention {t} density {d}: " + ", ".join(
                f"{r['method']} {r['retention']:.3f}" for r in rows if r["task"] == t and r["density"] == d))
    return rows


def run_merging(cfg: QualityConfig, fam: Family, scorer: Scorer, *, methods: Mapping[str, Callable] = MERGE_METHODS,
                log: Callable[[str], None] = print) -> list:
    """One row per merging method: test accuracy per task of the merge of all experts, with the
    hyperparameters chosen on the mean validation accuracy."""
    rows, memo = [], {}  # memo: work shared by methods (one DPPA α search per density)
    for name, method in methods.items():
        t0 = time.perf_counter()
        job = MergeJob(fam.base, fam.experts, lambda s: scorer.accuracies(s, cfg.tasks, "validation"),
                       lambdas=cfg.lambda_grid, densities=cfg.merge_densities, seed=cfg.merge_seed,
                       validate_task=lambda s, t: scorer.accuracy(s, t, "validation"),
                       alpha_evals=cfg.alpha_evals, memo=memo)
        out = method(job)
        test = scorer.accuracies(out.state, cfg.tasks, "test")
        rows.append({"method": name, "test_accuracy": test, "mean": sum(test.values()) / len(test),
                     "chosen": out.chosen, "seconds": round(time.perf_counter() - t0, 2)})
        log(f"merge {name}: mean test accuracy {rows[-1]['mean']:.3f} ({_brief(out.chosen)})")
    return rows


def _brief(chosen: Mapping) -> str:
    return ", ".join(f"{k}={v}" for k, v in chosen.items() if not isinstance(v, (list, dict)))
