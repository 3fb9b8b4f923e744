"""DELLA MagPrune keep mask in Triton (``backends.base`` ``della_mask``, ``reference.sparsify.della_factor``).

Per row (the last dimension; a 1-D tensor is one row of n elements, a 0-d tensor one row of 1) every
element e gets its ascending rank r = 0 … n−1 of the magnitude key within the row, equal keys ranked
by column (what a stable ascending sort of the keys gives), and is kept iff

    hash_bits(e; k1, k2) < floor(p · 2^32),   p = (d − ε) + rn · (2ε),   rn = r / (n − 1)  (0.5 if n = 1)

with p in float64, rounded in exactly that order (``reference.rng``, ``csrc/cpu/select.cpp``).

Two paths, both exact:

* ``sort`` (rows of at most ``MAX_SORT`` columns whose tile fits in shared memory): one program
  loads ROWS rows and sorts them in registers (a bitonic network, ``_sort_rows``) on unique
  composite keys ``key << LOG_BLOCK | column``: int32 when key and column fit in 30 bits (bf16/fp16
  rows up to 32768), int64 otherwise (fp32). Sorted position = rank, low bits = column, so the keep
  bit is computed in sorted order and stored to its element (a scatter within the row). Padding
  columns get the largest composite and sort last. ``tl.sort`` is not used: its xor reduction runs
  one Python call per element in the interpreter (≈ 8 s for 4096 elements); ``_sort_rows`` is the
  same network with a sum reduction (vectorised there, the same cost on the GPU).
* ``counting`` (longer bf16/fp16 rows, e.g. a large 1-D tensor, or a tile over the shared-memory
  budget): ranks from per-segment key counts and tile sorts, no sort of the row
  (``kernels.della_long``).
* ``ranked`` (longer fp32 rows: 31-bit keys cannot be counted): a stable ``torch.sort`` of int32
  keys per row gives the order (rows in batches of about ``RANKED_BATCH`` elements); a Triton
  kernel maps each sorted position to its element.

float64 exactness on the GPU: triton contracts ``a * b + c`` into an fma by default (LLVM fp-op
fusion and ptxas ``--fmad=true``: the sm_90 PTX of ``lo + rn * span`` is ``fma.rn.f64``), which
rounds once instead of twice. Both kernels therefore launch with ``enable_fp_fusion=False`` (PTX
``mul.rn.f64`` then ``add.rn.f64``, which ptxas never fuses; ``compile_check`` asserts both facts).
The division is ``div.rn.f64`` (IEEE) and p · 2^32 is exact. ``bits < floor(t)`` is evaluated as
``bits + 1 <= t`` (the same for integer bits in [0, 2^32), clamps included). Triton passes Python
floats as fp32, so the float64 scalars travel as their int64 bit patterns.

Extra memory: ``sort`` path none per element (the bool output only; rows live in registers and
ROWS·BLOCK·(4 or 8) bytes of shared memory). ``counting`` path: ≤ 4 B per element of a row batch
(``kernels.della_long``). ``ranked`` path, per element of the current row
batch: int32 key (4 B) + sorted int32 keys (4 B) + int64 order (8 B) + torch.sort's workspace
(about 16 B on CUDA): about 32 B per element, for at most ``max(RANKED_BATCH, cols)`` elements at
a time (512 MB at the default batch).
"""

from __future__ import annotations

import struct
from typing import Optional

import torch
import triton
import triton.language as tl

from .common import hash_bits, interpreting, key_mode, magnitude_key, next_pow2

MAX_SORT = 32768  # longest row sorted in registers (Llama-2/3-70B down_proj rows of 28672 included)
RANKED_BATCH = 1 << 24  # elements per torch.sort batch on the ranked path
RANKED_BLOCK = 1024


def _f64_bits(v: float) -> int:
    """The int64 bit pattern of a Python float (triton would pass the float itself as fp32)."""
    return struct.unpack("<q", struct.pack("<d", float(v)))[0]


@triton.jit
def _keep_bits(e, rank, cols, lo_bits, span_bits, k1, k2):
    """uint8 keep bit of flat elements ``e`` (int64) of ascending row rank ``rank`` (int64)."""
    lo = lo_bits.to(tl.int64).to(tl.float64, bitcast=True)
    span = span_bits.to(tl.int64).to(tl.float64, bitcast=True)
    den = tl.maximum(cols - 1, 1).to(tl.float64)
    rn = tl.where(cols > 1, rank.to(tl.float64) / den, 0.5)
    t = (lo + rn * span) * 4294967296.0  # no fma: launched with enable_fp_fusion=False
    bits = hash_bits(e, k1.to(tl.uint32), k2.to(tl.uint32))
    return ((bits.to(tl.int64) + 1).to(tl.float64) <= t).to(tl.uint8)


