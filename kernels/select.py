"""Exact per-partition k-th largest magnitude key (tensor / row / block partitions) in Triton.

Algorithm: a window radix select driven entirely on the device (no host round trip until the
result is read back). Every partition p carries a window [lo, lo + 64·2^shift): one *count pass*
reads the partition, counts keys above the window and histograms the keys inside it into 64 bins
of width 2^shift (``tl.histogram``, 64 bins: affordable in Triton 3.6); one tiny
*update* kernel finds the bin holding the k-th largest key and narrows the window to it
(shift -= 6). Counts are absolute (recomputed from x each pass), so a window that misses the k-th
key is simply moved above or below and the search continues. When shift reaches 0 the bin is a
single key: τ = that key, c_above = #key > τ, c_eq = #key == τ (exact, tie-free by construction).

Passes: ceil(bits/6) from the full range (bf16/fp16: 3, fp32: 6). For one large partition
(``partition="tensor"``) a strided sample of the keys is sorted first and the window starts at the
sample bracket ranks k·n_s/N ± (6σ + 8) (sample-bracket-then-count): bf16 usually
resolves in one count pass; a missed bracket costs at most the full-range passes. The number of
launches is fixed; finished partitions skip their loads.

31-bit keys (fp32) of one partition finish in two passes over x: after the first count pass has
narrowed the window to one bin, a *collect pass* counts the keys above the window and appends the
keys inside it to a candidate buffer (one atomic per tile for the offset); the (k − above)-th
largest candidate, found by a device sort of the buffer, is τ. The buffer holds max(64 K, n/512)
keys when the bracket was sampled (its window then holds about n·2δ/(n_s·64) keys), all of x
otherwise (x below 1 M elements). A window that overflows it (a heavy tie) or misses the k-th key
continues with the count passes, so the result is exact either way. Rows and blocks of 31-bit keys
still take the full-range passes (6).

Extra memory: per partition 64 + 8 int64 (≈ 0.6 KB), plus the n_s-element sample (≤ 64 K keys)
for the tensor partition, plus the 31-bit candidate buffer (4 B per slot, with its sort's
temporaries).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from ..vocab import partition_geometry
from .common import interpreting, key_mode, magnitude_key, next_pow2, nonfinite

NB = 64  # bins per count pass
LOG_NB = 6
SAMPLE = 1 << 16  # sample size of the tensor-partition bracket
SAMPLE_MIN_N = 1 << 20  # below this a sample does not pay for itself
CANDIDATES_MIN = 1 << 16  # least capacity of the 31-bit collect pass (n / 512 above 32 M elements)


@triton.jit
def _window_count_kernel(X_ptr, n, part_len, n_parts, chunk, LO_ptr, SHIFT_ptr, DONE_ptr, ABOVE_ptr, HIST_ptr,
                         NF_ptr, KEY_MODE: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr,
                         NBINS: tl.constexpr, CHECK: tl.constexpr):
    """Count pass. Program (g, s) covers partitions g·ROWS … +ROWS, columns [s·chunk, (s+1)·chunk).

    CHECK (the first pass of a checked select): also read the finished rows (k = 0) and add the
    number of NaN/Inf elements seen to NF[0]."""
    g = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    rows = g * ROWS + tl.arange(0, ROWS)
    row_ok = rows < n_parts
    done = tl.load(DONE_ptr + rows, mask=row_ok, other=1)
    lo = tl.load(LO_ptr + rows, mask=row_ok, other=0)
    shift = tl.load(SHIFT_ptr + rows, mask=row_ok, other=0)
    active = row_ok & (done == 0)
    if CHECK:
        read = row_ok
    else:
        read = active
    start = s * chunk
    end = tl.minimum(start + chunk, part_len)
    # every row finished: skip the loop (no loads at all)
    end = tl.where(tl.max(read.to(tl.int32), 0) > 0, end, start)
    above = tl.zeros((ROWS,), tl.int64)
    hist = tl.zeros((ROWS * NBINS,), tl.int32)
    bad = tl.zeros((ROWS,), tl.int32)
    local = tl.arange(0, ROWS)[:, None] * NBINS
    c = start
    while c < end:
        cols = c + tl.arange(0, BLOCK)
        flat = rows[:, None] * part_len + cols[None, :]
        here = (cols < end)[None, :] & (flat < n)
        x = tl.load(X_ptr + flat, mask=read[:, None] & here, other=0)
        if CHECK:
            bad += tl.sum((read[:, None] & here & nonfinite(x)).to(tl.int32), 1)
        ok = active[:, None] & here
        key = magnitude_key(x, KEY_MODE)
        d = key.to(tl.int64) - lo[:, None]
        b = d >> shift[:, None]
        inside = ok & (d >= 0) & (b < NBINS)
        above += tl.sum((ok & (d >= 0) & (b >= NBINS)).to(tl.int64), 1)
        comb = tl.where(inside, local + b, 0).to(tl.int32)
        hist += tl.histogram(tl.reshape(comb, (ROWS * BLOCK,)), ROWS * NBINS,
                             mask=tl.reshape(inside, (ROWS * BLOCK,)))
        c += BLOCK
    if CHECK:
        nbad = tl.sum(bad, 0)
        tl.atomic_add(NF_ptr, nbad, mask=nbad > 0, sem="relaxed")
    tl.atomic_add(ABOVE_ptr + rows, above, mask=active & (above > 0), sem="relaxed")
    hrow = g * ROWS + tl.arange(0, ROWS * NBINS) // NBINS
    hidx = g * ROWS * NBINS + tl.arange(0, ROWS * NBINS)
    tl.atomic_add(HIST_ptr + hidx, hist.to(tl.int64), mask=(hrow < n_parts) & (hist > 0), sem="relaxed")


@triton.jit
def _needed_shift(r, NBINS: tl.constexpr):
    """Smallest s >= 0 with NBINS·2^s >= r (r int64 >= 1)."""
    steps = tl.full((32,), NBINS, tl.int64) << tl.arange(0, 32).to(tl.int64)
    return tl.sum((steps[None, :] < r[:, None]).to(tl.int32), 1)


@triton.jit
def _window_update_kernel(K_ptr, LO_ptr, SHIFT_ptr, DONE_ptr, ABOVE_ptr, HIST_ptr, OUT_ptr, n_parts, key_end,
                          NBINS: tl.constexpr, LOGB: tl.constexpr, BLOCK_P: tl.constexpr):
    """Narrow every unfinished window to the bin of the k-th largest key; finish at shift 0.

    Resets ABOVE/HIST to zero for the next count pass. OUT is int64 [3, n_parts]: τ, c_above, c_eq.
    """
    pid = tl.program_id(0).to(tl.int64)
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = p < n_parts
    done = tl.load(DONE_ptr + p, mask=ok, other=1)
    k = tl.load(K_ptr + p, mask=ok, other=0)
    lo = tl.load(LO_ptr + p, mask=ok, other=0)
    shift = tl.load(SHIFT_ptr + p, mask=ok, other=0)
    above = tl.load(ABOVE_ptr + p, mask=ok, other=0)
    bins = tl.arange(0, NBINS)
    hptr = HIST_ptr + p[:, None] * NBINS + bins[None, :]
    hist = tl.load(hptr, mask=ok[:, None], other=0)
    # Every warp must have read ABOVE/HIST before one of them resets it: the compiler gives the
    # loads and the stores different thread layouts (a value is read by several warps, stored by
    # one), and without this barrier a late warp read the zeros and picked a wrong bin.
    tl.debug_barrier()
    tl.store(hptr, tl.zeros_like(hist), mask=ok[:, None])
    tl.store(ABOVE_ptr + p, tl.zeros_like(above), mask=ok)

    ge = above[:, None] + tl.cumsum(hist, 1, reverse=True)  # #key >= start of bin b
    total = above + tl.sum(hist, 1)
    b = tl.sum((ge >= k[:, None]).to(tl.int32), 1) - 1  # last bin whose count reaches k
    sel = bins[None, :] == b[:, None]
    hb = tl.sum(tl.where(sel, hist, 0), 1)
    gb = tl.sum(tl.where(sel, ge, 0), 1)
    miss_hi = k <= above
    miss_lo = k > total
    width = tl.full(lo.shape, 1, tl.int64) << shift
    top = lo + NBINS * width
    lo_next = tl.where(miss_hi, top, tl.where(miss_lo, 0, lo + b.to(tl.int64) * width))
    span = tl.where(miss_hi, key_end - top, tl.where(miss_lo, lo, width))
    shift_next = _needed_shift(tl.maximum(span, 1), NBINS)
    live = ok & (done == 0)
    finish = live & ~miss_hi & ~miss_lo & (shift == 0)
    tl.store(LO_ptr + p, lo_next, mask=live)
    tl.store(SHIFT_ptr + p, shift_next, mask=live)
    tl.store(DONE_ptr + p, tl.full(done.shape, 1, tl.int32), mask=finish)
    tl.store(OUT_ptr + p, lo_next, mask=finish)
    tl.store(OUT_ptr + n_parts + p, gb - hb, mask=finish)
    tl.store(OUT_ptr + 2 * n_parts + p, hb, mask=finish)


@triton.jit
def _collect_kernel(X_ptr, n, chunk, LO_ptr, SHIFT_ptr, DONE_ptr, ABOVE_ptr, CAND_ptr, CNT_ptr, cap,
                    KEY_MODE: tl.constexpr, BLOCK: tl.constexpr, NBINS: tl.constexpr):
    """Collect pass of one partition: ABOVE += #key >= window top, and every key inside the window
    [lo, lo + NBINS·2^shift) is appended to CAND (int32) at an atomic counter CNT (the count goes on
    past ``cap``; what does not fit is not written). Program s covers [s·chunk, (s+1)·chunk)."""
    s = tl.program_id(0).to(tl.int64)
    done = tl.load(DONE_ptr)
    lo = tl.load(LO_ptr)
    top = lo + (tl.full((), NBINS, tl.int64) << tl.load(SHIFT_ptr).to(tl.int64))
    start = s * chunk
    end = tl.where(done == 0, tl.minimum(start + chunk, n), start)
    above = tl.zeros((), tl.int64)
    c = start
    while c < end:
        offs = c + tl.arange(0, BLOCK)
        ok = offs < end
        key = magnitude_key(tl.load(X_ptr + offs, mask=ok, other=0), KEY_MODE).to(tl.int64)
        above += tl.sum((ok & (key >= top)).to(tl.int64), 0)
        inside = ok & (key >= lo) & (key < top)
        m = inside.to(tl.int64)
        nin = tl.sum(m, 0)
        base = tl.atomic_add(CNT_ptr, nin, mask=nin > 0, sem="relaxed")
        pos = base + tl.cumsum(m, 0) - m
        tl.store(CAND_ptr + pos, key.to(tl.int32), mask=inside & (pos < cap))
        c += BLOCK
    tl.atomic_add(ABOVE_ptr, above, mask=above > 0, sem="relaxed")


def _finish_from_candidates(cand, cnt, kk, above, done, out) -> None:
    """Finish a one-partition select from its collected window (all on the device, no sync).

    Valid when every window key was collected and the k-th largest key lies in the window; then
    τ = the (k − above)-th largest candidate, c_above = above + #cand > τ, c_eq = #cand == τ. Otherwise
    the state is left for the next count pass. ABOVE is reset either way (the count passes add to it).
    """
    cap = cand.numel()
    vals = torch.sort(cand, descending=True).values  # unfilled slots hold -1: they sort last
    a, k, c = above[:1], kk[:1], cnt[:1]
    tau = vals.gather(0, (k - a - 1).clamp(0, cap - 1)).to(torch.int64)
    ok = (done[:1] == 0) & (c <= cap) & (k > a) & (k <= a + c)
    found = torch.stack([tau, a + (cand > tau).sum().reshape(1), (cand == tau).sum().reshape(1)])
    out[:3, :1] = torch.where(ok, found, out[:3, :1])
    done[:1] = torch.where(ok, torch.ones_like(done[:1]), done[:1])
    above.zero_()


def _config(part_len: int, n_parts: int, n: int, device: torch.device) -> tuple[int, int, int, int]:
    """(ROWS, BLOCK, SPLIT, chunk): tile shape and how a partition is split across programs."""
    if interpreting():
        # few, large programs: the interpreter costs ~1 ms per program instance
        block = min(next_pow2(max(part_len, 1)), 1 << 16)
        rows = max(1, min(next_pow2(n_parts), (1 << 16) // block, 256))
        split = max(1, min(8, -(-part_len // block)))
    else:
        block = min(next_pow2(max(part_len, 1)), 2048)
        rows = 1 if part_len >= 512 else max(1, min(next_pow2(n_parts), 2048 // block))
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        programs = -(-n_parts // rows)
        split = max(1, min(4 * sms // max(programs, 1), -(-part_len // block)))
    chunk = -(-(-(-part_len // split)) // block) * block  # per-program columns, multiple of BLOCK
    split = -(-part_len // chunk) if part_len else 1
    return rows, block, split, chunk


def _sample_window(x: torch.Tensor, k: int, key_dtype, nbits: int, sample: int):
    """(lo, shift) device tensors of the sample bracket around the k-th largest key of x."""
    from ..reference.threshold import magnitude_keys

    flat = x.reshape(-1)
    n = flat.numel()
    i = torch.arange(sample, device=x.device, dtype=torch.int64)
    stride = n // sample
    # strided positions with a hashed offset inside each stride (avoids aliasing with rows)
    idx = i * stride + (i * 2654435761) % max(stride, 1)
    keys = magnitude_keys(flat[idx], key_dtype).sort(descending=True).values
    d = min(max(k / n, 0.0), 1.0)
    r = k * sample / n
    delta = 6.0 * math.sqrt(sample * d * (1.0 - d)) + 8.0
    hi_key = keys[max(int(math.floor(r - delta)), 0)]
    lo_key = keys[min(int(math.ceil(r + delta)), sample - 1)]
    span = (hi_key - lo_key + 1).clamp(min=1)
    steps = NB << torch.arange(32, device=x.device, dtype=torch.int64)
    shift = (steps < span).sum().to(torch.int32)
    return lo_key.reshape(1), shift.reshape(1)


def select(x: torch.Tensor, k: torch.Tensor, partition: str, block_size: Optional[int],
           key_dtype=None, sample: Optional[int] = None, sample_min_n: Optional[int] = None,
           check_finite: bool = False, candidate_cap: Optional[int] = None):
    """(τ, c_above, c_eq) int64 CPU tensors of length P (``backends.base`` ``select``), and with
    ``check_finite`` a fourth: the number of NaN/Inf elements of x (counted in the first pass).

    τ = k-th largest magnitude key of its partition (no-keep key 1 << bits when k = 0).
    ``sample``, ``sample_min_n``, ``candidate_cap``: override the bracket sample and the capacity of
    the 31-bit collect pass (tests force both paths and their misses with them).
    """
    mode, nbits = key_mode(x.dtype, key_dtype)
    n = x.numel()
    part_len, n_parts = partition_geometry(x.shape, partition, block_size)
    dev = x.device
    kk = k.to(device=dev, dtype=torch.int64).contiguous()  # a strided view would be misread
    # τ, c_above, c_eq per partition, then the NaN/Inf count (one row, so one copy to the host)
    out = torch.zeros(4, n_parts, dtype=torch.int64, device=dev)
    if n_parts == 0 or n == 0:
        out[0] = 1 << nbits
        res = tuple(out[:3].cpu())
        return res + (0,) if check_finite else res
    out[0] = 1 << nbits
    done = (kk <= 0).to(torch.int32)
    lo = torch.zeros(n_parts, dtype=torch.int64, device=dev)
    shift = torch.full((n_parts,), nbits - LOG_NB, dtype=torch.int32, device=dev)
    passes = -(-nbits // LOG_NB)
    sample = sample or SAMPLE
    kmax = int(k.max()) if k.numel() else 0
    sampled = n_parts == 1 and n >= (sample_min_n or SAMPLE_MIN_N) and n >= 4 * sample and 0 < kmax
    if sampled:
        lo, shift = _sample_window(x, int(k[0]), key_dtype or x.dtype, nbits, sample)
        passes += 1  # a missed bracket: one wasted pass, then the full-range passes
    cand = None
    if nbits == 31 and n_parts == 1 and 0 < kmax:
        # 31-bit keys: after the first count pass, collect the keys of the narrowed window and
        # finish from them (2 passes over x); unsampled tensors are small, so all of x fits
        cap = min(n, candidate_cap or (max(next_pow2(n >> 9), CANDIDATES_MIN) if sampled else n))
        cand = torch.full((cap,), -1, dtype=torch.int32, device=dev)
        cnt = torch.zeros(1, dtype=torch.int64, device=dev)
    above = torch.zeros(n_parts, dtype=torch.int64, device=dev)
    hist = torch.zeros(n_parts * NB, dtype=torch.int64, device=dev)
    rows, block, split, chunk = _config(part_len, n_parts, n, dev)
    grid = (-(-n_parts // rows), split)
    block_p = 16 if not interpreting() else min(next_pow2(n_parts), 1024)
    ugrid = (-(-n_parts // block_p),)
    warps = 4 if rows * block <= 2048 else 8
    nf = out[3]  # the count lands in out[3, 0]
    for i in range(passes):
        _window_count_kernel[grid](x, n, part_len, n_parts, chunk, lo, shift, done, above, hist, nf,
                                   KEY_MODE=mode, ROWS=rows, BLOCK=block, NBINS=NB,
                                   CHECK=bool(check_finite and i == 0), num_warps=warps)
        _window_update_kernel[ugrid](kk, lo, shift, done, above, hist, out, n_parts, 1 << nbits,
                                     NBINS=NB, LOGB=LOG_NB, BLOCK_P=block_p)
        if i == 0 and cand is not None:
            _collect_kernel[(split,)](x, n, chunk, lo, shift, done, above, cand, cnt, cand.numel(), KEY_MODE=mode,
                                      BLOCK=block, NBINS=NB, num_warps=warps)
            _finish_from_candidates(cand, cnt, kk, above, done, out)
            cand = None
            if bool(done.all()):  # one sync; the rare miss (bracket or capacity) goes on counting
                break
    res = out.cpu()  # the one synchronisation: the result must reach the host
    if check_finite:
        return res[0], res[1], res[2], res[3, 0]
    return res[0], res[1], res[2]
