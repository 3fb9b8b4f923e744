"""PAT benchmark: prefill latency and tokens/s of the folded (smaller dense) model vs the original,
and (on a GPU) the fused HSM op vs the unfused torch reference.

Part 1 (CPU, or --device cuda): a random Llama-shaped model (default d = 1024, 8 layers,
intermediate 2816, 16 heads × 64, vocab 32000); for each pruning ratio the model is prepared, its
PAT parameters set to trained-like values (random L0/L1/s, a W_M with d′ positive entries),
binarised and folded; prefill = one forward over batch × seq tokens with a KV cache and logits for
the last position only (what generation's first step does). Median, p20, p80 over --repeats runs.
d′ is rounded to a multiple of --multiple-of (16 = heads: transformers' LlamaConfig requires
hidden_size % num_attention_heads == 0).

Part 2 (CUDA only, skipped with a message otherwise): HSM forward and forward+backward, Triton
fused vs torch reference, bf16 activations, fp32 parameters (N = 8·256, d = 4096,
r = 200).

Rows are appended to bench/results/pat_cpu.csv (part 1 on CPU), pat_gpu.csv (part 1 on GPU) and
pat_gpu_hsm.csv (part 2), with the machine, torch and transformers versions, the git commit and the
1-minute load average at the start (other processes on a shared machine inflate p80; the variants
are timed round-robin so that such load hits them alike). Not a timed test.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}; {os.cpu_count()} cores; torch threads {torch.get_num_threads()}"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, check=True).stdout.strip()
    except Exception:
        return "unknown"


def timed(fn, repeats: int, warmup: int, device: torch.device) -> list[float]:
    """Wall-clock milliseconds of ``fn()`` per run (CUDA-synchronised on GPU)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    out: list[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def quantiles(ms: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(ms, n=5, method="inclusive") if len(ms) > 1 else [ms[0]] * 4
    return statistics.median(ms), q[0], q[3]


def append_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)


def trained_like(model, d_new: int, seed: int = 0) -> None:
    """Give the PAT parameters of a prepared model non-trivial values; W_M keeps d_new channels."""
    from dppa_kernels import pat

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, h in pat.hsms(model):
            h.l1.copy_(torch.randn(h.l1.shape, generator=g) * 0.05)
            h.scale.copy_(torch.rand(h.scale.shape, generator=g) * 0.2 + 0.9)
        d = h.d
        sign = -torch.ones(d)
        sign[torch.randperm(d, generator=g)[:d_new]] = 1.0
        pat.get_mask(model).weight.copy_(sign * (torch.rand(d, generator=g) * 0.5 + 0.05))


def bench_fold(args, device: torch.device) -> list[dict]:
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    from dppa_kernels import pat

    cfg = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                      intermediate_size=args.inter, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=2 * args.seq)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=torch.float32).eval()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    tokens = args.batch * args.seq

    def prefill(m):
        with torch.inference_mode():
            return m(ids, use_cache=True, logits_to_keep=1).logits

    common = dict(date=dt.datetime.now().isoformat(timespec="seconds"), commit=commit(),
                  machine=machine() if device.type == "cpu" else torch.cuda.get_device_name(),
                  torch=torch.__version__, transformers=transformers.__version__,
                  device=device.type, dtype="fp32", batch=args.batch, seq=args.seq,
                  layers=args.layers, d=args.hidden, intermediate=args.inter,
                  heads=args.heads, vocab=args.vocab,
                  load_avg_1m=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else "")
    n0 = sum(p.numel() for p in model.parameters())
    variants = [("original", 0.0, args.hidden, model, "")]
    for pct in args.prune:
        q = args.multiple_of
        d_new = max(q, round(args.hidden * (1 - pct / 100) / q) * q)
        pat.prepare(model, keep=d_new, rank="auto", total_steps=100, backend="torch")
        trained_like(model, d_new)
        pat.binarize(model)
        folded = pat.fold(model).to(device).eval()
        ref = prefill(model)
        err = float((prefill(folded) - ref).abs().max() / ref.abs().max())
        pat.remove(model)
        variants.append(("folded", 100 * (1 - d_new / args.hidden), d_new, folded, f"{err:.2e}"))
    # round-robin over the variants, so that load from other processes hits all of them alike
    ms = {i: [] for i in range(len(variants))}
    for i, v in enumerate(variants):
        timed(lambda: prefill(v[3]), 0, args.warmup, device)
    for _ in range(args.repeats):
        for i, v in enumerate(variants):
            ms[i] += timed(lambda: prefill(v[3]), 1, 0, device)
    base = quantiles(ms[0])[0]
    rows = []
    for i, (kind, pct, d_new, m, err) in enumerate(variants):
        med, p20, p80 = quantiles(ms[i])
        n = sum(p.numel() for p in m.parameters())
        rows.append(dict(common, model=kind, prune_pct=round(pct, 2), d_prime=d_new, params=n,
                         median_ms=round(med, 2), p20_ms=round(p20, 2), p80_ms=round(p80, 2),
                         tokens_per_s=round(tokens / med * 1e3, 1), speedup=round(base / med, 3),
                         max_rel_err=err))
        print(f"{kind:8s} {pct:5.1f}% d'={d_new:5d}: {n / 1e6:6.1f} M params ({n / n0:.3f}), "
              f"prefill median {med:8.1f} ms [p20 {p20:.1f}, p80 {p80:.1f}], "
              f"{tokens / med * 1e3:8.1f} tok/s, speedup {base / med:.2f}x"
              + (f", folded vs masked rel err {err}" if err else ""))
    return rows


