"""Exact k-th largest magnitude key of each of many small tensors, in one launch.

For a list of tensors (a model's norms and biases: thousands of tensors of at most a few
``MAX_ELEMENTS`` elements), ``kernels.select`` would take a chain of launches and a host
round trip per tensor. Here program t selects tensor t whole, through a table of data pointers:
a radix select from the full key range with 64-bin windows (``tl.histogram``), narrowing the
window by 6 bits per pass (16-bit keys: 3 passes, 31-bit keys: 6) and re-reading the tensor
each pass (from L2: it is small). Same result as ``select`` on each tensor with
``partition="tensor"`` (``backends.base``): τ = the k-th largest key (the no-keep key 1 << bits
when k = 0), c_above = #key > τ, c_eq = #key == τ; plus the number of NaN/Inf keys of each tensor
(keys at or above ``backends.base.nonfinite_key``), counted in the first pass.

Extra memory: the pointer, length and k tables and the [4, T] int64 result.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ..backends.base import nonfinite_key
from .common import interpreting, key_mode, magnitude_key

NB = 64
LOG_NB = 6
MAX_ELEMENTS = 1 << 20  # longer tensors belong to ``kernels.select`` (one program would read them alone)


@triton.jit
def _select_many_kernel(PTRS, NS, KS, OUT, T, nf_key, X_DTYPE: tl.constexpr, KEY_MODE: tl.constexpr,
                        NBITS: tl.constexpr, PASSES: tl.constexpr, BLOCK: tl.constexpr):
    """Program t: OUT[:, t] = τ, c_above, c_eq, #NaN/Inf keys of tensor t."""
    t = tl.program_id(0).to(tl.int64)
    x_ptr = tl.load(PTRS + t).to(tl.pointer_type(X_DTYPE))
    n = tl.load(NS + t)
    k = tl.load(KS + t)
    bins = tl.arange(0, 64)
    lo = tl.zeros((), tl.int64)
    shift = tl.full((), NBITS - 6, tl.int64)
    tau = tl.full((), 1 << NBITS, tl.int64)  # k = 0: the no-keep key, no counts
    c_above = tl.zeros((), tl.int64)
    c_eq = tl.zeros((), tl.int64)
    bad = tl.zeros((), tl.int64)
    for p in tl.static_range(PASSES):
        hist = tl.zeros((64,), tl.int32)
        above = tl.zeros((), tl.int64)
        c = tl.zeros((), tl.int64)
        end = tl.where(k > 0, n, 0) if p > 0 else n  # the first pass also counts NaN/Inf
        while c < end:
            offs = c + tl.arange(0, BLOCK)
            ok = offs < n
            key = magnitude_key(tl.load(x_ptr + offs, mask=ok, other=0), KEY_MODE).to(tl.int64)
            if p == 0:
                bad += tl.sum((ok & (key >= nf_key)).to(tl.int64), 0)
            d = key - lo
            b = d >> shift
            above += tl.sum((ok & (d >= 0) & (b >= 64)).to(tl.int64), 0)
            hist += tl.histogram(tl.where(ok, b, 0).to(tl.int32), 64, mask=ok & (d >= 0) & (b < 64))
            c += BLOCK
        ge = above + tl.cumsum(hist.to(tl.int64), 0, reverse=True)  # #key >= start of bin
        sel = tl.sum((ge >= k).to(tl.int32), 0) - 1  # the bin of the k-th largest key
        hb = tl.sum(tl.where(bins == sel, hist.to(tl.int64), 0), 0)
        gb = tl.sum(tl.where(bins == sel, ge, 0), 0)
        if p == PASSES - 1:  # shift is 0: the bin is one key
            tau = tl.where(k > 0, lo + sel, tau)
            c_above = tl.where(k > 0, gb - hb, c_above)
            c_eq = tl.where(k > 0, hb, c_eq)
        lo = lo + sel.to(tl.int64) * (tl.full((), 1, tl.int64) << shift)
        shift = tl.maximum(shift - 6, 0)
    tl.store(OUT + t, tau)
    tl.store(OUT + T + t, c_above)
    tl.store(OUT + 2 * T + t, c_eq)
    tl.store(OUT + 3 * T + t, bad)


def passes(nbits: int) -> int:
    """Passes from the full range: window shifts nbits − 6, −12, … down to 0 (15 bits: 3, 31 bits: 6)."""
    s, count = nbits - LOG_NB, 1
    while s > 0:
        s, count = max(s - LOG_NB, 0), count + 1
    return count


_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def select_many(xs: Sequence[torch.Tensor], ks: Sequence[int], key_dtype: Optional[torch.dtype] = None
                ) -> torch.Tensor:
    """int64 CPU tensor [4, T]: τ, c_above, c_eq and the NaN/Inf count of every tensor of ``xs``
    (contiguous, one dtype, one device, at most ``MAX_ELEMENTS`` elements each) at keep count ``ks[t]``."""
    if len(xs) != len(ks):
        raise ValueError(f"ks has {len(ks)} counts, expected one per tensor ({len(xs)})")
    if not xs:
        return torch.zeros(4, 0, dtype=torch.int64)
    dtype, dev = xs[0].dtype, xs[0].device
    for i, x in enumerate(xs):
        if x.dtype != dtype or x.device != dev or not x.is_contiguous():
            raise ValueError(f"xs[{i}] must be contiguous {dtype} on {dev}, got {x.dtype} on {x.device}")
        if x.numel() > MAX_ELEMENTS:
            raise ValueError(f"xs[{i}] has {x.numel()} elements; select_many takes at most {MAX_ELEMENTS}")
    mode, nbits = key_mode(dtype, key_dtype)
    # one host → device copy of the tables (pointers of empty tensors are never read)
    table = torch.tensor([[x.data_ptr() for x in xs], [x.numel() for x in xs], [int(k) for k in ks]],
                         dtype=torch.int64).to(dev)
    out = torch.empty(4, len(xs), dtype=torch.int64, device=dev)
    block = 1 << 14 if interpreting() else 1024
    _select_many_kernel[(len(xs),)](table[0], table[1], table[2], out, len(xs), nonfinite_key(key_dtype or dtype),
                                    X_DTYPE=_TL_DTYPES[dtype], KEY_MODE=mode, NBITS=nbits, PASSES=passes(nbits),
                                    BLOCK=block, num_warps=4)
    return out.cpu()
