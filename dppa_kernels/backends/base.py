"""The primitives every fast backend implements, and the plan that drives the fused apply pass.

The public ops (``dppa_kernels.ops``) validate inputs, turn methods into these primitives and
check the results' shapes; a backend only has to be fast and exact. All tensors handed to a
backend are contiguous, on the backend's device, of dtype bf16, fp16 or fp32.

NaN/Inf: the inputs are not checked beforehand (a separate pass would cost more than the work it
guards). Instead ``select`` and ``apply`` check them inside their own pass when asked
(``check_finite``) and raise :class:`NonFiniteInput`; the ops confirm the candidates with an
explicit check, which words the user's ``ValueError``. Without the check, non-finite inputs give
unspecified (but memory-safe) results.

Primitives
----------
``select(x, k, partition, block_size, key_dtype, *, check_finite=False) -> (tau_key, c_above, c_eq)``
    For every partition p (see ``reference.threshold``) with keep count ``k[p]`` (int64 tensor of
    length P on the CPU): τ = the k-th largest magnitude key of x rounded to ``key_dtype`` (the
    no-keep key ``1 << key_bits`` when k = 0), c_above = #key > τ, c_eq = #key == τ. Returns three
    int64 CPU tensors of length P. ``check_finite``: raise NonFiniteInput((0,)) when some key of x
    (every partition, k = 0 included) is at or above :func:`nonfinite_key`; a finite x can reach
    it only by overflowing a narrower ``key_dtype``, which the caller then tells apart.

``histogram(x, stats_dtype) -> int64[32768]``
    Histogram of the 15-bit magnitude key of x rounded to ``stats_dtype`` (bf16 or fp16), on the CPU.

``apply(deltas, base, plans, weights, combine, out_dtype, *, check_finite=()) -> Tensor``
    The fused pass. For element e and model i: key_i = key of Δ_i[e] (rounded to the plan's
    key_dtype); factor f_i from the plan (below); v_i = Δ_i[e] · f_i · plan.scale in fp32; then
    the combine of ``CombineSpec`` over w_i · v_i (sum, or TIES sign election + disjoint sum),
    divisor if ``normalize``, × λ, + base[e] (when base is given), one cast to ``out_dtype``.
    ``check_finite``: indices of the inputs to check in the pass (i < M: deltas[i]; M: base), the
    others being known finite; raises NonFiniteInput(candidates) when it saw a NaN/Inf: the checked
    inputs that may hold it. A backend may test each input as it loads it (exact candidates), or
    the fp32 results, where every non-finite input leaves a NaN/Inf (NaN·0 and Inf·0 are NaN;
    then every checked input is a candidate, and an fp32 overflow can also raise it).

``abs_sums(delta, plan) -> (Σ|Δ|, Σ|f·Δ|)`` (floats)
    For mergekit's L1 rescale; f as in apply, without plan.scale.

Optional: ``della_mask(delta, density, epsilon, k1, k2) -> bool tensor`` (see
``reference.sparsify.della_factor``); backends without it get the reference's mask.

Optional: ``select_many(xs, ks, key_dtype, *, check_finite=False) -> (tau_key, c_above, c_eq)``:
``select`` with ``partition="tensor"`` of every tensor of the list ``xs`` (one dtype and device,
small tensors) at keep count ``ks[t]``, in one launch; int64 CPU tensors of length T.
``check_finite``: raise NonFiniteInput(indices of the tensors holding a NaN/Inf key).

Plan kinds (``ApplyPlan.kind``)
-------------------------------
``dense``       f = 1.
``thresholds``  K nested levels per partition: ``tau_key[p, j]`` (non-increasing in j) and, for
                ``tie_mode="exact_k"``, ``budget[p, j]`` = how many elements with key == τ_j are
                kept by level j, taken in flat index order within the partition. Element e is in
                level j iff key > τ_j, or key == τ_j and (``ge``; or ``exact_k`` and its rank
                among the elements of its partition with key == τ_j is < budget[p, j]).
                f = ``factors[j]`` for the smallest such j, 0 if in none. Magnitude pruning is
                K = 1 with factors (1,); DPPA bands are K levels with the band factors; breadcrumbs
                is K = 2 with exact counts and factors (0, 1).
``dare``        keep iff ``rng bits(e) < thr32`` with the stream keys (k1, k2); f = 1 or 0.
``mask``        f = ``mask[e]`` (bool tensor of Δ's shape); used for DELLA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class ApplyPlan:
    kind: str = "dense"
    scale: float = 1.0
    # thresholds
    partition: str = "tensor"
    block_size: Optional[int] = None
    key_dtype: Optional[torch.dtype] = None
    tie_mode: str = "exact_k"
    tau_key: Optional[torch.Tensor] = None  # int64 [P, K]
    budget: Optional[torch.Tensor] = None  # int64 [P, K]
    c_eq: Optional[torch.Tensor] = None  # int64 [P, K]: budget == c_eq means "all ties kept"
    factors: tuple = (1.0,)
    # dare
    k1: int = 0
    k2: int = 0
    thr32: int = 0
    # mask
    mask: Optional[torch.Tensor] = None
    # the select pass that made the plan also checked the delta for NaN/Inf
    finite_checked: bool = False

    def needs_tie_rank(self) -> bool:
        """Whether some level keeps only part of its ties (exact_k with 0 < budget < c_eq)."""
        if self.kind != "thresholds" or self.tie_mode != "exact_k":
            return False
        return bool(((self.budget > 0) & (self.budget < self.c_eq)).any())


class NonFiniteInput(Exception):
    """A backend pass saw a NaN/Inf (key) in the inputs it was asked to check.

    ``inputs``: the candidates' indices (``select``: (0,); ``apply``: deltas 0..M-1, base M)."""

    def __init__(self, inputs):
        self.inputs = tuple(int(i) for i in inputs)
        super().__init__(f"non-finite values in input(s) {self.inputs}")


def nonfinite_key(key_dtype: torch.dtype) -> int:
    """The smallest magnitude key of a NaN/Inf in ``key_dtype`` (Inf's bits; NaN keys lie above)."""
    return {torch.float32: 0x7F800000, torch.bfloat16: 0x7F80, torch.float16: 0x7C00}[key_dtype]


class Backend:
    """Interface; see the module docstring for the semantics of each primitive."""

    name = "abstract"

    def available(self) -> tuple[bool, str]:
        raise NotImplementedError

    def supports(self, device: torch.device) -> bool:
        raise NotImplementedError

    def select(self, x, k, partition, block_size, key_dtype, *, check_finite=False):
        raise NotImplementedError

    def histogram(self, x, stats_dtype):
        raise NotImplementedError

    def apply(self, deltas, base, plans, weights, combine, out_dtype, *, check_finite=()):
        raise NotImplementedError

    def abs_sums(self, delta, plan):
        raise NotImplementedError

    della_mask = None
    select_many = None

    # Whether several levels of one 16-bit-keyed tensor are best planned from one histogram
    # (``plans``): true where the histogram costs about one read (CPU, CUDA shared memory).
    levels_from_histogram = True
