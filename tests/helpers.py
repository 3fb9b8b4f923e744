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


def fp32_unsure_elections(deltas, method: str, params: dict, *, seed: int = 0, name: str = "") -> torch.Tensor:
    """Bool mask of the elements whose TIES sign election fp32 may decide differently from float64.

    Every fast backend elects in fp32 (w_i rounded to fp32, every product and sum rounded); the
    reference elects in float64. Where the float64 vote Σ w_i·v_i (or Σ v_i) lies within the fp32
    rounding bound (2M + 2)·ε₃₂·Σ|w_i·v_i| of zero, the two elections may disagree and the merged
    values then differ by whole terms, legitimately. Sign-count elections are exact in both, and
    non-TIES merges elect nothing: all False.
    """
    from dppa_kernels.methods import preset
    from dppa_kernels.reference import sparsify_ref

    w, specs, combine = preset(method, len(deltas), dict(params))
    unsure = torch.zeros(deltas[0].shape, dtype=torch.bool)
    if combine.combine != "ties" or combine.elect in ("count", "frequency"):
        return unsure
    v = torch.stack([sparsify_ref(d, s, seed=seed, name=name, stream=i).cpu()
                     for i, (d, s) in enumerate(zip(deltas, specs))])
    if combine.elect == "weighted_sum":
        v = v * torch.tensor(w, dtype=torch.float64).reshape(-1, *([1] * (v.dim() - 1)))
    bound = (2 * len(deltas) + 2) * torch.finfo(torch.float32).eps * v.abs().sum(0)
    return (v.sum(0).abs() <= bound) & (bound > 0)


def assert_merge_close(got, ref, dtype, unsure) -> None:
    """``assert_ulp_close`` except at the ``unsure`` elections (``fp32_unsure_elections``), which
    must stay rare (a broken election is not excused: at most 1 in 10^4 elements, or 16)."""
    assert int(unsure.sum()) <= max(16, unsure.numel() // 10**4), f"{int(unsure.sum())} unsure elections"
    keep = ~unsure.reshape(-1)
    assert_ulp_close(got.cpu().reshape(-1)[keep], ref.cpu().reshape(-1)[keep], dtype)
