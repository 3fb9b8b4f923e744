"""Counter-based hash RNG shared by every backend.

A DARE/DELLA draw is a pure function of (seed, tensor name, stream, flat element index): no
global RNG state, so the mask is identical on every backend, device, launch grid and thread count.

Definitions (all arithmetic on unsigned 32-bit integers, wrapping):

    fmix32(h):  h ^= h >> 16; h *= 0x85EBCA6B; h ^= h >> 13; h *= 0xC2B2AE35; h ^= h >> 16
    (k1, k2) = stream_keys(seed, name, stream)            # host side, once per tensor and model
    bits(i)  = fmix32(fmix32(lo32(i) ^ k1) ^ k2 ^ (hi32(i) * 0x9E3779B9))
    keep     = bits(i) < threshold32(p),  threshold32(p) = floor(p * 2**32)  (p >= 1 keeps all)

The integer comparison makes "keep" exact: no backend compares floats.
"""

from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF
_C1, _C2, _GOLDEN = 0x85EBCA6B, 0xC2B2AE35, 0x9E3779B9


def fmix32_int(h: int) -> int:
    """MurmurHash3's 32-bit finaliser on a Python int (host side)."""
    h &= MASK32
    h ^= h >> 16
    h = (h * _C1) & MASK32
    h ^= h >> 13
    h = (h * _C2) & MASK32
    h ^= h >> 16
    return h


def fnv1a32(text: str) -> int:
    """FNV-1a hash of the UTF-8 bytes of a tensor name."""
    h = 0x811C9DC5
    for byte in text.encode("utf-8"):
        h = ((h ^ byte) * 0x01000193) & MASK32
    return h


def stream_keys(seed: int, name: str = "", stream: int = 0) -> tuple[int, int]:
    """The two 32-bit keys of the random stream for one (seed, tensor name, stream).

    ``stream`` separates independent draws on the same tensor (the model index in a merge).
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {type(name).__name__}")
    s = seed & 0xFFFFFFFFFFFFFFFF
    k1 = fmix32_int(fmix32_int(s & MASK32) ^ fnv1a32(name))
    k2 = fmix32_int(fmix32_int((s >> 32) ^ k1) ^ fmix32_int((stream * _GOLDEN) & MASK32) ^ 0x5BD1E995)
    return k1, k2


def threshold32(p: float) -> int:
    """floor(p * 2**32) clamped to [0, 2**32]; ``bits < threshold32(p)`` has probability p."""
    if not p > 0.0:
        return 0
    if p >= 1.0:
        return 1 << 32
    return min(int(math.floor(p * 4294967296.0)), 1 << 32)


def _mul32(a: torch.Tensor, c: int) -> torch.Tensor:
    # (a * c) mod 2**32 on int64 tensors holding uint32 values, split so nothing exceeds 2**48.
    lo = a * (c & 0xFFFF)
    hi = ((a * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, _C1)
    h = h ^ (h >> 13)
    h = _mul32(h, _C2)
    return h ^ (h >> 16)


def random_bits(n: int, k1: int, k2: int, *, offset: int = 0, device="cpu") -> torch.Tensor:
    """uint32 hash values (as int64) for flat indices offset .. offset+n-1."""
    idx = torch.arange(offset, offset + n, dtype=torch.int64, device=device)
    lo = idx & MASK32
    hi = idx >> 32
    h = _fmix32(lo ^ k1)
    return _fmix32(h ^ k2 ^ _mul32(hi, _GOLDEN))


def keep_mask(n: int, p: float, k1: int, k2: int, *, device="cpu") -> torch.Tensor:
    """Bernoulli(p) keep mask of n elements from the stream (k1, k2)."""
    return random_bits(n, k1, k2, device=device) < threshold32(p)
