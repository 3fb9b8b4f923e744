"""32768-bin histogram of the 15-bit magnitude key (x rounded to bf16 or fp16) in Triton.

hist[b] = #{e : key(x[e] rounded to stats_dtype) == b}, b in [0, 32768) (``reference.dppa.histogram_ref``).

Triton 3.6 has no shared-memory atomics and lowers a 32768-bin ``tl.histogram`` to a ballot loop
that costs hundreds of instructions per element. One global ``atomic_add`` per
element serialises in L2 on realistic deltas, whose keys crowd into a few hundred hot bins
(measured on an H200: about 5·10⁹ elements/s whatever the size). So each tile of 2^LOG_BLOCK
elements is first sorted in registers (``della_long.sorted_tile_runs``): equal keys become runs,
and each run adds its length with one atomic, once per distinct key of the tile. The CUDA
backend's shared-memory histogram is the fast path; this one is the portable fallback.

Extra memory: the 32768-bin int64 output (256 KB); nothing per element.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..vocab import HIST_BINS
from .common import interpreting, key_mode
from .della_long import sorted_tile_runs

LOG_BLOCK = 11  # tile of 2048 keys: int32 sort composites of 26 bits


@triton.jit
def _hist15_kernel(X_ptr, n, chunk, H_ptr, KEY_MODE: tl.constexpr, LOG_BLOCK: tl.constexpr):
    """Program s adds the keys of elements [s·chunk, (s+1)·chunk) to H, one atomic per run."""
    c = tl.program_id(0).to(tl.int64) * chunk
    end = tl.minimum(c + chunk, n)
    while c < end:
        skey, col, tie, last, real = sorted_tile_runs(X_ptr, 0, c, end, KEY_MODE, LOG_BLOCK)
        tl.atomic_add(H_ptr + skey, (tie + 1).to(tl.int64), mask=last, sem="relaxed")
        c += 1 << LOG_BLOCK


def histogram(x: torch.Tensor, stats_dtype: torch.dtype, tiles_per_program: Optional[int] = None) -> torch.Tensor:
    """int64 [32768] CPU histogram of the magnitude key of x rounded to ``stats_dtype``
    (``tiles_per_program`` overrides the launch plan: tests)."""
    mode, nbits = key_mode(x.dtype, stats_dtype)
    if nbits != 15:
        raise ValueError(f"stats_dtype must be bfloat16 or float16, got {stats_dtype}")
    n = x.numel()
    hist = torch.zeros(HIST_BINS, dtype=torch.int64, device=x.device)
    if n:
        lb = 13 if interpreting() else LOG_BLOCK  # interpreter: few large tiles (~1 ms per program)
        tiles = -(-n >> lb)
        # GPU: about 8 tiles per program, for ≥ 4 programs per SM on large tensors
        per = tiles_per_program or (16 if interpreting() else max(1, min(8, tiles // (4 * _sms(x.device)))))
        chunk = per << lb
        _hist15_kernel[(-(-n // chunk),)](x, n, chunk, hist, KEY_MODE=mode, LOG_BLOCK=lb, num_warps=8)
    return hist.cpu()


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
