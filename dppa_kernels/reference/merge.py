"""Reference sparsify-and-merge of M deltas (float64 throughout, one cast at the end)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..spec import CombineSpec, SparsifySpec
from . import sparsify as sp


def sparsify_factor(delta: torch.Tensor, spec: SparsifySpec, *, seed: int = 0, name: str = "",
                    stream: int = 0) -> torch.Tensor:
    """Per-element factor (float64) of one delta, before any rescale: the definition held by the
    spec's sparsifier (``dppa_kernels.methods``)."""
    from ..methods.registry import get_sparsifier  # the methods build on this package

    return get_sparsifier(spec.method, "spec.method").factor(delta, spec, seed=seed, name=name, stream=stream)


def sparsify_ref(delta: torch.Tensor, spec: SparsifySpec, *, seed: int = 0, name: str = "",
                 stream: int = 0, factor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sparsified (and rescaled) delta in float64 (``factor``: the sparsifier's, when known)."""
    f = sparsify_factor(delta, spec, seed=seed, name=name, stream=stream) if factor is None else factor
    scale = sp.rescale_factor(delta, f, spec.rescale, spec.density)
    return delta.to(torch.float64) * f * scale


def combine_ref(values: Sequence[torch.Tensor], weights: Sequence[float], spec: CombineSpec) -> torch.Tensor:
    """Combine sparsified deltas (float64) into one merged delta (float64)."""
    v = torch.stack([t.to(torch.float64) for t in values])
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64, device=v.device)
    w = w.reshape(-1, *([1] * (v.dim() - 1)))
    weighted = v * w
    if spec.combine == "ties":
        if spec.elect == "weighted_sum":
            majority, signs = torch.where(weighted.sum(0) >= 0, 1.0, -1.0), weighted.sign()
        elif spec.elect == "count":
            majority, signs = torch.where(weighted.sign().sum(0) >= 0, 1.0, -1.0), weighted.sign()
        elif spec.elect == "sum":
            majority, signs = torch.where(v.sum(0) >= 0, 1.0, -1.0), v.sign()
        elif spec.elect == "frequency":
            majority, signs = torch.where(v.sign().sum(0) >= 0, 1.0, -1.0), v.sign()
        else:
            raise ValueError(f"unknown elect {spec.elect!r}")
        agree = (signs == majority).to(torch.float64)  # zeros never agree
        mixed = (weighted * agree).sum(0)
        if spec.divisor == "weights":
            div = (w * agree).sum(0)
            div = torch.where(div == 0, 1.0, div)
        elif spec.divisor == "count":
            div = agree.sum(0).clamp(min=1.0)
        else:
            div = torch.ones_like(mixed)
    else:
        mixed = weighted.sum(0)
        if spec.divisor == "weights":
            div = w.sum(0).expand_as(mixed)
            div = torch.where(div.abs() < 1e-8, 1.0, div)
        elif spec.divisor == "count":
            div = torch.full_like(mixed, float(len(values)))
        else:
            div = torch.ones_like(mixed)
    if spec.normalize:
        mixed = mixed / div
    return mixed * spec.lam


def merge_ref(
    deltas: Sequence[torch.Tensor],
    base: Optional[torch.Tensor],
    specs: Sequence[SparsifySpec],
    weights: Sequence[float],
    combine: CombineSpec,
    *,
    seed: int = 0,
    name: str = "",
    out_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """base + combine(sparsify(Δ_i)), cast once to ``out_dtype`` (default: base's, else Δ's dtype).

    The stream of model i's random draws is i (its position in ``deltas``).
    """
    from ..methods.registry import get_sparsifier

    joint = get_sparsifier(specs[0].method)
    factors = joint.joint_factors(deltas, specs, weights) if joint.joint else [None] * len(deltas)
    vals = [sparsify_ref(d, s, seed=seed, name=name, stream=i, factor=f)
            for i, (d, s, f) in enumerate(zip(deltas, specs, factors))]
    mixed = combine_ref(vals, weights, combine)
    ref = base if base is not None else deltas[0]
    out = mixed if base is None else base.to(torch.float64) + mixed
    return out.to(out_dtype or ref.dtype)
