"""Unified sparsification mask (USM): one trainable proxy W_M ∈ R^d for all HSMs (PAT.md §4)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .schedule import MaskSchedule

COUNT_LOSSES = ("code", "paper")


def ste_step(w: torch.Tensor) -> torch.Tensor:
    """1[w ≥ 0] forward, identity backward (straight-through). ≥ as in the code: the predicate
    decides the direction of the first updates from W_M = 0."""
    return (w >= 0).to(w.dtype) + w - w.detach()


def polarization(w: torch.Tensor) -> torch.Tensor:
    """mean((w[w > 0] − 0.5)²) + mean((w[w ≤ 0] + 0.5)²); the mean of an empty selection is 0
    (the code logs NaN at step 0)."""
    pos = w > 0
    loss = w.new_zeros(())
    if pos.any():
        loss = loss + ((w[pos] - 0.5) ** 2).mean()
    if (~pos).any():
        loss = loss + ((w[~pos] + 0.5) ** 2).mean()
    return loss


class UnifiedMask(nn.Module):
    """Shared gate m(n) = sigmoid(max(τ(n)·W_M, clamp_min)) + β(n), W_M initialised to 0.

    ``target`` is N_target = d′, the number of channels to keep. ``step`` is the schedule step
    (see ``MaskSchedule`` for the convention); it and the binarised keep set are saved in the
    state dict as extra state. After ``binarize()`` the gate is exactly 1 on kept channels and 0
    elsewhere (τ → ∞, β = 0, rounded).
    """

    def __init__(self, d: int, target: int, schedule: Optional[MaskSchedule] = None, *,
                 count_loss: str = "code", count_weight: Optional[float] = None,
                 polarization: bool = True, device=None) -> None:
        super().__init__()
        if count_loss not in COUNT_LOSSES:
            raise ValueError(f"count_loss must be one of {COUNT_LOSSES}, got {count_loss!r}")
        self.weight = nn.Parameter(torch.zeros(d, dtype=torch.float32, device=device))
        self.target = int(target)
        self.schedule = schedule if schedule is not None else MaskSchedule()
        self.count_loss_kind = count_loss
        # code: 10·|count − N|/N; paper: |N − count| with weight 1
        self.count_weight = (10.0 if count_loss == "code" else 1.0) if count_weight is None \
            else float(count_weight)
        self.use_polarization = bool(polarization)
        self.step = 0
        self.hard_keep: Optional[torch.Tensor] = None  # bool [d] once binarised

    @property
    def binarized(self) -> bool:
        return self.hard_keep is not None

    def gate(self) -> torch.Tensor:
        """The gate m ∈ R^d (fp32) at the current step; differentiable in W_M unless frozen."""
        if self.hard_keep is not None:
            return self.hard_keep.to(device=self.weight.device, dtype=self.weight.dtype)
        n, sch = self.step, self.schedule
        w = self.weight.detach() if (n > 0 and sch.frozen(n)) else self.weight
        # torch.clamp passes no gradient where it clamps, as required (PAT.md §4)
        return torch.sigmoid(torch.clamp(sch.tau(n) * w, min=sch.clamp_min)) + sch.beta(n)

    def count_loss(self) -> torch.Tensor:
        """code: w·|Σ STE(W_M) − N| / N (w = 10); paper: w·|N − Σ 1(kept)| (w = 1), where the
        paper's 1(m_i > 0) is read as the binarised gate with a straight-through gradient (taken
        literally it is constant: the gate is ≥ 4.5e-5 > 0 everywhere)."""
        w = self.weight.detach() if (self.step > 0 and self.schedule.frozen(self.step)) \
            else self.weight
        count = ste_step(w).sum()
        diff = (count - self.target).abs()
        if self.count_loss_kind == "code":
            diff = diff / self.target
        return self.count_weight * diff

    def sparsity_loss(self) -> torch.Tensor:
        """Count loss plus (if enabled) the polarisation term, once per forward."""
        loss = self.count_loss()
        if self.use_polarization:
            w = self.weight.detach() if (self.step > 0 and self.schedule.frozen(self.step)) \
                else self.weight
            loss = loss + polarization(w)
        return loss

    def num_active(self) -> int:
        """Channels kept at export: #{i : W_M,i > 0} (or the binarised keep set)."""
        if self.hard_keep is not None:
            return int(self.hard_keep.sum())
        return int((self.weight.detach() > 0).sum())

    @torch.no_grad()
    def binarize(self, multiple_of: Optional[int] = None) -> None:
        """Freeze the gate to a hard 0/1 mask: keep_i ⇔ W_M,i > 0.

        Raises on exact zeros of W_M (PAT.md §4: the STE counts them as kept, the export predicate
        as dropped). With ``multiple_of`` (e.g. 8, 64, 128), d′ is rounded to the nearest multiple
        (≥ multiple_of, < d) by keeping the d′ largest W_M; fold and masked model then agree.
        """
        w = self.weight.detach()
        d = w.numel()
        zeros = int((w == 0).sum())
        if zeros:
            raise ValueError(f"the mask proxy W_M has {zeros} exact zeros (of {d}); the "
                             "kept/dropped decision is ambiguous there (train the mask first)")
        keep = w > 0
        if multiple_of is not None:
            if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
                raise ValueError(f"multiple_of must be a positive int or None, got {multiple_of!r}")
            if multiple_of >= d:
                raise ValueError(f"multiple_of must be < hidden size {d}, got {multiple_of}")
            k = int(keep.sum())
            q = multiple_of
            k = min(max(round(k / q), 1) * q, (d - 1) // q * q)
            keep = torch.zeros_like(keep)
            keep[torch.topk(w, k, sorted=False).indices] = True
        if not bool(keep.any()) or bool(keep.all()):
            raise ValueError(f"binarisation keeps {int(keep.sum())} of {d} channels; a fold needs "
                             "0 < d' < d (is the mask trained?)")
        self.hard_keep = keep

    def unbinarize(self) -> None:
        """Return to the soft, scheduled gate."""
        self.hard_keep = None

    def keep_indices(self) -> torch.Tensor:
        """Sorted indices of the kept channels (binarised mask required)."""
        if self.hard_keep is None:
            raise ValueError("the mask is not binarised: call pat.binarize(model) first")
        return torch.nonzero(self.hard_keep, as_tuple=False).flatten()

    def get_extra_state(self) -> dict:
        keep = None if self.hard_keep is None else self.hard_keep.cpu()
        return {"step": self.step, "hard_keep": keep}

    def set_extra_state(self, state: dict) -> None:
        self.step = int(state.get("step", 0))
        keep = state.get("hard_keep")
        self.hard_keep = None if keep is None else keep.to(self.weight.device)

    def extra_repr(self) -> str:
        return (f"d={self.weight.numel()}, target={self.target}, step={self.step}, "
                f"count_loss={self.count_loss_kind}, binarized={self.binarized}")
