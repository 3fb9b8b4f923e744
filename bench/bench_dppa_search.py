"""The α search on the demo family with the built-in loss evaluator (CPU): wall time and the share
spent outside the evaluator.

Not a test. Builds the ``dppa demo`` family (base + 3 fine-tuned, Llama-shaped, hidden 256,
4 layers, bf16), a character tokenizer and a validation JSONL of ``--examples`` prompt/answer
pairs, then times the two calls a user makes, with default arguments (greedy, at most 20
candidates, the config's merge):

* ``api``: ``DPPA.search(evaluate, model=model)`` with ``evaluate = dppa_kernels.eval.loss`` on
  the validation file. ``search_s`` is that call; ``outside_eval_share`` = 1 − (time inside the
  evaluator) / ``search_s``: building and writing each candidate into the model, and the search's
  own bookkeeping. Building the DPPA (``statistics_s``) and loading the model (``model_load_s``)
  happen once, before the call.
* ``cli``: ``dppa search CONFIG --eval dppa_kernels.eval:loss ...`` in a fresh process, as a user
  runs it; ``total_s`` is the process's wall time (Python start, imports, the statistics pass,
  loading the model, the search, the final ``dppa merge`` and the report), with the parts from
  its ``search_report.json``; ``outside_eval_share_total`` counts all of it.

Appends one row per run to ``--csv`` (default ``bench/results/dppa_search_cpu.csv``) and prints them.

    python bench/bench_dppa_search.py [--max-evals 20] [--examples 256] [--repeats 1] [--skip-cli]
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_e2e as E  # noqa: E402  (append_row and the machine's description)


def make_inputs(root: str, examples: int) -> tuple[str, str, str]:
    """(config, tokenizer folder, validation file) of the demo family under ``root``."""
    from dppa_kernels.demo import DEMO_SHAPE, _pointed, example_config
    from dppa_kernels.engine.synth import llama_family
    from dppa_kernels.tasks.tokenizer import char_tokenizer

    llama_family(root, **DEMO_SHAPE, n_ft=3, shard_bytes=2_000_000, seed=0)
    tok = os.path.join(root, "tok")
    char_tokenizer().save_pretrained(tok)
    data = os.path.join(root, "val.jsonl")
    with open(data, "w") as f:
        for i in range(examples):
            a, b = i % 97, (7 * i) % 89
            f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
    cfg = os.path.join(root, "dppa.yaml")
    with open(cfg, "w") as f:
        yaml.safe_dump(_pointed(example_config("dppa"), root), f, sort_keys=False)
    return cfg, tok, data


def run_api(cfg_path: str, tok: str, data: str, max_evals: int) -> dict:
    """``DPPA.search`` with defaults and the loss evaluator; the model and the DPPA built first."""
    from dppa_kernels.engine.config import load_config
    from dppa_kernels.eval import loss, prepared
    from dppa_kernels.search_cli import build_dppa, eval_model

    prepared.clear()  # as in a new process: the first candidate's evaluation loads the tokenizer and data
    cfg, _ = load_config(cfg_path)
    t = time.perf_counter()
    d, _merge_kw = build_dppa(cfg, device="cpu", backend="auto")  # the demo config's merge is the default one
    t_stats = time.perf_counter() - t
    t = time.perf_counter()
    model = eval_model(cfg.base_model, "cpu", progress=False)
    t_model = time.perf_counter() - t
    evaluate = functools.partial(loss, data=data, tokenizer=tok)
    evaluate.higher_is_better = False
    t = time.perf_counter()
    res = d.search(evaluate, model=model, max_evals=max_evals)
    t_search = time.perf_counter() - t
    n = len(res.table)
    return {"candidates": n, "total_s": t_search, "statistics_s": t_stats, "model_load_s": t_model,
            "search_s": t_search, "eval_s": res.eval_seconds,
            "apply_ms_per_candidate": 1e3 * sum(r["apply_s"] for r in res.table) / n,
            "eval_ms_per_candidate": 1e3 * res.eval_seconds / n,
            "outside_eval_share_search": 1 - res.eval_seconds / t_search, "merge_s": 0.0,
            "outside_eval_share_total": 1 - res.eval_seconds / t_search}


def run_cli(cfg: str, tok: str, data: str, max_evals: int, out: str) -> dict:
    """``dppa search`` in a fresh process; its report's timings and the process's wall time."""
    cmd = [sys.executable, "-m", "dppa_kernels", "search", cfg, "--eval", "dppa_kernels.eval:loss", "--eval-data", data,
           "--tokenizer", tok, "--out", out, "--max-evals", str(max_evals), "--no-progress", "--force"]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t
    rep = json.load(open(os.path.join(out, "search_report.json")))
    tm, n = rep["timings"], len(rep["candidates"])
    return {"candidates": n, "total_s": wall, "statistics_s": tm["statistics_s"], "model_load_s": tm["model_load_s"],
            "search_s": tm["search_s"], "eval_s": tm["eval_s"],
            "apply_ms_per_candidate": 1e3 * sum(c["apply_s"] for c in rep["candidates"]) / n,
            "eval_ms_per_candidate": 1e3 * tm["eval_s"] / n,
            "outside_eval_share_search": tm["outside_eval_share_of_search"], "merge_s": tm["merge_s"],
            "outside_eval_share_total": 1 - tm["eval_s"] / wall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-evals", type=int, default=20, help="the search's max_evals (its default: 20)")
    ap.add_argument("--examples", type=int, default=256, help="validation prompt/answer pairs")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--skip-cli", action="store_true", help="time only the DPPA.search call")
    ap.add_argument("--csv", default=os.path.join(HERE, "results", "dppa_search_cpu.csv"))
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="dppa-search-bench-")
    cfg, tok, data = make_inputs(root, args.examples)
    host = E.machine()
    for rep in range(args.repeats):
        runs = [("api", lambda: run_api(cfg, tok, data, args.max_evals))]
        if not args.skip_cli:
            runs.append(("cli", lambda: run_cli(cfg, tok, data, args.max_evals, os.path.join(root, "best"))))
        for kind, fn in runs:
            load0 = os.getloadavg()[0]
            m = fn()
            row = {"date": dt.datetime.now().isoformat(timespec="seconds"), "run": f"{kind}-{rep}", "call": kind,
                   "examples": args.examples, **{k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()},
                   "load1_start": round(load0, 2), "load1_end": round(os.getloadavg()[0], 2), **host}
            E.append_row(args.csv, row)
            print(", ".join(f"{k}={v}" for k, v in row.items() if k not in host), flush=True)


if __name__ == "__main__":
    main()
