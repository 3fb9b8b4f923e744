"""FusionBench's DARE drop (``param_random_drop_``) on our counter-hash RNG.

FusionBench keeps an element when ``torch.rand_like(param) > sparsity_level``. On the CPU torch
draws a 24-bit uniform u = j / 2**24, rounds it to the parameter's dtype (round to nearest even),
maps a value that rounded up to 1 back to 0, and compares it with ``sparsity_level`` cast to that
dtype. So the keep probability is not exactly 1 − p for 16-bit parameters (bf16, p = 0.1 keeps
89.78 %, not 90 %; p = 0.999 rounds to 1 in bf16 and keeps nothing). :func:`keep_probability`
computes that probability exactly, with torch's own cast and comparison, and the drop keeps each
element independently with it: the masks are equal in distribution to FusionBench's CPU draws, not
equal (the draws come from a different generator). Kept values are then divided by
``1 - sparsity_level`` with the same torch operation FusionBench uses, so they are identical.
"""

from __future__ import annotations

import functools

import torch

from ..ops import prune

GRID_BITS = 24  # torch's CPU uniform: 24 random bits scaled by 2**-24 for every float dtype but fp64
_GRID = 1 << GRID_BITS


def _rounded(j: int, dtype: torch.dtype) -> torch.Tensor:
    """j / 2**24 rounded to ``dtype`` (before the wrap of 1 to 0), non-decreasing in j."""
    return torch.tensor([j / _GRID], dtype=torch.float64).to(torch.float32).to(dtype)


def _first(pred, upto: int) -> int:
    """Smallest j in [0, upto] with pred(j) (upto if none), for pred monotone in j."""
    lo, hi = 0, upto
    while lo < hi:
        mid = (lo + hi) // 2
        if pred(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


@functools.lru_cache(maxsize=256)
def keep_probability(dtype: torch.dtype, sparsity_level: float) -> float:
    """P(torch.rand_like(x) > sparsity_level) for a CPU tensor x of ``dtype`` (a multiple of 2**-24)."""
    # draws j >= wrap round to 1 and become 0; below wrap they increase with j
    wrap = _first(lambda j: bool(_rounded(j, dtype) >= 1), _GRID)
    kept = wrap - _first(lambda j: bool(_rounded(j, dtype) > sparsity_level), wrap)
    if bool(torch.zeros(1, dtype=dtype) > sparsity_level):  # the wrapped draws are 0
        kept += _GRID - wrap
    return kept / _GRID


def random_drop(data: torch.Tensor, sparsity_level: float, rescale: bool, seed: int, backend: str) -> torch.Tensor:
    """FusionBench's ``param_random_drop_`` on a finite tensor: a new tensor (the caller assigns it)."""
    q = keep_probability(data.dtype, float(sparsity_level))
    kept = prune(data, "dare", density=q, seed=seed, check_finite=False, backend=backend)
    if rescale:
        kept = kept / (1 - sparsity_level)  # FusionBench's division, same dtype rules
    return kept
