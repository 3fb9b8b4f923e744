"""Exact magnitude thresholds, keep counts and magnitude masks (the reference definitions).

Magnitude keys
    The key of an element is the bit pattern of x with the sign bit cleared, read as an unsigned
    integer: 15 bits for bf16/fp16, 31 for fp32, 63 for fp64. It is monotone in |x|, exact, and
    the same on every backend. -0 and +0 both have key 0. A "key dtype" other than the tensor's
    dtype means the key is taken from x rounded to that dtype (DPPA's ``stats_dtype``).

Partitions (``partition=``)
    ``"tensor"``: the whole tensor; ``"row"``: every vector along the last dimension
    (``x.reshape(-1, x.shape[-1])``; a 1-D tensor is one row); ``"block"``: contiguous runs of
    ``block_size`` elements of the flattened tensor (the last one may be shorter).

Keep counts (``count_rule=``), for a partition of n elements and density d
    ``"floor"``  k = floor(d·n)                      (mergekit ``int(density * numel)``, PEFT)
    ``"min1"``   k = max(1, floor(d·n)) when d > 0    (mergekit 0.1.5 ``magnitude``)
    ``"dppa"``   k = n − floor(n·(1 − d))            (DPPA: prune floor(n·s) elements)

Threshold and tie rules (``tie_mode=``); τ is the k-th largest key of the partition
    ``"exact_k"`` keep key > τ, plus the first (k − #{key > τ}) elements with key == τ in flat
                  index order: exactly k kept, deterministic. Equivalently: keep the first k of
                  the order (key descending, index ascending).
    ``"ge"``      keep key ≥ τ (≥ k kept; TIES reference / FusionBench style).
    ``"gt"``      keep key > τ (≤ k kept; the DPPA paper's "prune every |x| ≤ τ").
    With k = 0 nothing is kept in every mode (τ is +inf). With d ≥ 1 everything is kept in every
    mode (the official DPPA code still prunes the minima at d = 1: ``density1_prunes_min=True``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..vocab import COUNT_RULES, PARTITIONS, TIE_MODES, partition_geometry  # noqa: F401  (re-exported)

_INT_VIEW = {
    torch.bfloat16: (torch.int16, 0x7FFF),
    torch.float16: (torch.int16, 0x7FFF),
    torch.float32: (torch.int32, 0x7FFFFFFF),
    torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF),
}


def key_bits(dtype: torch.dtype) -> int:
    """Number of bits of the magnitude key of ``dtype``."""
    return {torch.bfloat16: 15, torch.float16: 15, torch.float32: 31, torch.float64: 63}[dtype]


def no_keep_key(dtype: torch.dtype) -> int:
    """The threshold key meaning "keep nothing": one above the largest key."""
    return 1 << key_bits(dtype)


def magnitude_keys(x: torch.Tensor, key_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """int64 magnitude keys of ``x`` (rounded to ``key_dtype`` first when given)."""
    kd = key_dtype or x.dtype
    xv = x if x.dtype == kd else x.to(kd)
    int_dtype, mask = _INT_VIEW[kd]
    bits = xv.contiguous().view(int_dtype).to(torch.int64)
    return bits & mask


def key_to_value(key: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`magnitude_keys` for non-negative keys; the no-keep key maps to +inf."""
    int_dtype, _ = _INT_VIEW[dtype]
    key = key.to(torch.int64)
    too_big = key >= no_keep_key(dtype)
    out = key.clamp(max=no_keep_key(dtype) - 1).to(int_dtype).view(dtype).clone()
    out[too_big] = float("inf")
    return out


def keep_count(n: int, density: float, count_rule: str = "floor") -> int:
    """Number of elements kept in a partition of ``n`` elements (see the module docstring)."""
    if density >= 1.0:
        return n
    if density <= 0.0 or n == 0:
        return 0
    if count_rule == "floor":
        return int(math.floor(density * n))
    if count_rule == "min1":
        return max(1, int(math.floor(density * n)))
    if count_rule == "dppa":
        return n - int(math.floor(n * (1.0 - density)))
    raise ValueError(f"count_rule must be one of {COUNT_RULES}, got {count_rule!r}")


def partition_view(
    flat: torch.Tensor, shape: Sequence[int], partition: str, block_size: Optional[int]
) -> list[tuple[int, int]]:
    """(start, length) of every partition of the flattened tensor, in order (``vocab.partition_geometry``)."""
    n = flat.numel()
    length, parts = partition_geometry(shape, partition, block_size)
    return [(p * length, min(length, n - p * length)) for p in range(parts)]


