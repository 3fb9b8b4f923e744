"""A small CPU-friendly training loop for prompt/answer data (loss on the answer tokens only).

Used both to pretrain a base model on a mix of tasks and to fine-tune one expert per task from
that base. AdamW, linear warm-up then cosine decay, gradient clipping at 1.0. Batches are drawn
by a seeded ``torch.Generator``, so a run is repeatable given the seed (and the thread count, on
which float summation order depends).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..eval.encoding import encode_pair, pad_id, right_padded
from .examples import Example


@dataclass(frozen=True)
class TrainConfig:
    """Optimiser and schedule of :func:`train_model`."""

    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.0
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    seed: int = 0


@dataclass
class TrainResult:
    """Per-step training losses (mean over the batch's answer tokens) and wall time."""

    losses: list = field(default_factory=list)
    seconds: float = 0.0


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def train_model(model, tokenizer, examples: Sequence[Example], cfg: TrainConfig = TrainConfig(), *,
                on_step: Optional[Callable[[int, float], None]] = None) -> TrainResult:
    """Train ``model`` in place on ``examples`` for ``cfg.steps`` optimiser steps; returns the losses.

    Each step draws ``cfg.batch_size`` examples uniformly with replacement. The model is left in
    eval mode. ``on_step(step, loss)`` is called after every step (e.g. for a progress bar).
    """
    if not examples:
        raise ValueError("examples must not be empty")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise ValueError(f"cfg needs steps >= 1, batch_size >= 1 and lr > 0, got {cfg}")
    encoded = [encode_pair(tokenizer, ex.prompt, ex.answer) for ex in examples]
    pad = pad_id(tokenizer)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg))
    result, t0 = TrainResult(), time.perf_counter()
    model.train()
    try:
        for step in range(cfg.steps):
            idx = torch.randint(len(encoded), (cfg.batch_size,), generator=gen).tolist()
            batch = right_padded([encoded[i][0] for i in idx], [encoded[i][1] for i in idx], pad)
            loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            result.losses.append(loss.item())
            if on_step is not None:
                on_step(step, result.losses[-1])
    finally:
        model.eval()
    result.seconds = time.perf_counter() - t0
    return result
