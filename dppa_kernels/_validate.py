"""Input checks shared by the public ops: each error names the argument and the value."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import torch

from .backends.base import NonFiniteInput, nonfinite_key
from .methods.registry import get_sparsifier
from .spec import CombineSpec, SparsifySpec
from .vocab import (BAND_COMBINES, COMBINES, COUNT_RULES, DIVISORS, ELECTS, FAST_DTYPES, PARTITIONS, RESCALES,
                    TIE_MODES)

ALL_DTYPES = FAST_DTYPES + (torch.float64,)


def check_tensor(x, argname: str, *, allow_fp64: bool = True) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{argname} must be a torch.Tensor, got {type(x).__name__}")
    allowed = ALL_DTYPES if allow_fp64 else FAST_DTYPES
    if x.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise TypeError(f"{argname} must be {names}, got {x.dtype}")


def check_finite(x: torch.Tensor, argname: str) -> None:
    if x.numel() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{argname} contains {bad} NaN/Inf value(s); clean the input or pass check_finite=False")


def checked_pass(run: Callable[[bool], Any], x: torch.Tensor, argname: Optional[str]):
    """``run(check)`` a select pass that reports non-finite keys of ``x`` (``argname``: check it;
    None: do not). A report becomes the ValueError of :func:`check_finite`; when that finds x
    finite (only possible when a finite value overflows a narrower key dtype) the pass reruns
    without the check."""
    if argname is None:
        return run(False)
    try:
        return run(True)
    except NonFiniteInput:
        check_finite(x, argname)
        return run(False)


def histogram_checked(be, x: torch.Tensor, kd: torch.dtype, argname: Optional[str]) -> torch.Tensor:
    """The 15-bit key histogram; with ``argname``, its bins of NaN/Inf keys must be empty."""
    hist = be.histogram(x, kd)
    if argname is not None and bool(hist[nonfinite_key(kd):].any()):
        check_finite(x, argname)  # raises, unless a finite value only overflowed the key dtype
    return hist


def check_density(d, argname: str = "density") -> float:
    if isinstance(d, bool) or not isinstance(d, (int, float)):
        raise TypeError(f"{argname} must be a float in [0, 1], got {type(d).__name__}")
    d = float(d)
    if math.isnan(d) or d < 0.0 or d > 1.0:
        raise ValueError(f"{argname} must be in [0, 1], got {d}")
    return d


def check_choice(value, choices: Sequence[str], argname: str) -> None:
    if value not in choices:
        raise ValueError(f"{argname} must be one of {tuple(choices)}, got {value!r}")


def check_same(tensors: Sequence[torch.Tensor], argname: str, ref: Optional[torch.Tensor] = None,
               refname: str = "") -> None:
    first = ref if ref is not None else tensors[0]
    fname = refname or f"{argname}[0]"
    for i, t in enumerate(tensors):
        if tuple(t.shape) != tuple(first.shape):
            raise ValueError(f"{argname}[{i}] has shape {tuple(t.shape)}, expected {tuple(first.shape)} like {fname}")
        if t.dtype != first.dtype:
            raise TypeError(f"{argname}[{i}] has dtype {t.dtype}, expected {first.dtype} like {fname}")
        if t.device != first.device:
            raise ValueError(f"{argname}[{i}] is on {t.device}, expected {first.device} like {fname}")


def check_sparsify_spec(s: SparsifySpec, argname: str = "spec") -> None:
    """The shared fields here, the method's own in its sparsifier (``dppa_kernels.methods``)."""
    sp = get_sparsifier(s.method, f"{argname}.method")
    check_choice(s.tie_mode, TIE_MODES, f"{argname}.tie_mode")
    check_choice(s.partition, PARTITIONS, f"{argname}.partition")
    check_choice(s.count_rule, COUNT_RULES, f"{argname}.count_rule")
    check_choice(s.rescale, RESCALES, f"{argname}.rescale")
    check_choice(s.band_combine, BAND_COMBINES, f"{argname}.band_combine")
    if s.partition == "block" and (not isinstance(s.block_size, int) or s.block_size < 1):
        raise ValueError(f"{argname}.block_size must be a positive int for partition='block', got {s.block_size!r}")
    if s.key_dtype is not None and s.key_dtype not in FAST_DTYPES:
        raise TypeError(f"{argname}.key_dtype must be bfloat16, float16 or float32, got {s.key_dtype}")
    if sp.uses_density:
        check_density(s.density, f"{argname}.density")
    sp.check(s, argname)


def check_specs(specs: Sequence[SparsifySpec], argname: str = "specs") -> None:
    """Each spec, and that a sparsifier which looks at every delta at once (consensus) is every
    delta's, with the settings it needs to agree on."""
    for i, s in enumerate(specs):
        check_sparsify_spec(s, f"{argname}[{i}]")
    joint = [get_sparsifier(s.method) for s in specs if get_sparsifier(s.method).joint]
    if joint:
        if len(joint) != len(specs) or any(s.method != specs[0].method for s in specs):
            raise ValueError(f"{argname}: method {joint[0].name!r} merges every delta together; got methods "
                             f"{[s.method for s in specs]}")
        joint[0].check_joint(specs, argname)


def check_combine_spec(c: CombineSpec) -> None:
    check_choice(c.combine, COMBINES, "combine.combine")
    check_choice(c.elect, ELECTS, "combine.elect")
    check_choice(c.divisor, DIVISORS, "combine.divisor")
    if not math.isfinite(c.lam):
        raise ValueError(f"lambda must be finite, got {c.lam}")
