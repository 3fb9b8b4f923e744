"""mergekit-yaml vs dppa-mergekit-yaml, end to end, same machine, same run.

Writes a synthetic bf16 Llama family (base + 3 fine-tuned, ≥ 200M parameters each; Δ = bf16(base
+ N(0, σ) with 1 % heavy outliers) − base, never all-zero), then runs both console scripts on the
same YAML for ties / dare_ties / della at density 0.2 and records wall time and peak RSS (of the
merge process, from wait4). CPU always; ``--cuda`` too when a GPU is visible.

    python bench/bench_mergekit.py [--work DIR] [--hidden 1024 --layers 16] [--out bench/results/...]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

METHODS = ("ties", "dare_ties", "della")
ROOT = Path(__file__).resolve().parents[1]


def write_family(root: Path, hidden: int, layers: int, vocab: int, n: int, seed: int = 0) -> list:
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    inter = int(hidden * 2.75) // 64 * 64
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      vocab_size=vocab, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    cfg.dtype = "bfloat16"
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for k in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{k}.weight"] = (hidden, hidden)
        shapes.update({p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                       p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    n_params = sum(torch.Size(s).numel() for s in shapes.values())
    dirs = [root / f"m{i}" for i in range(n + 1)]
    if all((d / "model.safetensors").exists() for d in dirs):
        return [str(d) for d in dirs], n_params
    g = torch.Generator().manual_seed(seed)
    base = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
    for i, d in enumerate(dirs):
        d.mkdir(parents=True, exist_ok=True)
        if i == 0:
            sd = base
        else:
            sd = {}
            for k, b in base.items():
                noise = torch.randn(b.shape, generator=g) * 1e-3
                noise *= 1 + 9 * (torch.rand(b.shape, generator=g) < 0.01)
                sd[k] = (b.float() + noise).to(torch.bfloat16)
        save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})
        cfg.save_pretrained(str(d))
        del sd
    return [str(d) for d in dirs], n_params


def write_config(path: Path, method: str, dirs: list, density: float) -> None:
    import yaml

    models = [{"model": d, "parameters": {"weight": w, "density": density}}
              for d, w in zip(dirs[1:], (0.5, 0.3, 0.4))]
    path.write_text(yaml.safe_dump({"merge_method": method, "base_model": dirs[0], "models": models,
                                    "dtype": "bfloat16"}))


def timed(cmd: list) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(ROOT))
    out = proc.stdout.read()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd} failed:\n{out.decode()[-3000:]}")
    return wall, ru.ru_maxrss / 1024.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/dppa_bench_mergekit")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "mergekit_cpu.csv"))
    args = ap.parse_args()

    work = Path(args.work)
    dirs, n_params = write_family(work / "family", args.hidden, args.layers, args.vocab, args.models)
    print(f"family: {n_params / 1e6:.0f}M parameters x {args.models + 1} models (bf16)", flush=True)
    from dppa_kernels.backends.registry import resolve

    backend = resolve("auto", torch.device("cpu"))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    flags = ["--no-copy-tokenizer", "--quiet", "--random-seed", "0", "--no-write-model-card"]
    mk = [sys.executable, "-m", "mergekit.scripts.run_yaml"]
    ours = [sys.executable, "-m", "dppa_kernels.integrations.mergekit_cli"]
    rows = []
    for device in devices:
        dev_flags = flags + (["--cuda"] if device == "cuda" else [])
        for method in args.methods.split(","):
            cfg = work / f"{method}.yml"
            write_config(cfg, method, dirs, args.density)
            res = {}
            for tool, cmd in (("mergekit-yaml", mk), ("dppa-mergekit-yaml", ours)):
                out = work / f"out_{tool}_{method}_{device}"
                shutil.rmtree(out, ignore_errors=True)
                res[tool] = timed(cmd + [str(cfg), str(out)] + dev_flags)
                shutil.rmtree(out, ignore_errors=True)
                print(f"{device} {method:10s} {tool:20s} {res[tool][0]:8.1f} s  {res[tool][1]:8.0f} MiB", flush=True)
            (w_mk, r_mk), (w_dk, r_dk) = res["mergekit-yaml"], res["dppa-mergekit-yaml"]
            for tool, (w, r) in res.items():
                rows.append({"device": device, "method": method, "tool": tool, "density": args.density,
                             "params_per_model": n_params, "n_models": args.models, "wall_s": round(w, 2),
                             "peak_rss_mib": round(r), "speedup_vs_mergekit": round(w_mk / w, 2),
                             "rss_vs_mergekit": round(r / r_mk, 3), "cpu_backend": backend,
                             "cpus": os.cpu_count(), "torch": torch.__version__,
                             "machine": platform.processor() or platform.machine()})
            print(f"{device} {method}: speedup {w_mk / w_dk:.1f}x, RSS ratio {r_dk / r_mk:.2f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=list(rows[0]))
        wr.writeheader()
        wr.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
