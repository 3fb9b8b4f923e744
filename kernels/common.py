"""Shared Triton device helpers: magnitude keys, the counter-based hash RNG, launch helpers.

Magnitude key (``reference.threshold``): the bits of x rounded to the key dtype, sign cleared:
15 bits for bf16/fp16, 31 for fp32. ``KEY_MODE`` (a constexpr; the codes of ``vocab.KEY_MODE_CODES``,
chosen by :func:`vocab.key_mode`):

    0  x is bf16/fp16 and the key dtype is x's dtype: bits & 0x7FFF
    1  fp32 key (x of any dtype, widened exactly): bits & 0x7FFFFFFF
    2  bf16 key of a non-bf16 x: round-to-nearest-even on the fp32 bits, done with integers
       because the interpreter truncates fp32 -> bf16 casts
    3  fp16 key of a non-fp16 x: fp32 -> fp16 cast (round-to-nearest-even on GPU and interpreter)
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

from ..vocab import key_mode  # noqa: F401  (the kernels' KEY_MODE constexpr)


def interpreting() -> bool:
    """Whether triton runs kernels in its CPU interpreter (read once by triton at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@triton.jit
def magnitude_key(x, KEY_MODE: tl.constexpr):
    """int32 magnitude key of a loaded tile ``x`` (native dtype)."""
    if KEY_MODE == 0:
        k = x.to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    elif KEY_MODE == 1:
        k = x.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF
    elif KEY_MODE == 2:
        u = x.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF
        # a NaN becomes the quiet NaN torch rounds it to (key 0x7FC0), so no u overflows int32 below
        u = tl.where(u > 0x7F800000, 0x7FC00000, u)
        # RNE to the upper 16 bits; no int32 overflow for u <= 0x7F800000 (+ 0xFFFF)
        k = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    else:
        k = x.to(tl.float32).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32) & 0x7FFF
    return k


@triton.jit
def nonfinite(x):
    """int1: x (a loaded tile, any float dtype) is NaN or ±Inf (NaN fails every comparison)."""
    return ~(tl.abs(x.to(tl.float32)) <= 3.4028234663852886e38)


@triton.jit
def _fmix32(h):
    h ^= h >> 16
    h = h * 0x85EBCA6B
    h ^= h >> 13
    h = h * 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def hash_bits(idx, k1, k2):
    """uint32 hash of int64 flat indices ``idx`` (``reference.rng.random_bits``); k1, k2 uint32."""
    lo = (idx & 0xFFFFFFFF).to(tl.uint32)
    hi = (idx >> 32).to(tl.uint32)
    h = _fmix32(lo ^ k1)
    return _fmix32(h ^ k2 ^ (hi * 0x9E3779B9))
