"""Shared helpers of the mergekit integration tests (no tests here): tiny synthetic Llama model
families written as Hugging Face folders, and runners for plain and accelerated mergekit."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

mergekit = pytest.importorskip("mergekit", reason="mergekit is not installed")

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU: --cuda variant needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
ROOT = Path(__file__).resolve().parents[1]


def llama_shapes(hidden: int, layers: int, vocab: int) -> dict:
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (hidden // 2, hidden),
            p + "self_attn.v_proj.weight": (hidden // 2, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (2 * hidden, hidden), p + "mlp.up_proj.weight": (2 * hidden, hidden),
            p + "mlp.down_proj.weight": (hidden, 2 * hidden), p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,)})
    return shapes


def write_family(root: Path, *, n: int = 2, dtype=torch.float32, hidden: int = 64, layers: int = 2,
                 vocab: int = 64, quantised: bool = False, seed: int = 0) -> list:
    """Base (m0) + n fine-tuned models. Deltas: Gaussian with 1 % heavy outliers (never zero
    tensors); ``quantised`` puts base and deltas on a 2^-12 grid, so |Δ| has many exact ties while
    every fp32 sum stays exact."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                      tie_word_embeddings=False, architectures=["LlamaForCausalLM"])
    cfg.dtype = str(dtype).replace("torch.", "")
    g = torch.Generator().manual_seed(seed)
    shapes = llama_shapes(hidden, layers, vocab)
    grid = 2.0 ** 12
    base = {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}
    if quantised:
        base = {k: torch.round(v * grid) / grid for k, v in base.items()}
    dirs = []
    for i in range(n + 1):
        sd = {}
        for k, v in base.items():
            if i == 0:
                sd[k] = v
                continue
            d = torch.randn(v.shape, generator=g) * 1e-3
            d = d * (1 + 20 * (torch.rand(v.shape, generator=g) < 0.01))
            if quantised:
                d = torch.round(d * grid / 2) * 2 / grid  # coarse grid: many ties
            sd[k] = v + d
        out = root / f"m{i}"
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.to(dtype).contiguous() for k, v in sd.items()}, str(out / "model.safetensors"),
                  metadata={"format": "pt"})
        cfg.save_pretrained(str(out))
        dirs.append(str(out))
    return dirs


def config(method: str, dirs: list, params: list, global_params: dict = None, dtype: str = None) -> dict:
    cfg = {"merge_method": method, "base_model": dirs[0],
           "models": [{"model": d, "parameters": p} for d, p in zip(dirs[1:], params)]}
    if global_params:
        cfg["parameters"] = global_params
    if dtype:
        cfg["dtype"] = dtype
    return cfg


def options(**kw):
    from mergekit.options import MergeOptions

    kw.setdefault("quiet", True)
    kw.setdefault("copy_tokenizer", False)
    kw.setdefault("write_model_card", False)
    return MergeOptions(**kw)


def run(cfg: dict, out: Path, *, ours: bool, **opts) -> dict:
    """Merge in-process with plain mergekit or with our backend; returns the output tensors."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge as mk_run_merge

    from dppa_kernels.integrations.mergekit import run_merge

    mc = MergeConfiguration.model_validate(cfg)
    (run_merge if ours else mk_run_merge)(mc, str(out), options(**opts))
    return load(out)


def load(out: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted(Path(out).glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    return tensors


def run_cli(args: list, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout,
                         cwd=str(ROOT))
    assert res.returncode == 0, f"{args} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res
