"""Compile every Triton kernel of this package for a CUDA target without a GPU (to cubin).

The interpreter accepts programs the GPU compiler rejects (and vice versa), so CI also lowers each
kernel, in representative specialisations, through triton's real pipeline (TTIR → PTX → cubin with
the bundled ptxas). No driver is needed. Must run in a process where ``TRITON_INTERPRET`` is unset:

    python -m dppa_kernels.kernels.compile_check [sm [name]]   # default sm 90; name: only kernels matching it

Kernels with float arithmetic that must round like the reference (``kernels.della``, fp64) or like
torch (``kernels.apply``, fp32) also have their PTX checked: no fma, every mul and add with an explicit
round-to-nearest, IEEE division (``check_rounding``).
"""

from __future__ import annotations

import os
import sys

FP64_NO_FMA = "f64"  # marker: the PTX must round every fp64 mul and add (kernels.della)
FP32_NO_FMA = "f32"  # marker: the PTX must round every fp32 mul, add and div (kernels.apply)
LOADS_THEN_BARRIER = "barrier"  # marker: every global load precedes a CTA barrier, every store follows it


def _cases():
    """(kernel, signature, constexprs[, options[, ptx check]]) of every compiled specialisation."""
    from . import apply as A
    from . import della as DL
    from . import della_long as DLL
    from . import histogram as H
    from . import select as S
    from . import select_many as SM
    import triton.language as tl

    sel = {"X_ptr": None, "n": "i64", "part_len": "i64", "n_parts": "i32", "chunk": "i64", "LO_ptr": "*i64",
           "SHIFT_ptr": "*i32", "DONE_ptr": "*i32", "ABOVE_ptr": "*i64", "HIST_ptr": "*i64", "NF_ptr": "*i64"}
    for xt, mode in (("*bf16", 0), ("*fp32", 1), ("*fp32", 2), ("*bf16", 3)):
        for rows, block, check in ((1, 2048, True), (8, 256, False)):
            yield S._window_count_kernel, dict(sel, X_ptr=xt), dict(KEY_MODE=mode, ROWS=rows, BLOCK=block, NBINS=S.NB,
                                                                    CHECK=check)
    yield (S._window_update_kernel,
           {"K_ptr": "*i64", "LO_ptr": "*i64", "SHIFT_ptr": "*i32", "DONE_ptr": "*i32", "ABOVE_ptr": "*i64",
            "HIST_ptr": "*i64", "OUT_ptr": "*i64", "n_parts": "i32", "key_end": "i64"},
           dict(NBINS=S.NB, LOGB=S.LOG_NB, BLOCK_P=16), {"num_warps": 4}, LOADS_THEN_BARRIER)
    for dt, mode, nbits in ((tl.bfloat16, 0, 15), (tl.float32, 1, 31), (tl.float32, 2, 15)):
        yield (SM._select_many_kernel, {"PTRS": "*i64", "NS": "*i64", "KS": "*i64", "OUT": "*i64", "T": "i32",
                                        "nf_key": "i64"},
               dict(X_DTYPE=dt, KEY_MODE=mode, NBITS=nbits, PASSES=SM.passes(nbits), BLOCK=1024), {"num_warps": 4})
    for xt in ("*fp32", "*bf16"):
        yield (S._collect_kernel, {"X_ptr": xt, "n": "i64", "chunk": "i64", "LO_ptr": "*i64", "SHIFT_ptr": "*i32",
                                   "DONE_ptr": "*i32", "ABOVE_ptr": "*i64", "CAND_ptr": "*i32", "CNT_ptr": "*i64",
                                   "cap": "i64"}, dict(KEY_MODE=1, BLOCK=2048, NBINS=S.NB), {"num_warps": 4})
    for xt, mode in (("*fp16", 0), ("*fp32", 2)):
        yield (H._hist15_kernel, {"X_ptr": xt, "n": "i64", "chunk": "i64", "H_ptr": "*i64"},
               dict(KEY_MODE=mode, LOG_BLOCK=H.LOG_BLOCK))
    # apply: TIES of 3 magnitude-pruned bf16 deltas (one ranked per-row level), DPPA bands, DARE+mask
    configs = [
        (("*bf16",) * 3, (1, 1, 1), (0, 0, 0), (1, 1, 1), (1, 0, 0), (1, 0, 0), 1, "*bf16", True),
        (("*fp32",) * 2, (1, 1), (1, 2), (2, 2), (3, 0), (0, 0), 0, "*fp32", False),
        (("*bf16",) * 2, (2, 3), (0, 0), (1, 1), (0, 0), (0, 0), 1, "*bf16", True),
    ]
    for dts, kinds, modes, nlevs, ranked, parts, comb, out, has_base in configs:
        m = len(dts)
        sig = {"Ds": dts, "MASKS": ("*u8",) * m, "METAS": ("*i64",) * m, "RANKS": ("*i64",) * m, "FP": "*fp32",
               "B_ptr": out, "O_ptr": out, "NF_ptr": "*i32", "n": "i64"}
        checks = tuple(i % 2 == 1 or (i == m and has_base) for i in range(m + 1))  # some deltas and the base
        yield A._apply_kernel, sig, dict(M=m, KINDS=kinds, KEY_MODES=modes, NLEVS=nlevs, RANKEDS=ranked, PARTS=parts,
                                         KMAX=max(nlevs), COMBINE=comb, ELECT=comb, DIVISOR=0, NORMALIZE=True,
                                         HAS_BASE=has_base, CHECKS=checks, BLOCK=2048), A.LAUNCH, FP32_NO_FMA
    yield (A._abs_sums_kernel, {"D_ptr": "*bf16", "MASK": "*u8", "META": "*i64", "RANK": "*i64", "FP": "*fp32",
                                "OUT": "*fp64", "n": "i64"},
           dict(KIND=1, KEY_MODE=0, NLEV=2, RANKED=2, PART=1, BLOCK=2048), A.LAUNCH)
    yield (A._tie_count_kernel, {"X_ptr": "*fp32", "n": "i64", "META": "*i64", "COUNTS": "*i64", "FIRST": "*i64"},
           dict(KEY_MODE=1, NLEV=2, RANKED=3, PART=1, BLOCK=2048), A.LAUNCH)
    # DELLA, launched without fp fusion as della_mask does: int32 composites (fp16 tiles of 16 short
    # rows, bf16 rows of 16384), int64 (a 1-D fp32 tensor of 4096: triton turns n_rows == 1 into a
    # constant), rows of one column (cols == 1 a constant: no division), the ranked path
    dsig = {"X_ptr": None, "OUT_ptr": "*u8", "n_rows": "i32", "cols": "i32", "lo_bits": "i64", "span_bits": "i64",
            "k1": "i64", "k2": "i64"}
    for xt, mode, nbits, log_rows, log_block, warps, ones in (("*fp16", 0, 15, 4, 7, 4, {}),
                                                              ("*bf16", 0, 15, 0, 14, 16, {}),
                                                              ("*fp32", 1, 31, 0, 12, 8, dict(n_rows=1)),
                                                              ("*bf16", 0, 15, 11, 1, 4, dict(cols=1))):
        yield (DL._della_sort_kernel, dict(dsig, X_ptr=xt),
               dict(ones, KEY_MODE=mode, KEY_BITS=nbits, WIDE=nbits + log_block > 30, LOG_ROWS=log_rows,
                    LOG_BLOCK=log_block), dict(num_warps=warps, enable_fp_fusion=False), FP64_NO_FMA)
    for xt in ("*bf16", "*fp16"):
        lsig = {"X_ptr": xt, "row0": "i64", "cols": "i64", "seg": "i64", "n_seg": "i32"}
        yield (DLL._della_long_count_kernel, dict(lsig, H_ptr="*i32"), dict(KEY_MODE=0, LOG_BLOCK=11),
               {"num_warps": 8})
    yield (DLL._della_long_rank_kernel, dict(lsig, R_ptr="*i32", OUT_ptr="*u8", lo_bits="i64", span_bits="i64",
                                             k1="i64", k2="i64"), dict(KEY_MODE=0, LOG_BLOCK=11),
           dict(num_warps=8, enable_fp_fusion=False), FP64_NO_FMA)
    yield (DL._della_ranked_kernel, {"ORDER_ptr": "*i64", "OUT_ptr": "*u8", "base": "i64", "n": "i64", "cols": "i32",
                                     "lo_bits": "i64", "span_bits": "i64", "k1": "i64", "k2": "i64"},
           dict(BLOCK=DL.RANKED_BLOCK), dict(num_warps=4, enable_fp_fusion=False), FP64_NO_FMA)


