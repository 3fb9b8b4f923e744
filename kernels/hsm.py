"""Fused HSM (Hybrid Sparsification Module) kernels of PAT, forward and backward.

    u = y L0ᵀ                      (N×r, torch GEMM, saved)
    out = g ⊙ (y + u L1ᵀ) [+ res]  with g = s ⊙ m             (Triton: K-loop over r + epilogue)

Backward, given dout = ∂L/∂out (∂L/∂res = dout):

    z = y + u L1ᵀ (recomputed, never stored), gz = dout ⊙ g    (Triton, one pass)
    dg = Σ_N dout ⊙ z, ds = dg ⊙ m, dm = dg ⊙ s               (Triton partial sums per row block)
    du = gz L1, dy = gz + du L0 (one addmm), dL1 = gzᵀ u, dL0 = duᵀ y      (torch GEMMs)

The low-rank GEMMs stay in torch (cuBLAS); the Triton kernels fuse the second low-rank product
(u L1ᵀ) with everything elementwise (mask gate, scale, residual add), so D = I + L1 L0 is never
formed and z never reaches memory. The rank r is padded to the BLOCK_R tile *inside* the kernel by
masked loads; parameters are never padded (padding would change the identity-loss target I_r).

Memory traffic per element of the [N, d] activations (e = bytes of the activation dtype), on top of
the GEMMs' own reads: forward reads y and res and writes out (2e, +e with a residual), plus one read
of y by the u GEMM; saved for backward: y (shared with autograd) and u (N×r, r ≪ d), no z.
Backward: the fused pass reads dout and y and writes gz (3e); the GEMMs then read gz three times
(du, dL1, the addmm) and y once (dL0), and write dy (e). The eager reference needs ≈ 5 passes
forward and ≈ 10 backward over [N, d].

Numerics: every tile is upcast to fp32 right after ``tl.load`` (required by the interpreter, and the
epilogue math is fp32 on GPU too); the L1 product accumulates in fp32. With bf16/fp16 activations on
a GPU the L1 dot runs on bf16/fp16 operands with an fp32 accumulator; with fp32 activations (and
always under the interpreter, whose bf16 ``tl.dot`` multiplies bit patterns) it runs in fp32 IEEE.

Importing this module imports triton; ``dppa_kernels.pat.ops`` imports it lazily and falls back to
the torch reference (``dppa_kernels.pat.reference.hsm_ref``) when that fails.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

try:  # the interpreter wraps @triton.jit functions when TRITON_INTERPRET=1 was set before import
    from triton.runtime.interpreter import InterpretedFunction as _Interpreted
except Exception:  # pragma: no cover - layout of a future triton
    _Interpreted = ()


@triton.jit
def _lowrank_tile(U_ptr, L1_ptr, rows, cols, row_ok, col_ok, u_row_stride, l1_row_stride,
                  RANK: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """acc[BLOCK_M, BLOCK_N] = u[rows, :r] @ L1[cols, :r]ᵀ, r padded to BLOCK_R by masked loads.

    RANK is a compile-time constant: one specialisation per model (r is fixed per model), a static
    K loop, and it sidesteps the interpreter's failing ``__index__`` on runtime scalars with
    numpy ≥ 2.3 (``range(0, n, B)`` with a runtime ``n`` raises there).
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in tl.static_range(0, RANK, BLOCK_R):
        ks = k0 + tl.arange(0, BLOCK_R)
        k_ok = ks < RANK
        u = tl.load(U_ptr + rows[:, None] * u_row_stride + ks[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        l1t = tl.load(L1_ptr + cols[None, :] * l1_row_stride + ks[:, None],
                      mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if DOT_FP32:
            acc = tl.dot(u.to(tl.float32), l1t.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(u, l1t, acc)
    return acc


@triton.jit
def _hsm_fwd_kernel(Y_ptr, U_ptr, L1_ptr, G_ptr, R_ptr, OUT_ptr,
                    n_rows, n_cols,
                    y_row_stride, u_row_stride, l1_row_stride, r_row_stride, out_row_stride,
                    RANK: tl.constexpr, HAS_RES: tl.constexpr, DOT_FP32: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """OUT = G ⊙ (Y + U L1ᵀ) [+ R]; one program per BLOCK_M × BLOCK_N output tile."""
    pid_m = tl.program_id(0).to(tl.int64)  # int64 before pointer arithmetic (N·d may pass 2³¹)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    ok = row_ok[:, None] & col_ok[None, :]
    w = _lowrank_tile(U_ptr, L1_ptr, rows, cols, row_ok, col_ok, u_row_stride, l1_row_stride,
                      RANK=RANK, DOT_FP32=DOT_FP32, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                      BLOCK_R=BLOCK_R)
    y = tl.load(Y_ptr + rows[:, None] * y_row_stride + cols[None, :], mask=ok, other=0.0)
    g = tl.load(G_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    out = (y.to(tl.float32) + w) * g[None, :]
    if HAS_RES:
        res = tl.load(R_ptr + rows[:, None] * r_row_stride + cols[None, :], mask=ok, other=0.0)
        out += res.to(tl.float32)
    tl.store(OUT_ptr + rows[:, None] * out_row_stride + cols[None, :],
             out.to(OUT_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _hsm_bwd_kernel(DO_ptr, Y_ptr, U_ptr, L1_ptr, G_ptr, GZ_ptr, DGP_ptr,
                    n_rows, n_cols,
                    do_row_stride, y_row_stride, u_row_stride, l1_row_stride, gz_row_stride,
                    RANK: tl.constexpr, DOT_FP32: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """GZ = DO ⊙ G; DGP[pid_m, cols] = Σ_{rows of this block} DO ⊙ (Y + U L1ᵀ).

    Per-row-block partial sums (summed by the host) instead of atomics: deterministic, and no fp32
    atomics contention on the d-long vector.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    ok = row_ok[:, None] & col_ok[None, :]
    w = _lowrank_tile(U_ptr, L1_ptr, rows, cols, row_ok, col_ok, u_row_stride, l1_row_stride,
                      RANK=RANK, DOT_FP32=DOT_FP32, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                      BLOCK_R=BLOCK_R)
    y = tl.load(Y_ptr + rows[:, None] * y_row_stride + cols[None, :], mask=ok, other=0.0)
    do = tl.load(DO_ptr + rows[:, None] * do_row_stride + cols[None, :], mask=ok, other=0.0)
    do = do.to(tl.float32)
    g = tl.load(G_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    tl.store(GZ_ptr + rows[:, None] * gz_row_stride + cols[None, :],
             (do * g[None, :]).to(GZ_ptr.dtype.element_ty), mask=ok)
    part = tl.sum(do * (y.to(tl.float32) + w), axis=0)  # masked rows contribute do = 0
    tl.store(DGP_ptr + pid_m * n_cols + cols, part, mask=col_ok)


def is_interpreted() -> bool:
    """True when the kernels run under the Triton interpreter (TRITON_INTERPRET=1 before import)."""
    return bool(_Interpreted) and isinstance(_hsm_fwd_kernel, _Interpreted)


def _config(n_rows: int, n_cols: int, rank: int, dtype: torch.dtype) -> dict:
    """Tile sizes. tl.dot needs every dim ≥ 16. The interpreter pays ≈ 1 ms per program instance,
    so it gets the largest tiles. On a GPU a 64 × 128 tile with a 32/64-wide r chunk keeps the
    fp32 accumulator at 64 registers per thread with 4 warps and the operand tiles at ≤ 24 KB of
    shared memory (untuned: no GPU was available when this was written)."""
    cap = lambda n, lo, hi: max(lo, min(hi, triton.next_power_of_2(max(n, 1))))  # noqa: E731
    if is_interpreted():
        return dict(BLOCK_M=cap(n_rows, 16, 128), BLOCK_N=cap(n_cols, 16, 128),
                    BLOCK_R=cap(rank, 16, 64))
    block_r = 64 if dtype in (torch.bfloat16, torch.float16) else 32
    return dict(BLOCK_M=cap(n_rows, 16, 64), BLOCK_N=cap(n_cols, 16, 128),
                BLOCK_R=cap(rank, 16, block_r), num_warps=4)


def _dot_fp32(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or is_interpreted()


def hsm_fwd(y2: torch.Tensor, u: torch.Tensor, l1: torch.Tensor, g: torch.Tensor,
            res2: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """Launch the forward kernel on 2-D, last-dim-contiguous tensors. Returns out [N, d]."""
    n_rows, n_cols = y2.shape
    rank = u.shape[1]
    out = torch.empty(y2.shape, dtype=out_dtype, device=y2.device)
    cfg = _config(n_rows, n_cols, rank, y2.dtype)
    grid = (triton.cdiv(n_rows, cfg["BLOCK_M"]), triton.cdiv(n_cols, cfg["BLOCK_N"]))
    r_arg = res2 if res2 is not None else y2  # never read when HAS_RES is False
    _hsm_fwd_kernel[grid](
        y2, u, l1, g, r_arg, out, n_rows, n_cols,
        y2.stride(0), u.stride(0), l1.stride(0), r_arg.stride(0), out.stride(0),
        RANK=rank, HAS_RES=res2 is not None, DOT_FP32=_dot_fp32(y2.dtype), **cfg)
    return out


def hsm_bwd(do2: torch.Tensor, y2: torch.Tensor, u: torch.Tensor, l1: torch.Tensor,
            g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the backward pass kernel. Returns (gz [N, d] in y's dtype, dg [d] fp32)."""
    n_rows, n_cols = y2.shape
    rank = u.shape[1]
    cfg = _config(n_rows, n_cols, rank, y2.dtype)
    grid = (triton.cdiv(n_rows, cfg["BLOCK_M"]), triton.cdiv(n_cols, cfg["BLOCK_N"]))
    gz = torch.empty_like(y2)
    partial = torch.empty((grid[0], n_cols), dtype=torch.float32, device=y2.device)
    _hsm_bwd_kernel[grid](
        do2, y2, u, l1, g, gz, partial, n_rows, n_cols,
        do2.stride(0), y2.stride(0), u.stride(0), l1.stride(0), gz.stride(0),
        RANK=rank, DOT_FP32=_dot_fp32(y2.dtype), **cfg)
    return gz, partial.sum(0)


def _rows(t: torch.Tensor, d: int) -> torch.Tensor:
    t2 = t.reshape(-1, d)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class HSMFunction(torch.autograd.Function):
    """out = s ⊙ m ⊙ (y + y L0ᵀ L1ᵀ) [+ residual] with gradients for y, L0, L1, s, m, residual.

    Shapes: y, residual [..., d]; L0 [r, d]; L1 [d, r]; s, m [d] (s may be None). The GEMMs run in
    y's dtype (L0, L1 cast to it, like autocast does for a Linear; autocast itself is disabled
    inside so that saved tensors keep that dtype); g = s ⊙ m and the epilogue are fp32; out has
    ``out_dtype`` (the residual's dtype). Parameter gradients come back in the parameters' dtypes.
    """

    @staticmethod
    def forward(ctx, y, l0, l1, s, m, residual, out_dtype):
        d = y.shape[-1]
        y2 = _rows(y, d)
        l0c, l1c = l0.to(y.dtype), l1.to(y.dtype).contiguous()
        with torch.autocast(y.device.type, enabled=False):
            u = y2 @ l0c.t()
        g = m.float() if s is None else s.float() * m.float()
        res2 = None if residual is None else _rows(residual, d)
        out = hsm_fwd(y2, u, l1c, g.contiguous(), res2, out_dtype)
        ctx.save_for_backward(y2, u, l0, l1, s, m, g)
        ctx.y_shape = y.shape
        ctx.has_res = residual is not None
        return out.view(y.shape)

    @staticmethod
    def backward(ctx, dout):
        y2, u, l0, l1, s, m, g = ctx.saved_tensors
        d = y2.shape[1]
        l0c, l1c = l0.to(y2.dtype), l1.to(y2.dtype).contiguous()
        gz, dg = hsm_bwd(_rows(dout, d), y2, u, l1c, g)  # dout loaded in its own dtype
        need = ctx.needs_input_grad
        with torch.autocast(y2.device.type, enabled=False):
            du = gz @ l1c if (need[0] or need[1]) else None
            dy = torch.addmm(gz, du, l0c).view(ctx.y_shape) if need[0] else None
            dl0 = (du.t() @ y2).to(l0.dtype) if need[1] else None
            dl1 = (gz.t() @ u.to(gz.dtype)).to(l1.dtype) if need[2] else None
        ds = (dg * m.float()).to(s.dtype) if (s is not None and need[3]) else None
        dm = (dg if s is None else dg * s.float()).to(m.dtype) if need[4] else None
        dres = dout if ctx.has_res and need[5] else None
        return dy, dl0, dl1, ds, dm, dres, None


def hsm_fused(y: torch.Tensor, l0: torch.Tensor, l1: torch.Tensor, s: Optional[torch.Tensor],
              m: torch.Tensor, residual: Optional[torch.Tensor] = None,
              out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Triton HSM (validated inputs expected; see ``dppa_kernels.pat.ops.hsm``)."""
    return HSMFunction.apply(y, l0, l1, s, m, residual, out_dtype or y.dtype)
