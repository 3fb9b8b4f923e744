"""32768-bin histogram of the 15-bit magnitude key (x rounded to bf16 or fp16) in Triton.

hist[b] = #{e : key(x[e] rounded to stats_dtype) == b}, b in [0, 32768) (``reference.dppa.histogram_ref``).

Triton 3.6 has no shared-memory atomics and lowers a 32768-bin ``tl.histogram`` to a ballot loop
that costs hundreds of instructions per element, so each element does one relaxed
global ``atomic_add`` into an int64 histogram (L2 atomics; realistic deltas spread over thousands
of codes, so contention is low). The CUDA backend's shared-memory histogram is the fast path; this
one is the portable fallback.

Extra memory: the 32768-bin int64 output (256 KB); nothing per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..vocab import HIST_BINS
from .common import interpreting, key_mode, magnitude_key, next_pow2


@triton.jit
def _hist15_kernel(X_ptr, n, H_ptr, KEY_MODE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(X_ptr + offs, mask=ok, other=0)
    key = magnitude_key(x, KEY_MODE)
    tl.atomic_add(H_ptr + key, tl.full(key.shape, 1, tl.int64), mask=ok, sem="relaxed")


def histogram(x: torch.Tensor, stats_dtype: torch.dtype) -> torch.Tensor:
    """int64 [32768] CPU histogram of the magnitude key of x rounded to ``stats_dtype``."""
    mode, nbits = key_mode(x.dtype, stats_dtype)
    if nbits != 15:
        raise ValueError(f"stats_dtype must be bfloat16 or float16, got {stats_dtype}")
    n = x.numel()
    hist = torch.zeros(HIST_BINS, dtype=torch.int64, device=x.device)
    if n:
        block = min(max(next_pow2(-(-n // 64)), 1024), 1 << 16) if interpreting() else 1024
        _hist15_kernel[(-(-n // block),)](x, n, hist, KEY_MODE=mode, BLOCK=block, num_warps=4)
    return hist.cpu()