def check_rounding(ptx: str, width: str) -> None:
    """Every ``width`` (``f64``: ``kernels.della``; ``f32``: ``kernels.apply``) float operation of the
    PTX rounds on its own like the reference / torch: no fma, every mul and add carries ``.rn``
    (ptxas fuses only mul/add without a rounding modifier), division is ``div.rn``."""
    bad = [op for op in (f"fma.rn.{width}", f"mul.{width}", f"add.{width}", f"div.full.{width}",
                         f"div.approx.{width}", f"div.approx.ftz.{width}") if op in ptx]
    if bad:
        raise AssertionError(f"{', '.join(bad)} in the PTX of a kernel that must round every {width} operation "
                             "(launch it with enable_fp_fusion=False; divide with tl.math.div_rn)")
    for op in (f"mul.rn.{width}", f"add.rn.{width}"):
        if op not in ptx:
            raise AssertionError(f"{op} missing from the PTX of a kernel that must round every {width} operation")


def check_loads_then_barrier(ttgir: str) -> None:
    """Every ``tt.load`` comes before a ``gpu.barrier`` that comes before every ``tt.store``: a kernel
    that resets the state it read (``kernels.select`` window update) must not let one warp store
    before another has loaded (their thread layouts differ)."""
    lines = ttgir.splitlines()
    loads = [i for i, ln in enumerate(lines) if "tt.load " in ln]
    stores = [i for i, ln in enumerate(lines) if "tt.store " in ln]
    barriers = [i for i, ln in enumerate(lines) if "gpu.barrier" in ln]
    if loads and stores and not any(max(loads) < b < min(stores) for b in barriers):
        raise AssertionError("a global store is not separated from the loads by a CTA barrier "
                             "(tl.debug_barrier() after the last load)")


