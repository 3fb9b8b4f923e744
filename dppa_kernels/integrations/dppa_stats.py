"""DPPA statistics pre-pass over checkpoints on disk (safetensors), for hosts that merge tensor by
tensor (mergekit) and so cannot see the whole-model statistics DP needs (docs/methods.md, DPPA).

One streaming read of every unit tensor of the base and of each fine-tuned model: Δ = ft − base
in the dtype the host will merge in, a 32768-bin histogram per unit (256 KiB), then the DP
allocation per model. Nothing but the histograms of one model is kept at a time.
"""

from __future__ import annotations

import json
import os
from typing import Mapping, Optional, Sequence

import torch

from ..ops import dp_densities, tensor_histogram
from ..reference.dppa import DPAllocation
from ..reference.naming import group_units


def tensor_files(model_dir: str) -> dict:
    """{tensor name: safetensors file} of a Hugging Face model folder (sharded or not)."""
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        return {n: os.path.join(model_dir, fn) for n, fn in weight_map.items()}
    single = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(single):
        from safetensors import safe_open

        with safe_open(single, framework="pt") as f:
            return {n: single for n in f.keys()}
    raise FileNotFoundError(
        f"no model.safetensors or model.safetensors.index.json in {model_dir!r}: the DPPA "
        "statistics pass reads safetensors checkpoints only")


class _Reader:
    """Keeps one safe_open handle per file (files are mmap-ed, reads are lazy)."""

    def __init__(self, model_dir: str, device: str = "cpu"):
        self.files = tensor_files(model_dir)
        self.device = device
        self._open: dict = {}

    def shape(self, name: str) -> tuple:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def _handle(self, name: str):
        from safetensors import safe_open

        path = self.files[name]
        if path not in self._open:
            self._open[path] = safe_open(path, framework="pt", device=self.device)
        return self._open[path]

    def close(self) -> None:
        self._open.clear()


def unit_layers(model_dir: str, *, unit_pattern: Optional[str] = None,
                layer_pattern: Optional[str] = None) -> dict:
    """{unit tensor name: layer} of a checkpoint, from its names and shapes."""
    r = _Reader(model_dir)
    pats = {k: v for k, v in (("unit_pattern", unit_pattern), ("layer_pattern", layer_pattern)) if v}
    return group_units({n: r.shape(n) for n in r.files}, **pats)


def unit_histograms(base_dir: str, model_dir: str, layers: Mapping[str, int], *,
                    dtype=None, stats_dtype: torch.dtype = torch.bfloat16,
                    device: str = "cpu", backend: str = "auto") -> dict:
    """{unit name: histogram of Δ = ft − base}, Δ formed in ``dtype`` (a dtype or a per-name
    mapping; default: the pair's promoted dtype)."""
    base, ft = _Reader(base_dir, device), _Reader(model_dir, device)
    hists = {}
    try:
        for name in layers:
            if name not in ft.files:
                raise KeyError(f"{model_dir!r} has no tensor {name!r} (present in the base model)")
            b, x = base.get(name), ft.get(name)
            if tuple(b.shape) != tuple(x.shape):
                raise ValueError(f"{name}: shape {tuple(x.shape)} in {model_dir!r} differs from the "
                                 f"base's {tuple(b.shape)}")
            dt = dtype.get(name) if isinstance(dtype, Mapping) else dtype
            dt = dt or torch.promote_types(b.dtype, x.dtype)
            delta = x.to(dt) - b.to(dt)
            del b, x
            # check_finite off: a NaN in a checkpoint is the host's business, not a crash here
            hists[name] = tensor_histogram(delta, stats_dtype=stats_dtype, check_finite=False,
                                           backend=backend)
            del delta
    finally:
        base.close()
        ft.close()
    return hists


def model_allocation(base_dir: str, model_dir: str, *, levels: Sequence[float],
                     layers: Optional[Mapping[str, int]] = None, dtype=None,
                     stats_dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
                     backend: str = "auto", **dp_kwargs) -> DPAllocation:
    """DP allocation of one fine-tuned model against the base (``dp_kwargs``: offset_lambda,
    outlier_mult_layer, outlier_mult_unit, density_clamp, compat)."""
    layers = unit_layers(base_dir) if layers is None else dict(layers)
    if not layers:
        raise ValueError(f"no DPPA unit tensors (2-D linear weights inside numbered blocks) found in "
                         f"{base_dir!r}; pass unit_pattern/layer_pattern")
    hists = unit_histograms(base_dir, model_dir, layers, dtype=dtype, stats_dtype=stats_dtype,
                            device=device, backend=backend)
    return dp_densities(hists, densities=tuple(levels), layers=layers, stats_dtype=stats_dtype,
                        backend=backend, **dp_kwargs)


_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def promoted_dtypes(model_dirs: Sequence[str], names) -> dict:
    """{name: dtype all models promote to}, from the safetensors headers (no data read)."""
    out: dict = {}
    for d in model_dirs:
        r = _Reader(d)
        for n in names:
            s = r._handle(n).get_slice(n).get_dtype()
            if s not in _ST_DTYPES:
                raise TypeError(f"{n} in {d!r} has dtype {s}; DPPA statistics need a float tensor")
            dt = _ST_DTYPES[s]
            out[n] = dt if n not in out else torch.promote_types(out[n], dt)
        r.close()
    return out


def unit_bytes(model_dir: str, names) -> int:
    """Bytes of the named tensors in a checkpoint (for the pre-pass cost report)."""
    r = _Reader(model_dir)
    total = 0
    for n in names:
        sl = r._handle(n).get_slice(n)
        numel = 1
        for s in sl.get_shape():
            numel *= s
        total += numel * _ST_DTYPES.get(sl.get_dtype(), torch.float32).itemsize
    r.close()
    return total
