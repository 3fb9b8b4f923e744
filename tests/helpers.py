"""Test inputs with realistic ties (docs/methods.md, tie rules): never smooth Gaussians only, never zeros."""

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


def assert_ulp_close(a, b, dtype):
    """Within one output ulp of the float64 reference, plus the fp32 reduction error.

    Fast backends compute in fp32 and round once; the reference computes in float64 and rounds
    once, so a value may land on the neighbouring representable number (1 ulp of the output
    dtype; the Triton interpreter's truncating fp32 -> bf16 stores stay within it). Sums of M
    terms in fp32 add a few fp32 ulps at the scale of the largest value (tolerance at max|ref|).
    """
    a, b = a.double().cpu(), b.double().cpu()
    scale = b.abs().max() if b.numel() else torch.tensor(0.0)
    tol = torch.finfo(dtype).eps * b.abs() + 8 * torch.finfo(torch.float32).eps * scale + 1e-30
    bad = (a - b).abs() > tol
    assert not bool(bad.any()), (f"{int(bad.sum())} mismatches, first at {bad.nonzero()[:3].tolist()}: "
                                 f"{a[bad][:3].tolist()} vs {b[bad][:3].tolist()}")
