"""Markdown tables and PNG plots of a harness run."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Mapping, Sequence

from .scoring import retention_ratio


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _mean(xs) -> float:
    """Mean over the defined values (retention is NaN for a task whose expert scores 0)."""
    xs = [x for x in xs if not math.isnan(x)]
    return statistics.fmean(xs) if xs else float("nan")


def _retention_cell(rows: Sequence[Mapping]) -> str:
    """Mean retention over tasks; for several states (seeds), ± the std over seeds of that mean."""
    mean = _mean(r["retention"] for r in rows)
    n = len(rows[0]["retentions"])
    per_seed = [_mean(r["retentions"][i] for r in rows) for i in range(n)]
    if n < 2 or any(math.isnan(x) for x in per_seed):
        return f"{mean:.3f}"
    return f"{mean:.3f} ± {statistics.stdev(per_seed):.3f}"


def _alphas(a) -> str:
    return "(" + ", ".join(f"{x:g}" for x in a) + ")"


def _chosen_prune(chosen: Mapping[str, Mapping]) -> str:
    """What each task's method chose on validation: a global factor, or searched α with the realised density."""
    if all("factor" in c for c in chosen.values()):
        return "factor " + "; ".join(f"{t}: {c['factor']}" for t, c in chosen.items())
    if all("evaluations" in c for c in chosen.values()):
        return "α (kept) " + "; ".join(f"{t}: {_alphas(c['alphas'])} ({c['realised_density']:.3f})"
                                       for t, c in chosen.items())
    if all("realised_density" in c for c in chosen.values()):
        return "kept " + "; ".join(f"{t}: {c['realised_density']:.3f}" for t, c in chosen.items())
    return ""


def _gain_kept(row: Mapping, reference: Mapping) -> float:
    """(accuracy − base) / (expert − base) of a retention row; NaN when the expert does not beat the base."""
    base, expert = reference["base"][row["task"]], row["expert_accuracy"]
    return (row["test_accuracy"] - base) / (expert - base) if expert > base else float("nan")


