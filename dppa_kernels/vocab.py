"""The shared vocabulary: every list of choices, every integer code that crosses into compiled
code (C++, CUDA, Triton constexprs), every hard limit, and the partition geometry.

Names map to codes in explicit dicts (never "the position in a tuple"). The C++ and CUDA
extensions compile the same numbers from ``csrc/vocab.h`` and export them as ``VOCAB``;
``dppa_kernels._C`` compares that export with :func:`extension_vocab` when it loads an extension
and refuses one that disagrees, so a stale or mismatched build cannot silently misread a code.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

# Element dtypes of the fast backends, and their code in the extensions.
DTYPE_CODES = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
FAST_DTYPES = tuple(DTYPE_CODES)
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}

# Dtype names a merge config or the command line may give, and their torch dtype.
DTYPE_BY_NAME = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                 "float64": torch.float64, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The dtypes DPPA's magnitude statistics may be rounded to (16-bit: a 32768-bin key histogram), by name.
STATS_DTYPES = {name: DTYPE_BY_NAME[name] for name in ("bfloat16", "bf16", "float16", "fp16")}

# Magnitude-key modes of the kernels: which dtype the key of an element is read in.
#   native16: x is bf16/fp16 keyed in its own dtype (bits & 0x7FFF)
#   f32: fp32 key of any x (widened exactly); bf16 / f16: x rounded to bf16 / fp16 (not x's dtype)
KEY_MODE_CODES = {"native16": 0, "f32": 1, "bf16": 2, "f16": 3}

PARTITIONS = ("tensor", "row", "block")
COUNT_RULES = ("floor", "min1", "dppa")
RESCALES = ("none", "inv_density", "l1")
BAND_COMBINES = ("max", "direct")
TIE_MODE_CODES = {"exact_k": 0, "ge": 1, "gt": 2}
TIE_MODES = tuple(TIE_MODE_CODES)
PLAN_KIND_CODES = {"dense": 0, "thresholds": 1, "dare": 2, "mask": 3}
COMBINE_CODES = {"sum": 0, "ties": 1}
COMBINES = tuple(COMBINE_CODES)
ELECT_CODES = {"weighted_sum": 0, "count": 1, "sum": 2, "frequency": 3}
ELECTS = tuple(ELECT_CODES)
DIVISOR_CODES = {"weights": 0, "count": 1, "none": 2}
DIVISORS = tuple(DIVISOR_CODES)

HIST_BINS = 1 << 15  # bins of the 15-bit magnitude-key histogram (DPPA statistics)
MAX_BANDS = 8  # most levels (DPPA bands) one plan may have: the compiled apply passes hold them in registers


def dtype_code(dtype: torch.dtype) -> int:
    """The extensions' code of a fast dtype."""
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"dtype must be one of bfloat16, float16, float32, got {dtype}") from None


def key_mode(x_dtype: torch.dtype, key_dtype: Optional[torch.dtype]) -> tuple[int, int]:
    """(key-mode code, key bits) of a tensor of ``x_dtype`` keyed in ``key_dtype`` (None: its own)."""
    kd = key_dtype or x_dtype
    if kd == torch.float32:
        return KEY_MODE_CODES["f32"], 31
    if kd == x_dtype:
        return KEY_MODE_CODES["native16"], 15
    if kd == torch.bfloat16:
        return KEY_MODE_CODES["bf16"], 15
    if kd == torch.float16:
        return KEY_MODE_CODES["f16"], 15
    raise TypeError(f"key_dtype must be bfloat16, float16 or float32, got {kd}")


def partition_geometry(shape: Sequence[int], partition: str, block_size: Optional[int]) -> tuple[int, int]:
    """(L, P): partition length and number of partitions of a tensor of ``shape``.

    ``tensor``: (n, 1), also for n = 0; ``row``: (shape[-1], n / shape[-1]) (a 0-d tensor is one
    row of 1; rows of 0 columns: P = 0); ``block``: (block_size, ceil(n / block_size)), the last
    block holding the remaining n − (P − 1)·L elements.
    """
    n = 1
    for s in shape:
        n *= int(s)
    if partition == "tensor":
        return n, 1
    if partition == "row":
        cols = int(shape[-1]) if len(shape) else 1
        return cols, (n // cols if cols else 0)
    if partition == "block":
        if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
            raise ValueError(f"block_size must be a positive int for partition='block', got {block_size!r}")
        return block_size, -(-n // block_size)
    raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")


def extension_vocab() -> dict:
    """What ``csrc/vocab.h`` must define, in the form the extensions export it (``VOCAB``)."""
    return {
        "dtype": {DTYPE_NAMES[d]: c for d, c in DTYPE_CODES.items()},
        "key_mode": dict(KEY_MODE_CODES),
        "plan_kind": dict(PLAN_KIND_CODES),
        "tie_mode": dict(TIE_MODE_CODES),
        "combine": dict(COMBINE_CODES),
        "elect": dict(ELECT_CODES),
        "divisor": dict(DIVISOR_CODES),
        "HIST_BINS": HIST_BINS,
        "MAX_BANDS": MAX_BANDS,
    }


def vocab_mismatch(exported: object) -> str:
    """'' when an extension's exported ``VOCAB`` equals :func:`extension_vocab`, else what differs."""
    want = extension_vocab()
    if not isinstance(exported, dict):
        return f"exports no VOCAB dict (got {type(exported).__name__})"
    diffs = [f"{k}: extension {exported.get(k)!r}, Python {v!r}" for k, v in want.items() if exported.get(k) != v]
    return "; ".join(diffs)
