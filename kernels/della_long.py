"""DELLA keep mask of long rows with 16-bit keys (bf16/fp16), without a sort of the row.

The rank of element e in its row (``kernels.della``: ascending magnitude key, equal keys by
column) is

    rank(e) = #{row keys < key_e} + #{columns c' < c_e with key == key_e},

both counts of a 15-bit key, so no row needs sorting. Each row is cut into S segments of ``seg``
columns (a multiple of the tile) and each segment into tiles of 2^LOG_BLOCK columns; a tile is
sorted in registers (``della._sort_rows`` on ``key << LOG_BLOCK | column``), which puts equal keys
next to each other in column order. Three steps:

1. *count*: program (row, segment) walks its tiles in order and adds each key's run length to
   its own 32768-bin count vector H[row, segment] (one plain load and store per distinct key of a
   tile: the vector is private to the program, so no atomics and no hot bins).
2. *offsets* (torch, on the device): R[row, s, b] = #{row keys < b} + #{key b in segments < s}.
3. *rank*: each program walks its tiles again; an element's rank is R[key] + its position in its
   run of the sorted tile; the run's last element adds the run length to R[key]. The keep bit
   (``della._keep_bits``) is stored to the element.

Two reads of the row and two tile sorts per element; no global sort, nothing per element but
the output. Extra memory: S·32768 int32 per row of the current batch, at most ``SCRATCH_BYTES``
(segments of at least ``SEGMENT_MIN`` columns: 2 B per element, 4 B for rows just over 32768).
The rank kernel launches without fp fusion like ``kernels.della`` (its float64 keep test).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .common import interpreting, magnitude_key
from .della import _keep_bits, _sort_rows

KEYS = 1 << 15  # 15-bit magnitude keys
SEGMENT_MIN = 1 << 16  # columns per segment at least: 128 KB of counts per ≥ 64 K elements
MAX_SEGMENTS = 1024  # per row (a row of 2^31 columns: segments of 2 M)
SCRATCH_BYTES = 1 << 26  # count vectors of one batch of rows (their offsets take twice that briefly)


@triton.jit
def sorted_tile_runs(X_ptr, row_base, c, end, KEY_MODE: tl.constexpr, LOG_BLOCK: tl.constexpr):
    """The tile's keys sorted (equal keys by column): (key, column in the tile, position in the
    run of equal keys, last of its run, a real element). Padding sorts after the real elements."""
    BLOCK: tl.constexpr = 1 << LOG_BLOCK
    PAD: tl.constexpr = (1 << (15 + LOG_BLOCK)) - 1
    j = tl.arange(0, BLOCK)
    ok = c + j < end
    key = magnitude_key(tl.load(X_ptr + row_base + c + j, mask=ok, other=0), KEY_MODE)
    s = _sort_rows(tl.where(ok, (key << LOG_BLOCK) | j, PAD), 0, LOG_BLOCK)
    skey = s >> LOG_BLOCK
    nv = tl.minimum(end - c, BLOCK)
    real = j < nv
    prev = tl.gather(skey, tl.maximum(j - 1, 0), 0)
    nxt = tl.gather(skey, tl.minimum(j + 1, BLOCK - 1), 0)
    # start of each run: an inclusive max-scan of the run starts (log-step, by gathers: the
    # interpreter runs a custom associative_scan one Python call per element)
    start = tl.where((j == 0) | (skey != prev), j, 0)
    for t in tl.static_range(LOG_BLOCK):
        start = tl.maximum(start, tl.gather(start, tl.maximum(j - (1 << t), 0), 0))
    last = real & ((j + 1 == nv) | (skey != nxt))
    return skey, s & (BLOCK - 1), j - start, last, real


@triton.jit
def _segment(V_ptr, row0, cols, seg, n_seg):
    """Program (r, s): (flat index of row row0 + r, its segment's count vector, first and end column)."""
    r = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    c = s * seg
    return (row0 + r) * cols, V_ptr + (r * n_seg + s) * 32768, c, tl.minimum(c + seg, cols)


@triton.jit
def _della_long_count_kernel(X_ptr, H_ptr, row0, cols, seg, n_seg, KEY_MODE: tl.constexpr, LOG_BLOCK: tl.constexpr):
    """H[r, s, b] = #{key b in columns [s·seg, (s+1)·seg) of row row0 + r}."""
    row_base, H, c, end = _segment(H_ptr, row0, cols, seg, n_seg)
    while c < end:
        skey, col, tie, last, real = sorted_tile_runs(X_ptr, row_base, c, end, KEY_MODE, LOG_BLOCK)
        h = tl.load(H + skey, mask=last, other=0)
        tl.store(H + skey, h + tie + 1, mask=last)
        tl.debug_barrier()  # the next tile's loads may run on other warps than these stores
        c += 1 << LOG_BLOCK


@triton.jit(do_not_specialize=["lo_bits", "span_bits", "k1", "k2"])
def _della_long_rank_kernel(X_ptr, R_ptr, OUT_ptr, row0, cols, seg, n_seg, lo_bits, span_bits, k1, k2,
                            KEY_MODE: tl.constexpr, LOG_BLOCK: tl.constexpr):
    """Keep bit of every element of segment s of row row0 + r; R[r, s] holds the rank of the next
    element of each key (advanced tile by tile)."""
    row_base, R, c, end = _segment(R_ptr, row0, cols, seg, n_seg)
    while c < end:
        skey, col, tie, last, real = sorted_tile_runs(X_ptr, row_base, c, end, KEY_MODE, LOG_BLOCK)
        base = tl.load(R + skey, mask=real, other=0)
        # every element of a run reads R[key] before the run's last element advances it
        tl.debug_barrier()
        e = row_base + c + col
        keep = _keep_bits(e, (base + tie).to(tl.int64), cols, lo_bits, span_bits, k1, k2)
        tl.store(OUT_ptr + e, keep, mask=real)
        tl.store(R + skey, base + tie + 1, mask=last)
        tl.debug_barrier()
        c += 1 << LOG_BLOCK


def plan(cols: int, n_rows: int, segment: Optional[int] = None,
         tile: Optional[int] = None) -> tuple[int, int, int, int]:
    """(LOG_BLOCK, seg, segments per row, rows per batch) for rows of ``cols`` columns.

    Tiles of 2048 columns on the GPU (int32 composites of 26 bits), 8192 under the interpreter."""
    lb = (tile or (1 << 13 if interpreting() else 1 << 11)).bit_length() - 1
    seg = segment or max(SEGMENT_MIN, -(-cols // MAX_SEGMENTS))
    seg = -(-seg >> lb) << lb
    n_seg = -(-cols // seg)
    rows = max(1, min(n_rows, SCRATCH_BYTES // (n_seg * KEYS * 4)))
    return lb, seg, n_seg, rows


def della_mask_long(x: torch.Tensor, o8: torch.Tensor, cols: int, n_rows: int, key_mode: int, lo_bits: int,
                    span_bits: int, k1: int, k2: int, segment: Optional[int] = None,
                    tile: Optional[int] = None) -> None:
    """Write the keep bits of the rows of x (contiguous, 16-bit keys) into o8 (uint8, x's size).
    ``segment``, ``tile`` (a power of two): override the plan (tests)."""
    lb, seg, n_seg, rows = plan(cols, n_rows, segment, tile)
    for r0 in range(0, n_rows, rows):
        nr = min(rows, n_rows - r0)
        counts = torch.zeros(nr, n_seg, KEYS, dtype=torch.int32, device=x.device)
        _della_long_count_kernel[(nr, n_seg)](x, counts, r0, cols, seg, n_seg, KEY_MODE=key_mode, LOG_BLOCK=lb,
                                        num_warps=8)
        total = counts.sum(1, dtype=torch.int32)  # [nr, KEYS]
        below = total.cumsum(1, dtype=torch.int32) - total  # row keys < b
        counts.copy_(counts.cumsum(1, dtype=torch.int32) - counts + below.unsqueeze(1))  # now R
        del total, below
        _della_long_rank_kernel[(nr, n_seg)](x, counts, o8, r0, cols, seg, n_seg, lo_bits, span_bits, k1, k2,
                                       KEY_MODE=key_mode, LOG_BLOCK=lb, num_warps=8, enable_fp_fusion=False)
