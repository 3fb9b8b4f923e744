"""FusionBench's TIES on our kernels: trim (per-row k-th value, ``>=``), sign election, disjoint merge.

The arithmetic behind :mod:`dppa_kernels.integrations.fusion_bench`'s drop-ins. Every function here
takes inputs the caller has already accepted (2-D, bf16/fp16/fp32, nothing recording autograd) and
returns ``None`` when FusionBench's own code must decide instead (a non-finite value, an error
FusionBench would raise).

FusionBench's semantics, reproduced exactly:

* Trim (``topk_values_mask(M, K)``): ``K > 1`` is a percentage (``K /= 100``); each row of the
  [n, d] matrix keeps every element with ``|x| >= τ``, τ = the (d − int(d·K))-th smallest ``|x|``
  of the row, i.e. the (int(d·K) + 1)-th largest. Ties at τ are all kept, so a row keeps at least
  int(d·K) + 1 elements. K that puts the rank outside [1, d] (``K = 1``, ``K = 100``, ``K < 0``)
  is an error in FusionBench; that case is left to it.
* Election (``resolve_sign``): sign of the column sum of the trimmed values (in model order, fp32
  accumulation); a zero sum takes the sign of the sum of all elected signs (computed in the input
  dtype, as FusionBench does), which may itself be 0.
* Disjoint merge: a value agrees when the elected sign is > 0 and it is > 0, or the elected sign is
  <= 0 and it is < 0. ``sum``: Σ agreeing; ``mean``: Σ agreeing / max(#agreeing, 1) (fp32 result,
  FusionBench divides by a float32 count); ``max``: the largest |agreeing| × elected sign.

Thresholds come from the backend's exact ``select``; ``sum`` and fp32 ``mean`` run in the fused
``apply`` pass (the kernel treats a zero vote as +, so when FusionBench's zero rule says − the pass
runs on negated weights and λ = −1, which is exact). ``max`` and 16-bit ``mean`` (FusionBench rounds
the sum to 16 bits before dividing) apply FusionBench's own ``disjoint_merge`` to column chunks of the
trimmed matrix, which bounds its memory to a chunk.
"""

from __future__ import annotations

import numbers
from typing import Callable, Optional

import torch

from ..backends.base import ApplyPlan
from ..backends.registry import get_backend, resolve
from ..reference.threshold import key_to_value, magnitude_keys, no_keep_key
from ..spec import CombineSpec

MERGE_FUNCS = ("sum", "mean", "max")
# Columns per chunk where FusionBench's own disjoint_merge runs on slices of the trimmed matrix.
CHUNK_ELEMENTS = 1 << 22


def keep_rank(d: int, K) -> Optional[int]:
    """Rank r (1-based, from the largest) of FusionBench's threshold in a row of d elements, or None.

    FusionBench: ``K /= 100`` when ``K > 1``; ``k = d - int(d * K)``; τ = ``kthvalue(k)`` (k-th
    smallest), so r = d − k + 1 = int(d·K) + 1. None where ``kthvalue`` would fail (k ∉ [1, d]).
    """
    if isinstance(K, bool) or not isinstance(K, numbers.Real):
        return None
    if K > 1:
        K /= 100
    k_small = d - int(d * K)
    if not 1 <= k_small <= d:
        return None
    return d - k_small + 1


def backend_for(backend: str, device: torch.device):
    """The backend object that runs on ``device`` (the reference has no primitives: torch's)."""
    name = resolve(backend, device)
    return get_backend("torch" if name == "reference" else name)


def row_thresholds(be, x: torch.Tensor, rank: int):
    """(τ key, #above, #equal) per row of the 2-D ``x`` for the rank-th largest |x| (int64, CPU)."""
    k = torch.full((x.shape[0],), rank, dtype=torch.int64)
    return be.select(x, k, "row", None, None)


