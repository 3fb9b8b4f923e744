"""mergekit-yaml vs dppa-mergekit-yaml, end to end, same machine, same run.

Writes a synthetic bf16 Llama family (base + 3 fine-tuned, ≥ 200M parameters each; Δ = bf16(base
+ N(0, σ) with 1 % heavy outliers) − base, never all-zero; reused when already in --work), then
runs on the same YAML, for ties / dare_ties / della at density 0.2: ``mergekit-yaml``,
``dppa-mergekit-yaml`` (its fast path: our streaming engine, checked with ``-v``) and
``dppa-mergekit-yaml --no-fast-path`` (mergekit's pipeline with our backend); records wall time
and peak RSS (of the merge process, from wait4; with ``--repeat N`` the fastest of N interleaved
rounds, for a machine shared with other jobs) and checks that the two dppa paths wrote
bit-identical tensors. CPU always; ``--cuda`` too when a GPU is visible. Rows are appended to the
CSV (column ``path``: mergekit, fast or fallback).

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


def timed(cmd: list) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, output) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(ROOT))
    out = proc.stdout.read()
    _, status, ru = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd} failed:\n{out.decode()[-3000:]}")
    return wall, ru.ru_maxrss / 1024.0, out.decode(errors="replace")


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two merge outputs hold the same tensors, bit for bit (read one tensor at a time)."""
    from safetensors import safe_open

    def index(out: Path) -> dict:
        where = {}
        for f in sorted(out.glob("*.safetensors")):
            with safe_open(str(f), "pt") as s:
                where.update(dict.fromkeys(s.keys(), f))
        return where

    ia, ib = index(a), index(b)
    if ia.keys() != ib.keys():
        return False
    for k in ia:
        with safe_open(str(ia[k]), "pt") as fa, safe_open(str(ib[k]), "pt") as fb:
            x, y = fa.get_tensor(k), fb.get_tensor(k)
            if x.dtype != y.dtype or not torch.equal(x, y):
                return False
    return True


def warm(dirs: list) -> None:
    """Read every input file once so that every tool starts with the same (warm) page cache."""
    for d in dirs:
        for f in Path(d).iterdir():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def append_rows(path: Path, rows: list) -> None:
    """Append to the CSV, keeping its rows; rows of the older layout (no ``path`` column, when
    dppa-mergekit-yaml had only the mergekit path) get path mergekit / fallback."""
    old = []
    if path.exists():
        with open(path, newline="") as f:
            old = list(csv.DictReader(f))
        for r in old:
            r.setdefault("path", "mergekit" if r.get("tool") == "mergekit-yaml" else "fallback")
    fields = list(rows[0])
    for r in old:
        fields += [k for k in r if k not in fields]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=fields)
        wr.writeheader()
        wr.writerows(old + rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/dppa_bench_mergekit")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--density", type=float, default=0.2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of all tools per method (interleaved); records the fastest wall, the largest RSS")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "mergekit_cpu.csv"))
    args = ap.parse_args()

    work = Path(args.work)
    dirs, n_params = write_family(work / "family", args.hidden, args.layers, args.vocab, args.models)
    print(f"family: {n_params / 1e6:.0f}M parameters x {args.models + 1} models (bf16)", flush=True)
    from dppa_kernels.backends.registry import resolve

    backend = resolve("auto", torch.device("cpu"))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    flags = ["--no-copy-tokenizer", "--quiet", "--random-seed", "0", "--no-write-model-card"]
    ours = [sys.executable, "-m", "dppa_kernels.integrations.mergekit_cli"]
    tools = (("mergekit-yaml", "mergekit", [sys.executable, "-m", "mergekit.scripts.run_yaml"], []),
             ("dppa-mergekit-yaml", "fast", ours, ["-v"]),
             ("dppa-mergekit-yaml --no-fast-path", "fallback", ours, ["--no-fast-path"]))
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    rows = []
    warm(dirs)
    for device in devices:
        dev_flags = flags + (["--cuda"] if device == "cuda" else [])
        for method in args.methods.split(","):
            cfg = work / f"{method}.yml"
            write_config(cfg, method, dirs, args.density)
            res, outs, identical = {}, {}, None
            for rnd in range(args.repeat):
                for tool, path, cmd, extra in tools:
                    out = outs[path] = work / f"out_{path}_{method}_{device}"
                    shutil.rmtree(out, ignore_errors=True)
                    wall, rss, log = timed(cmd + [str(cfg), str(out)] + dev_flags + extra)
                    if path == "fast" and "fast path:" not in log:
                        raise RuntimeError(f"dppa-mergekit-yaml did not take the fast path:\n{log[-2000:]}")
                    _, w0, r0 = res.get(path, (tool, wall, rss))
                    res[path] = (tool, min(w0, wall), max(r0, rss))
                    print(f"{device} {method:10s} {tool:36s} {wall:8.1f} s  {rss:8.0f} MiB  (round {rnd + 1})",
                          flush=True)
                if identical is None:
                    identical = same_tensors(outs["fast"], outs["fallback"])
                for out in outs.values():
                    shutil.rmtree(out, ignore_errors=True)
                if not identical:
                    raise RuntimeError(f"{method}: fast path and fallback tensors differ")
            _, w_mk, r_mk = res["mergekit"]
            for path, (tool, w, r) in res.items():
                rows.append({"device": device, "method": method, "tool": tool, "density": args.density,
                             "params_per_model": n_params, "n_models": args.models, "wall_s": round(w, 2),
                             "peak_rss_mib": round(r), "speedup_vs_mergekit": round(w_mk / w, 2),
                             "rss_vs_mergekit": round(r / r_mk, 3), "cpu_backend": backend,
                             "cpus": os.cpu_count(), "torch": torch.__version__,
                             "machine": platform.processor() or platform.machine(), "path": path,
                             "fast_equals_fallback": identical if path != "mergekit" else "", "date": stamp,
                             "repeats": args.repeat})
            print(f"{device} {method}: fast {w_mk / res['fast'][1]:.1f}x, fallback {w_mk / res['fallback'][1]:.1f}x "
                  f"faster than mergekit-yaml; fast == fallback: {identical}", flush=True)
    append_rows(Path(args.out), rows)
    print(f"appended {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
