"""Deltas of a fine-tuned model against its base, and how large they are relative to the base."""

from __future__ import annotations

import math
from typing import Mapping

import torch


def state_dict_of(model) -> dict[str, torch.Tensor]:
    """A detached copy of ``model``'s parameters and buffers (safe to modify)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def task_deltas(base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Δ = finetuned − base per floating-point tensor (same names and shapes required)."""
    if set(base) != set(finetuned):
        diff = sorted(set(base) ^ set(finetuned))
        raise ValueError(f"base and finetuned name different tensors, e.g. {diff[:3]}")
    out = {}
    for k, b in base.items():
        f = finetuned[k]
        if f.shape != b.shape:
            raise ValueError(f"tensor {k!r} has shape {tuple(f.shape)} in finetuned, {tuple(b.shape)} in base")
        if b.is_floating_point():
            out[k] = f - b
    return out


def delta_ratio(base: Mapping[str, torch.Tensor], finetuned: Mapping[str, torch.Tensor],
                names=None) -> float:
    """‖Δ‖₂ / ‖W_base‖₂ over the named tensors together (default: every floating tensor)."""
    deltas = task_deltas(base, finetuned)
    names = list(deltas) if names is None else list(names)
    num = sum(float(deltas[n].double().pow(2).sum()) for n in names)
    den = sum(float(base[n].double().pow(2).sum()) for n in names)
    return math.sqrt(num / den) if den > 0 else float("inf")

