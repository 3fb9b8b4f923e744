"""Test inputs with realistic ties (PERF.md §5): never smooth Gaussians only, never zeros."""

from __future__ import annotations

import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]
SHAPES = [(1,), (7,), (1023,), (4097,), (5, 123, 123), (9, 7, 41)]


def realistic_delta(shape, dtype=torch.bfloat16, sigma=5e-4, seed=0) -> torch.Tensor:
    """Δ = dtype(base + N(0, σ)) − dtype(base), base ~ N(0, 0.02): heavy ties, many exact zeros."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    ft = (base.float() + torch.randn(shape, generator=g) * sigma).to(dtype)
    d = (ft.float() - base.float()).to(dtype)
    if d.numel() and bool((d == 0).all()):  # tiny shapes: make sure it is not all zeros
        d.view(-1)[0] = torch.tensor(sigma, dtype=dtype)
    return d


def quantised_delta(shape, dtype=torch.float32, levels=7, seed=0) -> torch.Tensor:
    """Values on a coarse grid: almost every threshold falls inside a large tie group."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-levels, levels + 1, shape, generator=g).to(torch.float32) / 64
    return q.to(dtype)


def family(shape, m=3, dtype=torch.bfloat16, sigma=5e-4, seed=0):
    """(base, [Δ_1..Δ_m]) with realistic ties."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    deltas = []
    for _ in range(m):
        ft = (base.float() + torch.randn(shape, generator=g) * sigma).to(dtype)
        deltas.append((ft.float() - base.float()).to(dtype))
    return base, deltas
