"""Numbers and the picture of a PAT run: mean task loss on held-out rows, parameter counts, and
the PNG of the losses and the kept-channel count over the optimizer steps."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from .data import ResponseOnlyCollator


@torch.no_grad()
def mean_task_loss(model: nn.Module, features: Sequence[dict], collator: ResponseOnlyCollator,
                   batch_size: int = 16) -> float:
    """Token-weighted mean cross-entropy over the response tokens of ``features``."""
    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(features), batch_size):
        batch = {k: v.to(device) for k, v in collator(features[i:i + batch_size]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        lp = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1),
                                               labels.flatten(), reduction="sum")
        total += float(lp)
        count += int((labels != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied weights counted once)."""
    seen = {id(p): p.numel() for p in model.parameters()}
    return int(sum(seen.values()))


def plot_training(log_history: Sequence[dict], path: Path, target: Optional[int] = None,
                  title: str = "PAT training") -> Optional[Path]:
    """PNG with the task / sparsity / identity losses (left) and the kept-channel count (right)
    per logged optimizer step; None when nothing was logged."""
    rows = [r for r in log_history if "pat_kept" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in (("pat_task_loss", "task loss"), ("pat_sparsity_loss", "sparsity loss"),
                       ("pat_identity_loss", "identity loss")):
        vals = [r.get(key, math.nan) for r in rows]
        ax0.plot(steps, vals, label=label)
    ax0.set_yscale("symlog", linthresh=1e-2)
    ax0.set_xlabel("optimizer step")
    ax0.set_ylabel("loss")
    ax0.legend()
    ax1.plot(steps, [r["pat_kept"] for r in rows], label="kept channels (W_M > 0)")
    if target is not None:
        ax1.axhline(target, color="gray", linestyle="--", label=f"target {target}")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("hidden channels")
    ax1.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
