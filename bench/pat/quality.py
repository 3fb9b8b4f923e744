"""PAT quality experiment, offline: does pruning-aware tuning beat pruning after tuning?

1. Pretrain a small Llama-shaped model from scratch on the package's synthetic tasks
   (``dppa_kernels.tasks``: reverse, sort, lookup, count, add; character tokenizer).
2. Fine-tune it on a held-apart tuning split of the same tasks, three ways, each with the call a
   user makes (``dppa pat train``'s ``run_train``):
     (a) dense LoRA (keep = 1),
     (b) PAT at each --keeps fraction, folded to a smaller dense model,
     (c) structured baselines without pruning-aware training: the (a) model with the same number
         of hidden channels removed by an activation or a weight-magnitude criterion, then folded.
3. Exact-match accuracy (greedy decoding) on a disjoint test split, per task and overall, and
   prefill latency / tokens per second of every model (round-robin, median of --repeats).

Writes bench/results/pat/quality.csv (one row per model), quality.md (the table) and quality.png.
Run: .venv/bin/python bench/pat/quality.py  (≈ 25 min on one loaded CPU core; --quick: ≈ 3 min)
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(ROOT / "bench")]
from bench_pat import commit  # noqa: E402
from structured import CRITERIA, activation_scores, magnitude_scores, prune_to_width  # noqa: E402

OUT = ROOT / "bench" / "results" / "pat"
# task -> size range (small enough for a 0.8 M-parameter model to learn in minutes)
TASKS = {"reverse": (3, 6), "sort": (3, 6), "lookup": (2, 5), "count": (4, 10), "add": (1, 3)}


def make_data(work: Path, n_pre: int, n_tune: int, n_test: int, seed: int) -> dict:
    from dppa_kernels import tasks

    splits = {"pretrain": [], "tune": [], "test": []}
    per_task_test = {}
    for name, rng in TASKS.items():
        s = tasks.draw_splits(name, {"pretrain": n_pre, "tune": n_tune, "test": n_test},
                              seed=seed, size_range=rng)
        for k in splits:
            splits[k] += s[k]
        per_task_test[name] = s["test"]
    paths = {k: tasks.write_jsonl(v, work / f"{k}.jsonl") for k, v in splits.items()}
    for name, ex in per_task_test.items():
        paths[f"test_{name}"] = tasks.write_jsonl(ex, work / f"test_{name}.jsonl")
    return {"splits": splits, "paths": paths}


def pretrain(work: Path, data: dict, steps: int, seed: int) -> str:
    from dppa_kernels import tasks

    tok = tasks.char_tokenizer()
    model = tasks.build_model(tok, tasks.ModelShape(), seed=seed)
    res = tasks.train_model(model, tok, data["splits"]["pretrain"],
                            tasks.TrainConfig(steps=steps, batch_size=64, lr=3e-3, seed=seed))
    print(f"pretrain: {steps} steps, loss {res.losses[0]:.3f} -> "
          f"{statistics.mean(res.losses[-20:]):.3f}, {res.seconds:.0f} s", flush=True)
    path = work / "base"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def tune(base: str, data: dict, out: Path, keep: float, args) -> dict:
    from dppa_kernels.pat.pipeline import TrainOptions, run_train

    opts = TrainOptions(model=base, data=str(data["paths"]["tune"]), out=str(out), keep=keep,
                        max_steps=args.tune_steps, lora_rank=args.lora_rank,
                        lora_alpha=2.0 * args.lora_rank, lora_dropout=0.0,
                        learning_rate=args.lr, batch_size=args.batch_size, grad_accum=1,
                        response_field="answer", template="{prompt}", progress=False,
                        seed=args.seed, force=True)
    rep = run_train(opts, echo=lambda s: print(s, flush=True))
    print(f"  keep {keep}: d'={rep['kept_width']}, train {rep['timings']['train_s']:.0f} s, "
          f"losses {rep['losses']['eval_soft_mask']} / {rep['losses']['eval_hard_mask']}",
          flush=True)
    return rep


def calibration_batches(base: str, data: dict, n: int = 256, bs: int = 64) -> list:
    from transformers import AutoTokenizer

    from dppa_kernels import pat

    tok = AutoTokenizer.from_pretrained(base)
    rows = [{"prompt": e.prompt, "response": e.answer} for e in data["splits"]["tune"][:n]]
    feats = pat.tokenize_pairs(rows, tok, template="{prompt}")
    col = pat.ResponseOnlyCollator(tok.pad_token_id)
    return [col(feats[i:i + bs]) for i in range(0, len(feats), bs)]


def prefill_ms(models: dict, batch: int, seq: int, repeats: int, vocab: int) -> dict:
    ids = torch.randint(4, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))

    def run(m):
        with torch.inference_mode():
            m(ids, use_cache=True, logits_to_keep=1)

    for m in models.values():
        run(m)
    ms = {k: [] for k in models}
    for _ in range(repeats):  # round-robin: load from other processes hits all models alike
        for k, m in models.items():
            t0 = time.perf_counter()
            run(m)
            ms[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in ms.items()}


def accuracy(model_dir: str, data: dict, tok_dir: str) -> dict:
    from transformers import AutoModelForCausalLM

    from dppa_kernels.eval import exact_match

    m = AutoModelForCausalLM.from_pretrained(model_dir).float().eval()
    acc = {"all": exact_match(m, data=data["paths"]["test"], tokenizer=tok_dir)}
    for name in TASKS:
        acc[name] = exact_match(m, data=data["paths"][f"test_{name}"], tokenizer=tok_dir)
    return acc, m


def plot(rows: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a0, a1) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["model"] for r in rows]
    colors = ["#888888" if r["method"] in ("base", "dense LoRA") else
              "#1f77b4" if r["method"] == "PAT" else "#d62728" for r in rows]
    a0.barh(names, [100 * r["acc_all"] for r in rows], color=colors)
    a0.set_xlabel("exact-match accuracy on the test split (%)")
    a0.invert_yaxis()
    a1.barh(names, [r["tokens_per_s"] for r in rows], color=colors)
    a1.set_xlabel("prefill tokens / s (CPU)")
    a1.invert_yaxis()
    a1.set_yticklabels([])
    fig.suptitle("PAT vs structured pruning after LoRA (synthetic tasks, 0.8 M-param Llama)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list) -> str:
    head = ("| model | method | d′ | params | test acc | " + " | ".join(TASKS) +
            " | prefill ms | tokens/s | speed-up |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['d_prime']} | {r['params']:,} | "
                     f"{100 * r['acc_all']:.1f} % | "
                     + " | ".join(f"{100 * r['acc_' + t]:.0f}" for t in TASKS)
                     + f" | {r['prefill_ms']:.1f} | {r['tokens_per_s']:.0f} | "
                       f"{r['speedup']:.2f}× |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--keeps", type=float, nargs="+", default=[0.75, 0.70])
    p.add_argument("--pretrain-steps", type=int, default=1500)
    p.add_argument("--tune-steps", type=int, default=600)
    p.add_argument("--n-pretrain", type=int, default=3000, help="pretraining examples per task")
    p.add_argument("--n-tune", type=int, default=1000, help="tuning examples per task")
    p.add_argument("--n-test", type=int, default=200, help="test examples per task")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: robust to load)")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny run to check the script")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    if args.quick:
        args.pretrain_steps, args.tune_steps, args.n_pretrain = 60, 30, 200
        args.n_tune, args.n_test, args.repeats = 100, 20, 3
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pat-quality-") as tmp:
        work = Path(tmp)
        data = make_data(work, args.n_pretrain, args.n_tune, args.n_test, args.seed)
        base = pretrain(work, data, args.pretrain_steps, args.seed)
        entries = [("base (no tuning)", "base", base, None)]
        dense_rep = tune(base, data, work / "dense", 1.0, args)
        entries.append(("dense LoRA", "dense LoRA", str(work / "dense"), dense_rep))
        dense = AutoModelForCausalLM.from_pretrained(work / "dense").float().eval()
        calib = calibration_batches(base, data)
        scores = {"activation": activation_scores(dense, calib),
                  "magnitude": magnitude_scores(dense)}
        for keep in args.keeps:
            rep = tune(base, data, work / f"pat{keep}", keep, args)
            pct = round(100 * (1 - rep["kept_width"] / rep["hidden_size"]), 1)
            entries.append((f"PAT {pct:g} %", "PAT", str(work / f"pat{keep}"), rep))
            for crit in CRITERIA:
                folded = prune_to_width(dense, scores[crit], rep["kept_width"])
                path = work / f"{crit}{keep}"
                folded.save_pretrained(path)
                entries.append((f"LoRA→{crit} {pct:g} %", f"LoRA then {crit} pruning",
                                str(path), None))
        rows, models = [], {}
        for name, method, path, rep in entries:
            acc, m = accuracy(path, data, base)
            models[name] = m
            rows.append({"model": name, "method": method, "d_prime": m.config.hidden_size,
                         "params": sum(q.numel() for q in m.parameters()),
                         **{f"acc_{k}": round(v, 4) for k, v in acc.items()},
                         "closing_gap": None if rep is None else rep["losses"]["closing_gap"],
                         "train_s": None if rep is None else rep["timings"]["train_s"]})
            print(f"{name:28s} d'={m.config.hidden_size:4d} acc {100 * acc['all']:5.1f} %",
                  flush=True)
        batch, seq = 32, 64
        ms = prefill_ms(models, batch, seq, args.repeats, len(AutoModelForCausalLM.from_pretrained(
            base).get_input_embeddings().weight))
    ref = ms["dense LoRA"]
    meta = dict(date=dt.datetime.now().isoformat(timespec="seconds"), commit=commit(),
                torch=torch.__version__, threads=args.threads, prefill=f"{batch}x{seq}",
                load_avg_1m=round(os.getloadavg()[0], 2), args=json.dumps(vars(args)))
    for r in rows:
        r.update(prefill_ms=round(ms[r["model"]], 2),
                 tokens_per_s=round(batch * seq / ms[r["model"]] * 1e3, 1),
                 speedup=round(ref / ms[r["model"]], 3), **meta)
    if not args.quick or args.out != str(OUT):
        with (out_dir / "quality.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        (out_dir / "quality.md").write_text(
            f"Measured {meta['date']} at {meta['commit']} (torch {meta['torch']}, "
            f"{args.threads} thread(s), 1-min load average {meta['load_avg_1m']}); prefill = "
            f"{batch} × {seq} tokens.\n\n" + table(rows) + "\n")
        plot(rows, out_dir / "quality.png")
    print(table(rows))
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