def any_nonfinite_tau(tau: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether some threshold is Inf/NaN (keys at or above the key of +inf)."""
    inf_key = int(magnitude_keys(torch.tensor([float("inf")], dtype=dtype))[0])
    assert inf_key < no_keep_key(dtype)
    return bool((tau >= inf_key).any())


def ge_plan(tau: torch.Tensor, rank: int, above: torch.Tensor, eq: torch.Tensor, partition: str) -> ApplyPlan:
    """Keep key >= τ (one level, factor 1) for partitions with thresholds ``tau`` (shape [P])."""
    col = lambda t: t.reshape(-1, 1).to(torch.int64)  # noqa: E731  [P, K=1]
    return ApplyPlan(kind="thresholds", partition=partition, tie_mode="ge", tau_key=col(tau),
                     budget=col((rank - above).clamp(min=0)), c_eq=col(eq), factors=(1.0,))


def trimmed_rows(be, x: torch.Tensor, rank: int):
    """Rows of ``x`` and their ``>= τ`` plans, or None if a threshold is not finite."""
    tau, above, eq = row_thresholds(be, x, rank)
    if any_nonfinite_tau(tau, x.dtype):
        return None
    rows = list(x.unbind(0))
    plans = [ge_plan(tau[i], rank, above[i], eq[i], "tensor") for i in range(len(rows))]
    return rows, plans, tau


def column_sum_sign(be, rows, plans, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """sign(Σ_i trimmed_i) in ``dtype`` (FusionBench's ``torch.sign(v.sum(dim=0))``), or None.

    The fused pass sums in model order in fp32, which is how torch reduces up to 4 rows on the CPU
    (more rows: see the module docstring of ``fusion_bench``). None when a sum is not finite: then
    some input was Inf/NaN and FusionBench's own code decides.
    """
    n = len(rows)
    s = be.apply(rows, None, plans, [1.0] * n, CombineSpec(combine="sum"), torch.float32)
    if not bool(torch.isfinite(s).all()):
        return None
    return s.sign_().to(dtype)


def majority_sign(sign: torch.Tensor) -> float:
    """FusionBench's rule for zero votes: the sign of the sum of all elected signs (input dtype)."""
    return float(torch.sign(sign.sum()))


def fused_disjoint(be, rows, plans, merge: str, negate: bool, dtype: torch.dtype) -> torch.Tensor:
    """``sum`` / fp32 ``mean`` in one fused pass.

    The kernel elects sign(Σ w·v) with 0 counted as +. FusionBench's zero votes take the majority
    sign; when that is <= 0 they keep the negative values, which is the kernel's rule on the
    negated values (w = −1) with the result negated back (λ = −1): sign flips are exact.
    """
    w = -1.0 if negate else 1.0
    mean = merge == "mean"
    combine = CombineSpec(combine="ties", elect="weighted_sum", divisor="count" if mean else "none",
                          normalize=mean, lam=w)
    out_dtype = torch.promote_types(dtype, torch.float32) if mean else dtype
    return be.apply(rows, None, plans, [w] * len(rows), combine, out_dtype)


def chunked_disjoint(x: torch.Tensor, tau_key: torch.Tensor, sign: torch.Tensor, merge_func: str,
                     host_disjoint_merge: Callable) -> torch.Tensor:
    """FusionBench's own ``disjoint_merge`` on column chunks of the trimmed matrix.

    ``sign`` is the elected sign with zeros already resolved (FusionBench's ``sign_to_mult``).
    Every operation of the merge is per column, so chunks give the same values as the whole.
    """
    n, d = x.shape
    tau = key_to_value(tau_key, x.dtype).to(x.device).reshape(n, 1)
    step = max(1, CHUNK_ELEMENTS // max(n, 1))
    out = None
    for a in range(0, d, step):
        xs = x[:, a:a + step]
        trimmed = xs * (xs.abs() >= tau)  # FusionBench's M * mask, on a slice
        part = host_disjoint_merge(trimmed, merge_func, sign[a:a + step])
        if out is None:
            out = torch.empty(d, dtype=part.dtype, device=part.device)
        out[a:a + step] = part
    return out


def ties_merge(x: torch.Tensor, K, merge_func: str, backend: str,
               host_disjoint_merge: Callable) -> Optional[torch.Tensor]:
    """FusionBench's ``ties_merging(x, reset_thresh=K, merge_func)`` or None (defer to it)."""
    merge = merge_func.split("-")[-1] if isinstance(merge_func, str) else None
    n, d = x.shape
    rank = keep_rank(d, K)
    if merge not in MERGE_FUNCS or rank is None or n == 0:
        return None
    x = x.contiguous()
    be = backend_for(backend, x.device)
    trimmed = trimmed_rows(be, x, rank)
    if trimmed is None:
        return None
    rows, plans, tau = trimmed
    sign = column_sum_sign(be, rows, plans, x.dtype)
    if sign is None:
        return None
    majority = majority_sign(sign)
    if merge == "max" or (merge == "mean" and x.dtype != torch.float32):
        sign[sign == 0] = majority  # FusionBench's resolve_zero_signs, same in-place update
        return chunked_disjoint(x, tau, sign, merge_func, host_disjoint_merge)
    del sign
    return fused_disjoint(be, rows, plans, merge, majority <= 0, x.dtype)


def topk_mask(x: torch.Tensor, K, backend: str, return_mask: bool):
    """FusionBench's ``topk_values_mask(x, K, return_mask)`` for a finite 2-D x, or None."""
    n, d = x.shape
    rank = keep_rank(d, K)
    if rank is None or n == 0:
        return None
    x = x.contiguous()
    be = backend_for(backend, x.device)
    tau, above, eq = row_thresholds(be, x, rank)
    if any_nonfinite_tau(tau, x.dtype):
        return None
    plan = ge_plan(tau, rank, above, eq, "row")
    kept = be.apply([x], None, [plan], [1.0], CombineSpec(combine="sum"), x.dtype)
    # FusionBench's mask.float().mean(dim=1): torch's float32 mean of 0/1 values is the float32
    # count divided by d (exact whenever d <= 2**24)
    frac = (above + eq).to(torch.float32).to(x.device) / d
    if not return_mask:
        return kept, frac
    mask = x.abs() >= key_to_value(tau, x.dtype).to(x.device).reshape(n, 1)
    return kept, frac, mask


def column_sign(x: torch.Tensor, backend: str) -> Optional[torch.Tensor]:
    """``torch.sign(x.sum(dim=0))`` of a 2-D x through the fused pass, or None if not finite."""
    x = x.contiguous()
    be = backend_for(backend, x.device)
    rows = list(x.unbind(0))
    return column_sum_sign(be, rows, [ApplyPlan("dense")] * len(rows), x.dtype)