def select_partition(keys: torch.Tensor, k: int, key_dtype: torch.dtype) -> tuple[int, int, int]:
    """(τ, c_above, c_eq) of one partition: τ is the k-th largest key (sort-based definition)."""
    n = keys.numel()
    if k <= 0 or n == 0:
        return no_keep_key(key_dtype), 0, 0
    tau = int(torch.sort(keys, descending=True).values[k - 1])
    return tau, int((keys > tau).sum()), int((keys == tau).sum())


def rank_desc(keys: torch.Tensor) -> torch.Tensor:
    """Rank of every element in the order (key descending, flat index ascending)."""
    order = torch.sort(-keys, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(keys.numel(), device=keys.device)
    return ranks


def kept_in_partition(keys: torch.Tensor, k: int, tie_mode: str, key_dtype: torch.dtype) -> torch.Tensor:
    """Boolean keep mask of one partition for keep count k under ``tie_mode``."""
    tau, _, _ = select_partition(keys, k, key_dtype)
    if tie_mode == "gt":
        return keys > tau
    if tie_mode == "ge":
        return keys >= tau
    if tie_mode == "exact_k":
        return rank_desc(keys) < k
    raise ValueError(f"tie_mode must be one of {TIE_MODES}, got {tie_mode!r}")


def magnitude_threshold_ref(
    x: torch.Tensor,
    density: float,
    *,
    partition: str = "tensor",
    block_size: Optional[int] = None,
    count_rule: str = "floor",
    key_dtype: Optional[torch.dtype] = None,
) -> dict:
    """Per-partition exact threshold of |x|.

    Returns a dict of int64 tensors of length P (the number of partitions): ``tau_key`` (the k-th
    largest key, or the no-keep key), ``c_above`` (#key > τ), ``c_eq`` (#key == τ), ``k`` (keep
    count), and ``tau`` (τ as a value of the key dtype, +inf for "keep nothing").
    """
    kd = key_dtype or x.dtype
    keys = magnitude_keys(x, kd).reshape(-1)
    parts = partition_view(keys, tuple(x.shape), partition, block_size)
    rows = []
    for start, length in parts:
        k = keep_count(length, density, count_rule)
        rows.append((*select_partition(keys[start : start + length], k, kd), k))
    t = torch.tensor(rows, dtype=torch.int64).reshape(-1, 4)
    return {
        "tau_key": t[:, 0],
        "c_above": t[:, 1],
        "c_eq": t[:, 2],
        "k": t[:, 3],
        "tau": key_to_value(t[:, 0], kd),
    }


def magnitude_mask_ref(
    x: torch.Tensor,
    density: float,
    *,
    tie_mode: str = "exact_k",
    partition: str = "tensor",
    block_size: Optional[int] = None,
    count_rule: str = "floor",
    key_dtype: Optional[torch.dtype] = None,
    density1_prunes_min: bool = False,
) -> torch.Tensor:
    """Boolean keep mask of magnitude pruning (shape of x)."""
    if tie_mode not in TIE_MODES:
        raise ValueError(f"tie_mode must be one of {TIE_MODES}, got {tie_mode!r}")
    kd = key_dtype or x.dtype
    keys = magnitude_keys(x, kd).reshape(-1)
    mask = torch.zeros(keys.numel(), dtype=torch.bool, device=x.device)
    if density >= 1.0 and not density1_prunes_min:
        return torch.ones_like(x, dtype=torch.bool)
    for start, length in partition_view(keys, tuple(x.shape), partition, block_size):
        k = keep_count(length, density, count_rule)
        if density >= 1.0:  # official DPPA quirk: d = 1 still prunes the minima under "gt"
            k = length
        mask[start : start + length] = kept_in_partition(keys[start : start + length], k, tie_mode, kd)
    return mask.reshape(x.shape)


def band_codes_ref(
    x: torch.Tensor,
    densities: Sequence[float],
    *,
    tie_mode: str = "exact_k",
    partition: str = "tensor",
    block_size: Optional[int] = None,
    count_rule: str = "floor",
    key_dtype: Optional[torch.dtype] = None,
    density1_prunes_min: bool = False,
) -> torch.Tensor:
    """Band index per element: j (1-based) for the smallest j whose mask keeps it, 0 if pruned.

    ``densities`` must be non-decreasing, so the K masks are nested: band 1 is the largest
    magnitudes (density d_1), band j holds what mask j adds to mask j−1. ``density1_prunes_min``
    as in :func:`magnitude_mask_ref`, for every level at density 1.
    """
    codes = torch.zeros(x.shape, dtype=torch.int64, device=x.device)
    for j in reversed(range(len(densities))):
        m = magnitude_mask_ref(
            x, densities[j], tie_mode=tie_mode, partition=partition, block_size=block_size,
            count_rule=count_rule, key_dtype=key_dtype, density1_prunes_min=density1_prunes_min,
        )
        codes[m] = j + 1
    return codes