def markdown(cfg, family_info: Mapping, reference: Mapping, retention: Sequence[Mapping],
             merging: Sequence[Mapping], run: Mapping) -> str:
    tasks, dens = list(cfg.tasks), list(cfg.densities)
    out = ["# Quality harness: pruning retention and merging on synthetic tasks\n",
           f"Model: Llama-shaped, {cfg.shape.as_dict()}; tasks {', '.join(tasks)}; splits per task: "
           f"pretrain {cfg.pretrain_per_task}, train {cfg.train_per_task}, validation {cfg.validation_per_task}, "
           f"test {cfg.test_per_task} (disjoint, drawn before training). Every hyperparameter is chosen on "
           f"validation; all numbers below are on test. Exact match, greedy decoding.\n",
           f"Run: {run['wall_seconds']:.0f} s wall ({run['train_seconds']} s training"
           f"{' (cached)' if run['cached'] else ''}"
           f", {run['evaluations']} evaluations), {run['threads']} torch thread(s), load average "
           f"{run['load_before'][0]:.1f} before / {run['load_after'][0]:.1f} after.\n",
           "## Base and experts (test accuracy, %)\n",
           "| model | " + " | ".join(tasks) + " | ‖Δ‖/‖W‖ (units) | ‖Δ‖/‖W‖ (all) |",
           "|---|" + "---|" * (len(tasks) + 2)]
    for name, accs in reference.items():
        info = family_info.get(name.removeprefix("expert "), {}) if name.startswith("expert ") else {}
        ratios = (f"{info['delta_ratio_units']:.4f} | {info['delta_ratio_all']:.4f}" if info else "– | –")
        out.append(f"| {name} | " + " | ".join(_pct(accs[t]) for t in tasks) + f" | {ratios} |")
    out += ["", "## Retention (pruned accuracy / expert accuracy), mean over tasks\n",
            "| method | " + " | ".join(f"density {d}" for d in dens) + " |", "|---|" + "---|" * len(dens)]
    methods = list(dict.fromkeys(r["method"] for r in retention))
    for m in methods:
        cells = [_retention_cell([r for r in retention if r["method"] == m and r["density"] == d]) for d in dens]
        out.append(f"| {m} | " + " | ".join(cells) + " |")
    floor = _mean(retention_ratio(reference["base"][t], reference[f"expert {t}"][t]) for t in tasks)
    out.append(f"| base (every delta dropped) | " + " | ".join(f"{floor:.3f}" for _ in dens) + " |")
    out += ["", "DARE: mean over seeds " + ", ".join(map(str, cfg.dare_seeds)) + " (± std over seeds). "
            "DP and DPPA use the levels (d/2, d): DP keeps both bands at factor 1 (density d, allocated per "
            "unit); DPPA (searched α) runs the greedy α search on the validation split "
            f"(≤ {cfg.alpha_evals} candidates; α_lo = 0 keeps d/2 only). magnitude × factor: one global factor "
            f"from {list(cfg.factor_grid)} chosen on validation. "
            "Pruning acts on the linear weights inside decoder blocks; embeddings, norms and lm_head keep "
            "their dense deltas.\n",
            "## Share of the fine-tuning gain kept, mean over tasks\n",
            "(pruned − base) / (expert − base) on test: 1 keeps the whole gain of fine-tuning, 0 is the base. "
            "With small deltas the base already solves much of each task, so this separates the methods "
            "more than retention does.\n",
            "| method | " + " | ".join(f"density {d}" for d in dens) + " |", "|---|" + "---|" * len(dens)]
    for m in methods:
        cells = [_mean(_gain_kept(r, reference) for r in retention if r["method"] == m and r["density"] == d)
                 for d in dens]
        out.append(f"| {m} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    out += ["", "## Retention per task\n",
            "| method | density | " + " | ".join(tasks) + " | chosen on validation |",
            "|---|---|" + "---|" * (len(tasks) + 1)]
    for m in methods:
        for d in dens:
            rs = {r["task"]: r for r in retention if r["method"] == m and r["density"] == d}
            out.append(f"| {m} | {d} | " + " | ".join(f"{rs[t]['retention']:.3f}" for t in tasks)
                       + f" | {_chosen_prune({t: rs[t]['chosen'] for t in tasks})} |")
    out += ["", "## Merging all experts (test accuracy, %)\n",
            "| model | " + " | ".join(tasks) + " | mean | chosen on validation |", "|---|" + "---|" * (len(tasks) + 2)]
    base = reference["base"]
    out.append("| base | " + " | ".join(_pct(base[t]) for t in tasks)
               + f" | {_pct(statistics.fmean(base.values()))} | |")
    own = {t: reference[f"expert {t}"][t] for t in tasks}
    out.append("| each expert on its own task | " + " | ".join(_pct(own[t]) for t in tasks)
               + f" | {_pct(statistics.fmean(own.values()))} | |")
    for r in merging:
        chosen = ", ".join(f"{k} {r['chosen'][k]}" for k in ("density", "lambda") if k in r["chosen"])
        if "alphas" in r["chosen"]:
            chosen += ", α " + "; ".join(f"{t} {_alphas(a)}" for t, a in zip(tasks, r["chosen"]["alphas"]))
        out.append(f"| {r['method']} | " + " | ".join(_pct(r["test_accuracy"][t]) for t in tasks)
                   + f" | {_pct(r['mean'])} | {chosen} |")
    out.append("")
    return "\n".join(out)


def plots(cfg, reference: Mapping, retention: Sequence[Mapping], merging: Sequence[Mapping], out: Path) -> list:
    """retention.png (mean retention vs density per method) and merging.png (accuracy per task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, dens = list(cfg.tasks), sorted(cfg.densities)
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in dict.fromkeys(r["method"] for r in retention):
        ys = [_mean(r["retention"] for r in retention if r["method"] == m and r["density"] == d)
              for d in dens]
        ax.plot(dens, ys, marker="o", label=m)
    ax.set_xscale("log")
    ax.set_xticks(dens, [str(d) for d in dens])
    ax.set_xlabel("density (kept fraction of each unit's delta)")
    ax.set_ylabel("retention (mean over tasks)")
    ax.axhline(1.0, color="grey", lw=0.5)
    ax.legend()
    ax.set_title("Pruned expert accuracy / expert accuracy (test)")
    fig.tight_layout()
    paths = [out / "retention.png"]
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    rows = [("base", reference["base"]), ("experts", {t: reference[f"expert {t}"][t] for t in tasks})]
    rows += [(r["method"], r["test_accuracy"]) for r in merging]
    fig, ax = plt.subplots(figsize=(8.5, 4))
    width = 0.8 / len(rows)
    for i, (name, accs) in enumerate(rows):
        ax.bar([j + i * width for j in range(len(tasks))], [accs[t] for t in tasks], width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks)
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Merging all experts: accuracy per task")
    fig.tight_layout()
    paths.append(out / "merging.png")
    fig.savefig(paths[1], dpi=120)
    plt.close(fig)
    return paths
