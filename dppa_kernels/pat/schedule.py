"""Temperature/offset schedule of PAT's unified sparsification mask.

Step convention: ``n`` is the index of the optimizer update that the current forward/backward
contributes to, counted from 1 (HF Trainer: ``state.global_step + 1`` at ``on_step_begin``).
n = 0 means "no update yet" (an untrained model: τ = 1, β = 0.5, so the gate is exactly 1 with
W_M = 0). The official code evaluates the mask one update late (it reads the counter before the
trainer increments it, defect B9); with this convention the first update sees n = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class MaskSchedule:
    """τ(n) = 1 / (1 − ln(max(n, 1)) / ln(n0) + eps),  β(n) = max(beta0 − n / n0, 0).

    n0 is ``n0`` if given, else ``round(s0_fraction · total_steps)`` (code: n0 = 10 000 for ≈ 30 k
    steps, i.e. ⅓). ``freeze`` (code default 0.8): from n_f = ⌊freeze · n0⌋ on, τ is held at τ(n_f)
    and W_M is detached (the mask stops learning). ``freeze=None`` is the paper variant: no freeze,
    τ = 1/eps for n ≥ n0. The gate argument is clamped from below at ``clamp_min``
    (−10: gate ≥ 4.5e-5)
    and binarisation (τ = 1e6, β = 0, rounded) is exactly keep_i ⇔ W_M,i > 0, since
    sigmoid(τ·w) > 0.5 ⇔ w > 0 for any τ > 0; it is implemented as that predicate.
    """

    total_steps: Optional[int] = None
    n0: Optional[int] = None
    s0_fraction: float = 1.0 / 3.0
    freeze: Optional[float] = 0.8
    beta0: float = 0.5
    eps: float = 1e-6
    clamp_min: float = -10.0

    def __post_init__(self) -> None:
        for name in ("total_steps", "n0"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be a positive int or None, got {v!r}")
        if not 0.0 < self.s0_fraction <= 1.0:
            raise ValueError(f"s0_fraction must be in (0, 1], got {self.s0_fraction}")
        if self.freeze is not None and not 0.0 < self.freeze <= 1.0:
            raise ValueError(f"freeze must be in (0, 1] or None, got {self.freeze}")
        if not 0.0 <= self.beta0 <= 1.0:
            raise ValueError(f"beta0 must be in [0, 1], got {self.beta0}")
        if not self.eps > 0.0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if not self.clamp_min < 0.0:
            raise ValueError(f"clamp_min must be < 0, got {self.clamp_min}")

    @property
    def length(self) -> int:
        """n0, the schedule length in optimizer steps."""
        if self.n0 is not None:
            n0 = self.n0
        elif self.total_steps is not None:
            n0 = round(self.s0_fraction * self.total_steps)
        else:
            raise ValueError("the mask schedule length is unknown: pass total_steps or n0 to "
                             "pat.prepare / MaskSchedule (the trainer callback sets it from "
                             "max_steps)")
        if n0 < 2:
            raise ValueError(f"the mask schedule length n0 must be >= 2 (ln(n0) divides), got {n0}"
                             + ("" if self.n0 is not None else
                                f" from total_steps={self.total_steps} (n0 = "
                                f"{self.s0_fraction:.3g}·total_steps): train for more steps"))
        return n0

    @property
    def freeze_step(self) -> Optional[int]:
        """n_f = ⌊freeze · n0⌋, or None for the paper variant."""
        return None if self.freeze is None else max(1, math.floor(self.freeze * self.length))

    def frozen(self, n: int) -> bool:
        """Whether W_M is detached at step n (code variant, n ≥ n_f)."""
        nf = self.freeze_step
        return nf is not None and n >= nf

    def _raw_tau(self, n: int) -> float:
        return 1.0 / (1.0 - math.log(max(n, 1)) / math.log(self.length) + self.eps)

    def tau(self, n: int) -> float:
        """Temperature τ(n) with the freeze (code) or the 1/eps tail (paper) applied."""
        if n <= 0:
            return 1.0
        nf = self.freeze_step
        if nf is not None:
            return self._raw_tau(min(n, nf))
        return 1.0 / self.eps if n >= self.length else self._raw_tau(n)

    def beta(self, n: int) -> float:
        """Offset β(n) = max(beta0 − n / n0, 0)."""
        if n <= 0:
            return self.beta0
        return max(self.beta0 - n / self.length, 0.0)

    def with_total_steps(self, total_steps: int) -> "MaskSchedule":
        """A copy with ``total_steps`` set (used by the trainer callback)."""
        from dataclasses import replace

        return replace(self, total_steps=total_steps)
