"""End-to-end ``dppa search`` on the demo family (CPU): wall time and the share outside the evaluator.

Builds the ``dppa demo`` family (base + 3 fine-tuned, Llama-shaped, hidden 256, 4 layers), a
character tokenizer and a validation JSONL of prompt/answer pairs, then runs the search with the
built-in loss evaluator (``dppa_kernels.eval:loss``) for ``--max-evals`` candidates (grid
strategy, so exactly that many are evaluated) and writes the best merge. Prints one CSV row:

    candidates, total_s, statistics_s, search_s, eval_s, outside_eval_share, merge_s, load_1min

    python bench/bench_dppa_search.py [--max-evals 20] [--examples 256] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import yaml


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-evals", type=int, default=20)
    ap.add_argument("--examples", type=int, default=256, help="validation prompt/answer pairs")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--strategy", default="grid")
    args = ap.parse_args()
    from dppa_kernels.demo import DEMO_SHAPE, _pointed, example_config
    from dppa_kernels.engine.synth import llama_family
    from dppa_kernels.search_cli import run_search
    from dppa_kernels.tasks.tokenizer import char_tokenizer

    root = tempfile.mkdtemp(prefix="dppa-search-bench-")
    llama_family(root, **DEMO_SHAPE, n_ft=3, shard_bytes=2_000_000, seed=0)
    char_tokenizer().save_pretrained(os.path.join(root, "tok"))
    data = os.path.join(root, "val.jsonl")
    with open(data, "w") as f:
        for i in range(args.examples):
            a, b = i % 97, (7 * i) % 89
            f.write(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n")
    cfg = os.path.join(root, "dppa.yaml")
    with open(cfg, "w") as f:
        yaml.safe_dump(_pointed(example_config("dppa"), root), f, sort_keys=False)
    rep = run_search(cfg, eval_ref="dppa_kernels.eval:loss", out=os.path.join(root, "best"), strategy=args.strategy,
                     max_evals=args.max_evals, device=args.device, eval_data=data,
                     tokenizer=os.path.join(root, "tok"), progress=False)
    t = rep["timings"]
    outside = (t["total_s"] - t["eval_s"]) / t["total_s"]
    print("candidates,total_s,statistics_s,search_s,eval_s,outside_eval_share_total,outside_eval_share_search,"
          "merge_s,load_1min")
    print(f"{len(rep['candidates'])},{t['total_s']:.2f},{t['statistics_s']:.2f},{t['search_s']:.2f},{t['eval_s']:.2f},"
          f"{outside:.3f},{t['outside_eval_share_of_search']:.3f},{t['merge_s']:.2f},{os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
