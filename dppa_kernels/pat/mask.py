"""Unified sparsification mask (USM): one trainable proxy W_M ∈ R^d for all HSMs."""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from .schedule import MaskSchedule

logger = logging.getLogger(__name__)

COUNT_LOSSES = ("code", "paper")
FAR = 0.1  # a soft gate farther than this from its hard 0/1 value counts as not polarised


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
        return self.soft_gate()

    def soft_gate(self) -> torch.Tensor:
        """The scheduled gate at the current step, whether or not the mask is binarised."""
        n, sch = self.step, self.schedule
        w = self.weight.detach() if (n > 0 and sch.frozen(n)) else self.weight
        # torch.clamp passes no gradient where it clamps, as required
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
    def polarization_report(self) -> dict:
        """How far the soft gate (at the current step) is from the hard 0/1 mask keep_i ⇔ W_M,i > 0:
        ``n_far`` channels differ by more than ``FAR``, ``max_gap`` / ``mean_gap`` of
        |m_soft − m_hard|, and the median |W_M| (polarisation drives it to 0.5)."""
        w = self.weight.detach()
        soft = self.soft_gate().detach().float()
        gap = (soft - (w > 0).float()).abs()
        return {"n_far": int((gap > FAR).sum()), "d": int(w.numel()),
                "max_gap": float(gap.max()), "mean_gap": float(gap.mean()),
                "median_abs_w": float(w.abs().median())}

    @torch.no_grad()
    def binarize(self, multiple_of: Optional[int] = None, *, width: Optional[int] = None) -> dict:
        """Freeze the gate to a hard 0/1 mask and return what was chosen.

        Default: keep_i ⇔ W_M,i > 0. ``width`` (d′): keep the ``width`` largest W_M instead (used
        by ``pat.binarize`` to reach a width the architecture accepts). ``multiple_of`` (e.g. 8,
        64, 128): d′ = the nearest multiple (≥ multiple_of, < d) of the count, largest W_M kept.
        Ties among equal W_M go to the lower index (``torch.topk`` order is not relied on).

        Raises on exact zeros of W_M (the STE counts them as kept, the export predicate
        as dropped), and when W_M keeps no channel or all of them (an untrained mask). Logs a
        warning with the numbers when the soft gate is not polarised (any channel more than
        ``FAR`` from its hard value): the hard-masked model then differs from the trained one.
        Returns {"count": #{W_M > 0}, "width": d′, "polarization": ``polarization_report()``}.
        """
        w = self.weight.detach()
        d = w.numel()
        zeros = int((w == 0).sum())
        if zeros:
            raise ValueError(f"the mask proxy W_M has {zeros} exact zeros (of {d}); the "
                             "kept/dropped decision is ambiguous there (train the mask first)")
        keep = w > 0
        count = int(keep.sum())
        if count in (0, d):
            raise ValueError(f"binarisation keeps {count} of {d} channels; a fold needs "
                             "0 < d' < d (is the mask trained?)")
        if multiple_of is not None and width is not None:
            raise ValueError("pass either multiple_of or width, not both")
        if multiple_of is not None:
            if isinstance(multiple_of, bool) or not isinstance(multiple_of, int) or multiple_of < 1:
                raise ValueError(f"multiple_of must be a positive int or None, got {multiple_of!r}")
            if multiple_of >= d:
                raise ValueError(f"multiple_of must be < hidden size {d}, got {multiple_of}")
            q = multiple_of
            width = min(max(round(count / q), 1) * q, (d - 1) // q * q)
        if width is not None:
            if isinstance(width, bool) or not isinstance(width, int) or not 0 < width < d:
                raise ValueError(f"width must be an int in [1, {d - 1}], got {width!r}")
            # stable descending order: equal scores keep the lower channel index
            order = torch.sort(w, descending=True, stable=True).indices
            keep = torch.zeros_like(keep)
            keep[order[:width]] = True
        report = {"count": count, "width": int(keep.sum()),
                  "polarization": self.polarization_report()}
        pol = report["polarization"]
        if pol["n_far"]:
            logger.warning(
                "binarize: the mask is not polarised: %d of %d soft gates are more than %.1f from "
                "0/1 (max |soft - hard| %.3f, mean %.3f; median |W_M| %.3g, polarised is 0.5), so "
                "the hard-masked model differs from the trained one; train longer or give the mask "
                "a larger learning rate", pol["n_far"], d, FAR, pol["max_gap"], pol["mean_gap"],
                pol["median_abs_w"])
        self.hard_keep = keep
        return report

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
