"""Golden output hashes of ``dppa merge`` and ``dppa-mergekit-yaml`` (no tests here).

A small synthetic Llama family (the demo's generator layout, base + 3 fine-tuned, bf16) is
merged with every method by both commands; the SHA-256 of every output tensor file and of the
index are compared with ``tests/data/golden_outputs.json``, recorded from a reference commit.

The family is built from the package's integer hash RNG (no torch.randn, whose vectorised
paths may differ between processors), so the inputs are the same bytes on every machine; their
digests are recorded too, so a change of the inputs is told apart from a change of the outputs.

To regenerate (only when an output change is intended, or to re-record from a commit):

    git archive <commit> | tar -x -C /tmp/ref              # a scratch copy of the commit
    cp dppa_kernels/*.so dppa_kernels/_build_info.json /tmp/ref/dppa_kernels/   # same C++ sources
    PYTHONPATH=/tmp/ref .venv/bin/python tests/engine_golden.py --write --commit <commit>

The script imports the package found first on ``sys.path`` (the scratch copy above) and uses
only entry points that every recorded commit has.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from typing import Optional

import torch
import yaml

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "golden_outputs.json")
SHAPE = dict(hidden=128, layers=3, inter=512, vocab=640)  # tensors below and above 64 Ki elements
SEED = 7
SHARD = 1_000_000  # several output shards, so the index and the split are compared too
W = [0.7, 0.5, 0.35]
CASES = {  # name: (merge_method, per-model parameters, global parameters, top-level keys)
    "task_arithmetic": ("task_arithmetic", [{"weight": w} for w in W], {"lambda": 0.9}, {}),
    "ties": ("ties", [{"weight": w, "density": d} for w, d in zip(W, (0.2, 0.3, 0.45))], None, {}),
    "ties_fp32_work": ("ties", [{"weight": w, "density": 0.25} for w in W], {"normalize": False},
                       {"dtype": "float32", "out_dtype": "bfloat16"}),
    "dare_linear": ("dare_linear", [{"weight": w, "density": d} for w, d in zip(W, (0.3, 0.5, 0.2))], None, {}),
    "dare_ties": ("dare_ties", [{"weight": w, "density": d} for w, d in zip(W, (0.2, 0.3, 0.25))], None, {}),
    "breadcrumbs": ("breadcrumbs", [{"weight": w, "density": 0.4, "gamma": g} for w, g in zip(W, (0.01, 0.02, 0.05))],
                    None, {}),
    "breadcrumbs_ties": ("breadcrumbs_ties", [{"weight": w, "density": d} for w, d in zip(W, (0.4, 0.5, 0.3))],
                         None, {}),
    "della": ("della", [{"weight": w, "density": d, "epsilon": 0.1} for w, d in zip(W, (0.3, 0.4, 0.5))], None, {}),
    "della_linear": ("della_linear", [{"weight": w, "density": 0.4} for w in W], None, {}),
    "dppa": ("dppa", [{"weight": 1.0, "densities": [0.1, 0.2], "alphas": [1.8, 0.0]},
                      {"weight": 0.7, "densities": [0.15, 0.3], "alphas": [2.0, 0.5]},
                      {"weight": 0.5, "densities": [0.1, 0.25], "alphas": [1.5, 0.0]}],
             {"offset_lambda": 0.05, "tie_mode": "gt"}, {}),
    "dppa_ties": ("dppa_ties", [{"weight": 1.0, "densities": [0.1, 0.2], "alphas": [1.8, 1.0]}] * 3,
                  {"nonunit_mode": "prune", "lambda": 0.8}, {}),
}


def _values(n: int, key: int) -> torch.Tensor:
    """n float32 values in about [-3.5, 3.5] from integer hashing alone (the same bytes on every
    machine): the four bytes of one 32-bit hash summed (a near-normal shape), times a tail factor."""
    from dppa_kernels.reference import rng

    k1, k2 = rng.stream_keys(1234, "golden", key)
    b = rng.random_bits(n, k1, k2)
    s = (b & 255) + ((b >> 8) & 255) + ((b >> 16) & 255) + (b >> 24)  # 0 .. 1020, mean 510
    z = (s.to(torch.float32) - 510.0) / 147.0  # unit variance
    tail = torch.where((b & 0xFF00) == 0, 8.0, 1.0)  # one value in 256: a heavy outlier
    return z * tail


def write_family(root: str) -> tuple[str, list]:
    """Base + 3 fine-tuned bf16 models (fine-tuned = bf16(base + Δ), Δ of about 5e-4)."""
    from dppa_kernels.engine.synth import llama_config, llama_shapes, write_model

    shapes = list(llama_shapes(**SHAPE))
    cfg = llama_config(**SHAPE)
    sds = [{} for _ in range(4)]
    for j, (name, shape) in enumerate(shapes):
        n = 1
        for s in shape:
            n *= s
        v = _values(n, 4 * j).view(shape)
        base = (1.0 + 0.05 * v if len(shape) == 1 else 0.02 * v).to(torch.bfloat16)
        sds[0][name] = base
        for i in range(3):
            d = _values(n, 4 * j + 1 + i).view(shape) * (5e-4 * (1 + i / 2))
            ft = (base.float() + d).to(torch.bfloat16)
            same = ft == base  # a delta rounded away: one ulp instead (no all-zero deltas)
            sds[i + 1][name] = torch.where(same, torch.nextafter(base, torch.full_like(base, 1e9)), ft)
    tok = {"tokenizer_config.json": json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}),
           "tokenizer.json": json.dumps({"version": "1.0"})}
    paths = [os.path.join(root, "base")] + [os.path.join(root, f"ft{i}") for i in range(3)]
    for k, p in enumerate(paths):
        write_model(p, sds[k], cfg, shard_bytes=500_000, extra_files=tok if k == 0 else None)
    return paths[0], paths[1:]


def family_once(folder: str) -> tuple[str, list]:
    """:func:`write_family` into ``folder`` unless an earlier call finished it there."""
    marker = os.path.join(folder, "DONE")
    if not os.path.exists(marker):
        write_family(folder)
        open(marker, "w").close()
    return os.path.join(folder, "base"), [os.path.join(folder, f"ft{i}") for i in range(3)]


def shared_family(tmp_path_factory, name: str) -> tuple:
    """(a fresh folder named ``name`` for a module's configs, base, fine-tuned folders): the family
    is written once per test session, in the session's base temp folder, and shared by the modules."""
    root = tmp_path_factory.mktemp(name)
    base, fts = family_once(str(tmp_path_factory.getbasetemp() / "golden-family"))
    return root, base, fts


def config_of(family: tuple, case: str, fts: Optional[list] = None) -> str:
    """The config of ``case`` over a :func:`shared_family` (other fine-tuned folders if ``fts``)."""
    root, base, own = family
    return write_config(str(root / f"{case}.yml"), case, base, fts or own)


def write_config(path: str, case: str, base: str, fts: list) -> str:
    method, per, glob, top = CASES[case]
    cfg = {"merge_method": method, "base_model": base,
           "models": [{"model": f, "parameters": dict(p)} for f, p in zip(fts, per)]}
    if glob:
        cfg["parameters"] = dict(glob)
    cfg.update(top)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    return path


def digests(folder: str) -> dict:
    """SHA-256 of every tensor file and of the index of an output folder."""
    out = {}
    for fn in sorted(os.listdir(folder)):
        if fn.endswith((".safetensors", ".index.json")):
            with open(os.path.join(folder, fn), "rb") as f:
                out[fn] = hashlib.sha256(f.read()).hexdigest()
    return out


def input_digests(base: str, fts: list) -> dict:
    return {os.path.basename(p): digests(p) for p in [base] + fts}


def run_dppa_merge(cfg: str, out: str, **options) -> dict:
    from dppa_kernels.engine import MergeOptions, run_merge

    run_merge(cfg, MergeOptions(out=out, backend="cpu", shard_size=SHARD, seed=SEED, progress=False, **options))
    return digests(out)


def run_mergekit_fast(cfg: str, out: str) -> dict:
    from dppa_kernels.integrations import mergekit_cli

    ran = mergekit_cli.try_fast([cfg, out, "--quiet", "--random-seed", str(SEED), "--out-shard-size", str(SHARD)])
    if not ran:
        raise RuntimeError(f"dppa-mergekit-yaml did not take its fast path for {cfg}")
    return digests(out)


def record(root: str) -> dict:
    """Every digest of the current package: {"inputs", "dppa_merge", "mergekit_yaml"}."""
    base, fts = write_family(os.path.join(root, "fam"))
    got = {"inputs": input_digests(base, fts), "dppa_merge": {}, "mergekit_yaml": {}}
    for case in CASES:
        cfg = write_config(os.path.join(root, f"{case}.yml"), case, base, fts)
        got["dppa_merge"][case] = run_dppa_merge(cfg, os.path.join(root, f"merge-{case}"))
        got["mergekit_yaml"][case] = run_mergekit_fast(cfg, os.path.join(root, f"mk-{case}"))
    return got


def load_golden() -> dict:
    with open(GOLDEN) as f:
        return json.load(f)


def main() -> None:
    ap = argparse.ArgumentParser(description="record the golden output digests")
    ap.add_argument("--write", action="store_true", help=f"write {os.path.relpath(GOLDEN)}")
    ap.add_argument("--commit", default="unknown", help="the commit the package was taken from")
    args = ap.parse_args()
    import dppa_kernels

    with tempfile.TemporaryDirectory(prefix="dppa-golden-") as root:
        got = record(root)
    print(f"package: {os.path.dirname(dppa_kernels.__file__)}", file=sys.stderr)
    got = {"commit": args.commit, "torch": torch.__version__, **got}
    text = json.dumps(got, indent=1, sort_keys=True) + "\n"
    if args.write:
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            f.write(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