def fused_fp64_fma_count(sm: int = 90) -> int:
    """fma.rn.f64 in the PTX of the DELLA sort kernel compiled *with* fp fusion (triton's default).

    Nonzero on triton 3.6: triton contracts ``lo + rn * span`` into an fma unless told not to, which
    is why ``kernels.della`` launches with ``enable_fp_fusion=False``.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, sig, consts, opts, _ = next(c for c in _cases() if len(c) > 4 and c[4] == FP64_NO_FMA)
    src = ASTSource(fn, {**sig, **{k: "constexpr" for k in consts}}, constexprs=consts)
    k = triton.compile(src, target=GPUTarget("cuda", sm, 32), options={**opts, "enable_fp_fusion": True})
    return k.asm["ptx"].count("fma.rn.f64")


def compile_all(sm: int = 90, only: str = "") -> int:
    """Compile every case for ``sm`` (only kernels whose name contains ``only``); returns the number of
    kernels compiled, raises on error."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (the interpreter replaces the compiler)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    count = 0
    for case in _cases():
        fn, sig, consts = case[:3]
        if only not in fn.__name__:
            continue
        opts = {"num_warps": 8, **(case[3] if len(case) > 3 else {})}
        full = dict(sig)
        full.update({k: "constexpr" for k in consts})
        src = ASTSource(fn, full, constexprs=consts)
        k = triton.compile(src, target=GPUTarget("cuda", sm, 32), options=opts)
        if len(case) > 4 and case[4] == LOADS_THEN_BARRIER:
            check_loads_then_barrier(k.asm["ttgir"])
        elif len(case) > 4:
            check_rounding(k.asm["ptx"], case[4])
        count += 1
    return count


if __name__ == "__main__":
    sm = int(sys.argv[1]) if len(sys.argv) > 1 else 90
    n = compile_all(sm, sys.argv[2] if len(sys.argv) > 2 else "")
    print(f"compiled {n} Triton kernels")
    if n and (len(sys.argv) <= 2 or sys.argv[2] in "_della_sort_kernel"):
        print(f"della fp64 fma with triton's default fp fusion: {fused_fp64_fma_count(sm)}; as launched: 0")
