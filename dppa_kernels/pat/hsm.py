"""Hybrid Sparsification Module: HIO operator D = I + L1·L0, per-channel scale s, shared gate m."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import nn

from .ops import BACKENDS, hsm

IDENTITY_LOSSES = ("code", "paper", "none")
OFFICIAL_RANK = 200  # the official code hard-codes r = 200 (`eff`) for Llama-2-7B/13B


def resolve_rank(rank: Union[int, str], d: int) -> int:
    """``"auto"`` → min(200, max(1, round(0.05·d))); an int must be in [1, d].

    Why this rule: the paper states "≈ 5 % of d" but every Llama-family run it reports (and the
    official code, which hard-codes it) uses r = 200 = ``OFFICIAL_RANK``: d = 4096 (5 % would be
    205), 5120 (256) and 7168 (358). Capping 5 % of d at 200 gives exactly the published rank for
    those models and keeps small models at ≈ 5 % of d (d = 1024 → 51, d = 64 → 3), where 200 would
    exceed d. (Gemma's HIO-300 is not followed: Gemma is not a supported family.)"""
    if rank == "auto":
        return min(OFFICIAL_RANK, max(1, round(0.05 * d)))
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int or 'auto', got {rank!r}")
    if not 1 <= rank <= d:
        raise ValueError(f"rank must be in [1, hidden size {d}], got {rank}")
    return rank


class HSM(nn.Module):
    """out = s ⊙ m ⊙ (y + y L0ᵀ L1ᵀ), inserted before a residual add.

    L0 ∈ R^{r×d} (Kaiming-uniform, a = √5, as nn.Linear), L1 ∈ R^{d×r} (zeros), s ∈ R^d (ones), so
    D = I at initialisation. Variants by ``identity_loss``: ``"code"`` (default: with the scale s),
    ``"paper"`` (D = I + L1 diag(v) L0 with v ∈ R^r = 0 and L1 with random orthonormal columns,
    no s) and ``"none"`` (no s, no v; the ablation without identity loss). Parameters are fp32.
    ``out_dtype`` (default None: y's dtype) chooses the residual precision: torch.float32 makes the
    residual stream fp32 from this HSM on (what the official code did silently); the
    model's Linear layers then need autocast, as in the official bf16-autocast recipe.
    """

    def __init__(self, d: int, rank: int, *, identity_loss: str = "code", backend: str = "auto",
                 out_dtype: Optional[torch.dtype] = None, device=None) -> None:
        super().__init__()
        if identity_loss not in IDENTITY_LOSSES:
            raise ValueError(f"identity_loss must be one of {IDENTITY_LOSSES}, "
                             f"got {identity_loss!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if out_dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"out_dtype (residual_dtype) must be float32, bfloat16, float16 or "
                            f"None, got {out_dtype}")
        kw = dict(dtype=torch.float32, device=device)
        self.variant = identity_loss
        self.backend = backend
        self.out_dtype = out_dtype  # None: the input's dtype (the residual stream keeps its dtype)
        self.l0 = nn.Parameter(torch.empty(rank, d, **kw))
        nn.init.kaiming_uniform_(self.l0, a=math.sqrt(5))
        self.l1 = nn.Parameter(torch.zeros(d, rank, **kw))
        self.scale = nn.Parameter(torch.ones(d, **kw)) if identity_loss == "code" else None
        self.v = None
        if identity_loss == "paper":
            self.v = nn.Parameter(torch.zeros(rank, **kw))
            with torch.no_grad():  # orthonormal columns: L1ᵀL1 = I_r, the paper loss's target
                self.l1.copy_(torch.linalg.qr(torch.randn(d, rank, **kw)).Q)

    @property
    def d(self) -> int:
        return self.l0.shape[1]

    @property
    def rank(self) -> int:
        return self.l0.shape[0]

    def effective_l1(self) -> torch.Tensor:
        """L1 of D = I + L1 L0 (L1·diag(v) for the paper variant)."""
        return self.l1 if self.v is None else self.l1 * self.v

    def forward(self, y: torch.Tensor, m: torch.Tensor,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return hsm(y, self.l0, self.effective_l1(), self.scale, m, residual,
                   out_dtype=self.out_dtype, backend=self.backend)

    def identity_loss(self) -> torch.Tensor:
        """code: mean((L0 L0ᵀ − I_r)²); paper: ‖L0 L0ᵀ − I_r‖_F + ‖L1ᵀ L1 − I_r‖_F (the paper's
        ‖·‖₂ read as the Frobenius norm); none: 0."""
        if self.variant == "none":
            return self.l0.new_zeros(())
        eye = torch.eye(self.rank, dtype=self.l0.dtype, device=self.l0.device)
        g0 = self.l0 @ self.l0.t() - eye
        if self.variant == "code":
            return (g0 ** 2).mean()
        return torch.linalg.matrix_norm(g0) + torch.linalg.matrix_norm(self.l1.t() @ self.l1 - eye)

    def extra_repr(self) -> str:
        return f"d={self.d}, rank={self.rank}, variant={self.variant}, backend={self.backend}"