@triton.jit
def _indicator(N_DIMS: tl.constexpr, j: tl.constexpr):
    """0/1 = bit j of the flat index, as a [1, …, 2, …, 1] hypercube tensor."""
    return tl.reshape(tl.arange(0, 2), [1] * (N_DIMS - j - 1) + [2] + [1] * j)


@triton.jit
def _compare_swap(h, flip, i: tl.constexpr, N_DIMS: tl.constexpr):
    """One bitonic compare-exchange on bit i of the flat index of hypercube ``h``.

    The partner's value is (pair sum) − own value: a sum reduction over the size-2 axis, which the
    interpreter vectorises (``tl.sort``'s xor reduction runs one Python call per element there);
    composites stay below 2^46, so the sum never overflows.
    """
    partner = tl.sum(h, N_DIMS - 1 - i, keep_dims=True) - h
    right = (flip ^ _indicator(N_DIMS, i)) != 0
    return tl.where(right, tl.maximum(h, partner), tl.minimum(h, partner))


@triton.jit
def _sort_rows(x, LOG_ROWS: tl.constexpr, LOG_BLOCK: tl.constexpr):
    """Ascending bitonic sort of every row of x [2^LOG_ROWS, 2^LOG_BLOCK] (distinct values)."""
    N_DIMS: tl.constexpr = LOG_ROWS + LOG_BLOCK
    h = tl.reshape(x, [2] * N_DIMS)
    for stage in tl.static_range(1, LOG_BLOCK + 1):
        if stage < LOG_BLOCK:
            flip = _indicator(N_DIMS, stage)
        else:
            flip = tl.zeros([1] * N_DIMS, tl.int32)
        for i in tl.static_range(stage):
            h = _compare_swap(h, flip, stage - 1 - i, N_DIMS)
    return tl.reshape(h, x.shape)


@triton.jit(do_not_specialize=["lo_bits", "span_bits", "k1", "k2"])
def _della_sort_kernel(X_ptr, OUT_ptr, n_rows, cols, lo_bits, span_bits, k1, k2, KEY_MODE: tl.constexpr,
                       KEY_BITS: tl.constexpr, WIDE: tl.constexpr, LOG_ROWS: tl.constexpr,
                       LOG_BLOCK: tl.constexpr):
    """Rows pid·ROWS … +ROWS, each of ``cols`` ≤ 2^LOG_BLOCK columns, ranked by one register sort."""
    ROWS: tl.constexpr = 1 << LOG_ROWS
    BLOCK: tl.constexpr = 1 << LOG_BLOCK
    PAD: tl.constexpr = (1 << (KEY_BITS + LOG_BLOCK)) - 1  # >= every composite: padding sorts last
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cidx = tl.arange(0, BLOCK)
    row_ok = rows < n_rows
    ok = row_ok[:, None] & (cidx < cols)[None, :]
    x = tl.load(X_ptr + rows[:, None] * cols + cidx[None, :], mask=ok, other=0)
    key = magnitude_key(x, KEY_MODE)
    if WIDE:
        comp = tl.where(ok, (key.to(tl.int64) << LOG_BLOCK) | cidx[None, :].to(tl.int64), PAD)
    else:
        comp = tl.where(ok, (key << LOG_BLOCK) | cidx[None, :], PAD)
    s = _sort_rows(comp, LOG_ROWS, LOG_BLOCK)
    col = (s & (BLOCK - 1)).to(tl.int64)
    rank = tl.arange(0, BLOCK).to(tl.int64)[None, :]
    e = rows[:, None] * cols + col
    keep = _keep_bits(e, rank, cols, lo_bits, span_bits, k1, k2)
    tl.store(OUT_ptr + e, keep, mask=row_ok[:, None] & (rank < cols))


@triton.jit(do_not_specialize=["base", "n", "cols", "lo_bits", "span_bits", "k1", "k2"])
def _della_ranked_kernel(ORDER_ptr, OUT_ptr, base, n, cols, lo_bits, span_bits, k1, k2, BLOCK: tl.constexpr):
    """Sorted positions q of a batch of rows (ORDER[q] = column of the element of rank q % cols)."""
    q = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = q < n
    col = tl.load(ORDER_ptr + q, mask=ok, other=0)
    rank = q % cols
    e = base + (q - rank) + col
    keep = _keep_bits(e, rank, cols, lo_bits, span_bits, k1, k2)
    tl.store(OUT_ptr + e, keep, mask=ok)


