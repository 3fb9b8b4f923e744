"""DPPA phase A, the statistics pass: one 32768-bin magnitude histogram per unit delta.

:class:`~dppa_kernels.dppa.DPPA` and the mergekit pre-pass take their histograms through
:func:`unit_histogram` (so a test can count the passes); the engine's streaming pass uses the
planned variant of the same primitive, which also finds NaN/Inf inside the pass. Checkpoint
folders are read with the engine's one reader (:class:`engine.source.ModelSource`).
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import torch

from ..ops import tensor_histogram
from ..reference.naming import group_units
from ..vocab import STATS_DTYPES
from .defaults import OFFICIAL_SETTINGS, check_compat



def stats_dtype_of(name) -> torch.dtype:
    """The statistics dtype named ``name`` (a torch dtype passes through); ValueError otherwise."""
    if isinstance(name, torch.dtype) and name in STATS_DTYPES.values():
        return name
    if name not in STATS_DTYPES:
        raise ValueError(f"stats_dtype must be one of {sorted(STATS_DTYPES)}, got {str(name)[:40]!r}")
    return STATS_DTYPES[name]


def unit_histogram(delta: torch.Tensor, stats_dtype: torch.dtype = torch.bfloat16,
                   backend: str = "auto") -> torch.Tensor:
    """int64 histogram (32768 bins, CPU) of the magnitude key of ``delta`` rounded to ``stats_dtype``.

    NaN/Inf are not checked here (the caller forms the delta and decides)."""
    return tensor_histogram(delta, stats_dtype=stats_dtype, check_finite=False, backend=backend)


def delta_round_dtype(compat) -> Optional[torch.dtype]:
    """The dtype Δ is rounded to before pruning: bf16 under ``compat="official"`` (the official
    procedure forms Δ = ft − base in the models' bf16 and prunes that), else None (Δ keeps the
    working dtype)."""
    return STATS_DTYPES[OFFICIAL_SETTINGS["stats_dtype"]] if check_compat(compat) == "official" else None


def form_delta(base: torch.Tensor, ft: torch.Tensor, dtype: Optional[torch.dtype] = None, *,
               compat=None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Δ = ft − base in ``dtype`` (default: the pair's promoted dtype), rounded once.

    Under ``compat="official"`` the difference (in at least fp32) is rounded once to bf16 and
    held in ``dtype``: the bf16 Δ the official procedure prunes (for bf16 inputs, the same bits
    as the bf16 subtraction). ``out``: a tensor of ``dtype`` and base's shape to write into."""
    dt = dtype or torch.promote_types(base.dtype, ft.dtype)
    rd = delta_round_dtype(compat)
    if rd is None or rd == dt:
        return torch.sub(ft.to(dt), base.to(dt), out=out)
    wide = torch.promote_types(dt, torch.float32)
    rounded = torch.sub(ft.to(wide), base.to(wide)).to(rd)
    return rounded.to(dt) if out is None else out.copy_(rounded)


def _open(model_dir: str):
    from ..engine.source import ModelSource

    return ModelSource(model_dir)


def tensor_shapes(model_dir: str, floating_only: bool = True) -> dict:
    """{tensor name: shape} of a checkpoint folder (headers only)."""
    src = _open(model_dir)
    try:
        return {n: tuple(t.shape) for n, t in src.tensors.items() if t.dtype.is_floating_point or not floating_only}
    finally:
        src.close()


def unit_layers(model_dir: str, *, unit_pattern: Optional[str] = None,
                layer_pattern: Optional[str] = None) -> dict:
    """{unit tensor name: layer} of a checkpoint folder, from its names and shapes."""
    pats = {k: v for k, v in (("unit_pattern", unit_pattern), ("layer_pattern", layer_pattern)) if v}
    return group_units(tensor_shapes(model_dir, floating_only=False), **pats)


def folder_histograms(base_dir: str, model_dir: str, names: Sequence[str], *, dtype=None,
                      stats_dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
                      backend: str = "auto", compat=None) -> dict:
    """{unit name: histogram of Δ = ft − base} of two checkpoint folders; Δ formed by
    :func:`form_delta` in ``dtype`` (a dtype or a per-name mapping; default: the pair's promoted
    dtype) on ``device``."""
    base, ft = _open(base_dir), _open(model_dir)
    hists = {}
    try:
        for name in names:
            if name not in ft.tensors:
                raise KeyError(f"{model_dir!r} has no tensor {name!r} (present in the base model)")
            if tuple(base.tensors[name].shape) != tuple(ft.tensors[name].shape):
                raise ValueError(f"{name}: shape {tuple(ft.tensors[name].shape)} in {model_dir!r} differs "
                                 f"from the base's {tuple(base.tensors[name].shape)}")
            dt = dtype.get(name) if isinstance(dtype, Mapping) else dtype
            delta = form_delta(base.read(name).to(device), ft.read(name).to(device), dt, compat=compat)
            hists[name] = unit_histogram(delta, stats_dtype, backend)
            del delta
    finally:
        base.close()
        ft.close()
    return hists


def promoted_dtypes(model_dirs: Sequence[str], names) -> dict:
    """{name: dtype every model promotes to}, from the safetensors headers (no data read)."""
    out: dict = {}
    for d in model_dirs:
        src = _open(d)
        try:
            for n in names:
                dt = src.tensors[n].dtype
                if not dt.is_floating_point:
                    raise TypeError(f"{n} in {d!r} has dtype {dt}; DPPA statistics need a float tensor")
                out[n] = dt if n not in out else torch.promote_types(out[n], dt)
        finally:
            src.close()
    return out


def unit_bytes(model_dir: str, names) -> int:
    """Bytes of the named tensors in a checkpoint folder (for the pre-pass cost report)."""
    src = _open(model_dir)
    try:
        return sum(src.tensors[n].end - src.tensors[n].begin for n in names)
    finally:
        src.close()
