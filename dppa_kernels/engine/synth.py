"""Synthetic Llama-shaped model families written as Hugging Face folders (no downloads).

Used by ``dppa demo``, the tests and the benchmark. Base weights ~ N(0, 0.02) (norms ~ 1);
fine-tuned = dtype(base + Δ) with Δ ~ σ·s·z·exp(0.6·z') (a heavy-tailed
scale mixture, so deltas have outliers like real fine-tunes), where the scale s varies per tensor and per model, and zero
deltas are avoided by construction (a delta that rounds to 0 is replaced by one ulp).
"""

from __future__ import annotations

import json
import os
from typing import Iterator, Optional

import torch
from safetensors.torch import save_file


def llama_config(hidden: int, layers: int, inter: int, vocab: int, heads: int = 4, dtype: str = "bfloat16") -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": heads, "vocab_size": vocab, "max_position_embeddings": 256,
            "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": dtype, "hidden_act": "silu",
            "bos_token_id": 1, "eos_token_id": 2, "rope_theta": 10000.0}


def llama_shapes(hidden: int, layers: int, inter: int, vocab: int) -> Iterator[tuple[str, tuple]]:
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            yield p + f"self_attn.{n}_proj.weight", (hidden, hidden)
        yield p + "mlp.gate_proj.weight", (inter, hidden)
        yield p + "mlp.up_proj.weight", (inter, hidden)
        yield p + "mlp.down_proj.weight", (hidden, inter)
        yield p + "input_layernorm.weight", (hidden,)
        yield p + "post_attention_layernorm.weight", (hidden,)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def write_model(path: str, tensors: dict, config: Optional[dict], shard_bytes: int = 1 << 62,
                extra_files: Optional[dict] = None) -> str:
    """Write ``tensors`` as a HF folder: one model.safetensors, or shards + index when larger."""
    os.makedirs(path, exist_ok=True)
    shards, cur, used = [], {}, 0
    for name, t in tensors.items():
        nb = t.numel() * t.element_size()
        if cur and used + nb > shard_bytes:
            shards.append(cur)
            cur, used = {}, 0
        cur[name], used = t.contiguous(), used + nb
    shards.append(cur)
    _write_shards(path, shards)
    _write_side(path, config, extra_files)
    return path


def _write_shards(path: str, shards: list) -> None:
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    wm, total = {}, 0
    for i, sd in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(sd, os.path.join(path, fn), metadata={"format": "pt"})
        for k, t in sd.items():
            wm[k] = fn
            total += t.numel() * t.element_size()
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": wm}, f, indent=1)


def _write_side(path: str, config: Optional[dict], extra_files: Optional[dict]) -> None:
    if config is not None:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f, indent=1)
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": 1, "eos_token_id": 2}, f)
    for fn, text in (extra_files or {}).items():
        with open(os.path.join(path, fn), "w") as f:
            f.write(text)


def _base_tensor(name: str, shape: tuple, g: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    return 0.02 * torch.randn(shape, generator=g)


def _delta(shape: tuple, sigma: float, g: torch.Generator) -> torch.Tensor:
    scale = sigma * float(torch.empty(()).uniform_(0.5, 2.0, generator=g))
    z = torch.randn(shape, generator=g)
    return z.mul_(torch.randn(shape, generator=g).mul_(0.6).exp_()).mul_(scale)  # log-normal scale mixture


def llama_family(root: str, *, hidden: int = 64, layers: int = 2, inter: int = 128, vocab: int = 128,
                 n_ft: int = 3, dtype: torch.dtype = torch.bfloat16, sigma: float = 5e-4, seed: int = 0,
                 shard_bytes: int = 1 << 62) -> tuple[str, list[str]]:
    """Write base + ``n_ft`` fine-tuned models under ``root``; returns (base path, fine-tuned paths).

    Tensors are generated one at a time and written shard by shard, so memory stays at one shard.
    """
    dname = str(dtype).replace("torch.", "")
    cfg = llama_config(hidden, layers, inter, vocab, dtype=dname)
    tok = {"tokenizer_config.json": json.dumps({"model_max_length": 256, "tokenizer_class": "PreTrainedTokenizerFast"})}
    paths = [os.path.join(root, "base")] + [os.path.join(root, f"ft{i}") for i in range(n_ft)]
    shapes = list(llama_shapes(hidden, layers, inter, vocab))
    shards = [[] for _ in paths]
    cur = [{} for _ in paths]
    used = 0
    for j, (name, shape) in enumerate(shapes):
        g = torch.Generator().manual_seed(seed * 1_000_003 + j)
        base = _base_tensor(name, shape, g).to(dtype)
        n = base.numel() * base.element_size()
        if cur[0] and used + n > shard_bytes:
            for k in range(len(paths)):
                shards[k].append(list(cur[k]))
                _flush(paths[k], cur[k], len(shards[k]))
                cur[k] = {}
            used = 0
        used += n
        cur[0][name] = base
        for i in range(n_ft):
            ft = (base.float() + _delta(shape, sigma, g)).to(dtype)
            same = ft == base  # rounding swallowed the delta: move one ulp instead
            if bool(same.any()):
                ft = torch.where(same, torch.nextafter(base, torch.full_like(base, float("inf"))), ft)
            cur[i + 1][name] = ft
    for k, p in enumerate(paths):
        shards[k].append(list(cur[k]))
        _flush(p, cur[k], len(shards[k]))
        _finish(p, shards[k], cfg, tok if k == 0 else None)
    return paths[0], paths[1:]


def _flush(path: str, sd: dict, number: int) -> None:
    os.makedirs(path, exist_ok=True)
    save_file(sd, os.path.join(path, f"part-{number:05d}.tmp"), metadata={"format": "pt"})


def _finish(path: str, shard_names: list, cfg: dict, extra: Optional[dict]) -> None:
    n = len(shard_names)
    wm = {}
    for i, names in enumerate(shard_names):
        src = os.path.join(path, f"part-{i + 1:05d}.tmp")
        if n == 1:
            os.replace(src, os.path.join(path, "model.safetensors"))
            break
        fn = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(src, os.path.join(path, fn))
        wm.update({k: fn for k in names})
    if n > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": wm}, f, indent=1)
    _write_side(path, cfg, extra)