def sort_config(cols: int, n_rows: int) -> tuple[int, int, int, int]:
    """(LOG_ROWS, LOG_BLOCK, grid size, num_warps) of the sort path.

    GPU: tiles of max(2048, BLOCK) elements; 4 warps up to 2048 elements, 8 up to 4096, else 16
    (sm_90: no spills up to 8192 columns, < 1 KB of spills per thread at 16384–32768).
    """
    block = max(next_pow2(cols), 2)
    tile = 1 << 16 if interpreting() else 2048  # interpreter: few large programs (~1 ms each)
    rows = max(1, min(next_pow2(n_rows), tile // block))
    elems = rows * block
    warps = 4 if elems <= 2048 else 8 if elems <= 4096 else 16
    return rows.bit_length() - 1, block.bit_length() - 1, -(-n_rows // rows), warps


def sort_smem(cols: int, n_rows: int, nbits: int) -> int:
    """Shared memory of the sort path in bytes: triton exchanges the whole tile through it (sm_90)."""
    log_rows, log_block, _, _ = sort_config(cols, n_rows)
    return (1 << (log_rows + log_block)) * (8 if nbits + log_block > 30 else 4)


def _smem_budget(device: torch.device) -> int:
    """Shared memory one program may use on ``device`` (opt-in maximum; 96 KB if torch does not say)."""
    if device.type != "cuda":
        return 1 << 62
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 96 * 1024) - 2048


def _keys32(x: torch.Tensor) -> torch.Tensor:
    """int32 magnitude keys (own dtype) of x."""
    if x.dtype == torch.float32:
        return x.view(torch.int32) & 0x7FFFFFFF
    return x.view(torch.int16).to(torch.int32) & 0x7FFF


def della_mask(delta: torch.Tensor, density: float, epsilon: float, k1: int, k2: int,
               max_sort: int = MAX_SORT, ranked_batch: int = RANKED_BATCH,
               segment: Optional[int] = None, tile: Optional[int] = None) -> torch.Tensor:
    """Bool keep mask of Δ's shape on Δ's device (``backends.base`` ``della_mask``).

    Rows of at most ``max_sort`` columns whose tile fits the device's shared memory take the sort
    path (H100: bf16/fp16 rows up to 32768, fp32 up to 16384; 99 KB devices: 16384 / 8192); longer
    bf16/fp16 rows the counting path (``kernels.della_long``, segments of ``segment`` columns),
    longer fp32 rows the ranked path, ``ranked_batch`` elements of rows at a time (tests lower
    ``max_sort``, ``ranked_batch``, ``segment`` and its ``tile``).
    """
    if delta.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"della_mask takes float32, bfloat16 or float16 deltas, got {delta.dtype}")
    if density >= 1.0:
        return torch.ones(delta.shape, dtype=torch.bool, device=delta.device)
    if density <= 0.0 or delta.numel() == 0:
        return torch.zeros(delta.shape, dtype=torch.bool, device=delta.device)
    x = delta.contiguous()
    n = x.numel()
    cols = x.shape[-1] if x.dim() else 1
    n_rows = n // cols
    if cols >= 1 << 31:
        raise ValueError(f"della_mask rows must be shorter than 2^31 elements, got {cols}")
    out = torch.empty(delta.shape, dtype=torch.bool, device=delta.device)
    o8 = out.view(torch.uint8)
    lo, span = _f64_bits(float(density) - float(epsilon)), _f64_bits(2.0 * float(epsilon))
    k1, k2 = int(k1) & 0xFFFFFFFF, int(k2) & 0xFFFFFFFF
    mode, nbits = key_mode(x.dtype, None)
    if cols <= max_sort and sort_smem(cols, n_rows, nbits) <= _smem_budget(x.device):
        log_rows, log_block, grid, warps = sort_config(cols, n_rows)
        _della_sort_kernel[(grid,)](x, o8, n_rows, cols, lo, span, k1, k2, KEY_MODE=mode, KEY_BITS=nbits,
                                    WIDE=nbits + log_block > 30, LOG_ROWS=log_rows, LOG_BLOCK=log_block,
                                    num_warps=warps, enable_fp_fusion=False)
        return out
    if nbits == 15:
        from .della_long import della_mask_long

        della_mask_long(x, o8, cols, n_rows, mode, lo, span, k1, k2, segment, tile)
        return out
    x2 = x.reshape(n_rows, cols)
    per = max(1, ranked_batch // cols)
    for r0 in range(0, n_rows, per):
        order = torch.sort(_keys32(x2[r0: r0 + per]), dim=-1, stable=True).indices
        nb = order.numel()
        block = min(max(next_pow2(-(-nb // 16)), 1024), 1 << 16) if interpreting() else RANKED_BLOCK
        _della_ranked_kernel[(-(-nb // block),)](order, o8, r0 * cols, nb, cols, lo, span, k1, k2, BLOCK=block,
                                                 num_warps=4, enable_fp_fusion=False)
        del order
    return out