def bench_hsm(args, device: torch.device) -> list[dict]:
    """Fused (Triton) vs reference (torch) HSM, forward and forward+backward."""
    from dppa_kernels.pat import hsm

    n, d, r = args.hsm_tokens, args.hsm_d, args.hsm_rank
    g = torch.Generator(device=device).manual_seed(0)
    y = torch.randn(n, d, device=device, generator=g).to(torch.bfloat16).requires_grad_()
    res = torch.randn(n, d, device=device, generator=g).to(torch.bfloat16)
    l0 = (torch.randn(r, d, device=device, generator=g) / d ** 0.5).requires_grad_()
    l1 = (torch.randn(d, r, device=device, generator=g) * 0.05).requires_grad_()
    s = torch.ones(d, device=device).requires_grad_()
    m = torch.rand(d, device=device, generator=g).requires_grad_()
    dout = torch.randn_like(res)
    rows = []
    for backend in ("triton", "torch"):
        fwd = lambda: hsm(y, l0, l1, s, m, res, backend=backend)  # noqa: E731
        both = lambda: fwd().backward(dout)  # noqa: E731
        for what, fn in (("fwd", fwd), ("fwd+bwd", both)):
            ms = quantiles(timed(fn, args.repeats * 4, args.warmup + 2, device))
            rows.append(dict(date=dt.datetime.now().isoformat(timespec="seconds"), commit=commit(),
                             machine=torch.cuda.get_device_name() if device.type == "cuda"
                             else machine(), torch=torch.__version__, op="hsm", pass_=what,
                             provider=backend, dtype="bf16", tokens=n, d=d, rank=r,
                             median_ms=round(ms[0], 4), p20_ms=round(ms[1], 4),
                             p80_ms=round(ms[2], 4)))
            print(f"hsm {what:8s} {backend:6s} N={n} d={d} r={r}: {ms[0]:.3f} ms")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--inter", type=int, default=2816)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prune", type=float, nargs="+", default=[20, 25, 30])
    p.add_argument("--multiple-of", type=int, default=16)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads (0: torch's default); 1 is robust to other load")
    p.add_argument("--hsm-tokens", type=int, default=8 * 256)
    p.add_argument("--hsm-d", type=int, default=4096)
    p.add_argument("--hsm-rank", type=int, default=200)
    p.add_argument("--skip-fold", action="store_true")
    p.add_argument("--no-write", action="store_true", help="print only (smoke runs)")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help=f"where the CSVs go (default {RESULTS})")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda requested but CUDA is not available", file=sys.stderr)
        return 2
    if not args.skip_fold:
        rows = bench_fold(args, device)
        if not args.no_write:
            append_rows(args.results_dir / f"pat_{device.type if device.type == 'cpu' else 'gpu'}.csv", rows)
    if torch.cuda.is_available():
        rows = bench_hsm(args, torch.device("cuda"))
        if not args.no_write:
            append_rows(args.results_dir / "pat_gpu_hsm.csv", rows)
    elif os.environ.get("TRITON_INTERPRET") == "1" and args.hsm_tokens * args.hsm_d <= 1 << 16:
        bench_hsm(args, torch.device("cpu"))  # smoke run of the GPU part under the interpreter
    else:
        print("HSM fused-vs-reference benchmark skipped: no CUDA device (it needs a GPU)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
