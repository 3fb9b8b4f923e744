"""Structured hidden-channel pruning without pruning-aware training (the baseline of the PAT
quality experiment): score the hidden channels of a (LoRA-merged) model, keep the ``width``
highest-scoring ones, and fold with ``pat.fold`` (HSMs left at the identity: L1 = 0, s = 1).

Criteria:
  activation  Σ_layers mean over calibration tokens of h_{l,i}² (every residual-stream state the
              model exposes as hidden_states: the embedding output and each layer's output)
  magnitude   Σ over every weight matrix of the squared weights on channel i: embedding and
              o_proj/down_proj rows written into the stream, q/k/v/gate/up/lm_head columns read
              from it (RMSNorm gains folded into the columns they scale)
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from dppa_kernels import pat

CRITERIA = ("activation", "magnitude")


@torch.no_grad()
def activation_scores(model: nn.Module, batches: Sequence[dict]) -> torch.Tensor:
    """Per-channel mean squared residual-stream activation, summed over the stream's states."""
    total, tokens = None, 0
    for b in batches:
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                    output_hidden_states=True)
        m = b["attention_mask"].bool()
        # embedding output and every layer's output (transformers 5: before the final norm)
        s = sum(h[m].float().pow(2).sum(0) for h in out.hidden_states)
        total = s if total is None else total + s
        tokens += int(m.sum())
    return total / tokens


@torch.no_grad()
def magnitude_scores(model: nn.Module) -> torch.Tensor:
    """Per-channel squared weight norm over every matrix that writes or reads channel i."""
    bb = model.model
    s = bb.embed_tokens.weight.float().pow(2).sum(0)
    for layer in bb.layers:
        g_in = layer.input_layernorm.weight.float()
        g_post = layer.post_attention_layernorm.weight.float()
        for n in ("q_proj", "k_proj", "v_proj"):
            s += (getattr(layer.self_attn, n).weight.float() * g_in).pow(2).sum(0)
        for n in ("gate_proj", "up_proj"):
            s += (getattr(layer.mlp, n).weight.float() * g_post).pow(2).sum(0)
        s += layer.self_attn.o_proj.weight.float().pow(2).sum(1)
        s += layer.mlp.down_proj.weight.float().pow(2).sum(1)
    s += (model.lm_head.weight.float() * bb.norm.weight.float()).pow(2).sum(0)
    return s


def prune_to_width(model: nn.Module, scores: torch.Tensor, width: int) -> nn.Module:
    """A folded copy of ``model`` keeping the ``width`` highest-scoring hidden channels (ties to
    the lower index). ``model`` is left as it was."""
    d = scores.numel()
    order = torch.sort(scores, descending=True, stable=True).indices
    sign = -torch.ones(d)
    sign[order[:width]] = 1.0
    pat.prepare(model, keep=width, rank=1, total_steps=10, backend="torch")
    try:
        with torch.no_grad():
            pat.get_mask(model).weight.copy_(sign)
        pat.set_step(model, 10)  # a schedule's end: the soft gate is then polarised, no warning
        rep = pat.binarize(model)
        if rep["width"] != width:
            raise ValueError(f"width {width} is not a width this architecture accepts")
        return pat.fold(model, dtype=torch.float32)
    finally:
        pat.remove(model)
