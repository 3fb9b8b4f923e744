"""Compile every Triton kernel of this package for a CUDA target without a GPU (to cubin).

The interpreter accepts programs the GPU compiler rejects (and vice versa), so CI also lowers each
kernel, in representative specialisations, through triton's real pipeline (TTIR → PTX → cubin with
the bundled ptxas). No driver is needed. Must run in a process where ``TRITON_INTERPRET`` is unset:

    python -m dppa_kernels.kernels.compile_check [sm]      # default sm 90
"""

from __future__ import annotations

import os
import sys


def _cases():
    from . import apply as A
    from . import histogram as H
    from . import select as S

    sel = {"X_ptr": None, "n": "i64", "part_len": "i64", "n_parts": "i32", "chunk": "i64", "LO_ptr": "*i64",
           "SHIFT_ptr": "*i32", "DONE_ptr": "*i32", "ABOVE_ptr": "*i64", "HIST_ptr": "*i64"}
    for xt, mode in (("*bf16", 0), ("*fp32", 1), ("*fp32", 2), ("*bf16", 3)):
        for rows, block in ((1, 2048), (8, 256)):
            yield S._window_count_kernel, dict(sel, X_ptr=xt), dict(KEY_MODE=mode, ROWS=rows, BLOCK=block, NBINS=S.NB)
    yield (S._window_update_kernel,
           {"K_ptr": "*i64", "LO_ptr": "*i64", "SHIFT_ptr": "*i32", "DONE_ptr": "*i32", "ABOVE_ptr": "*i64",
            "HIST_ptr": "*i64", "OUT_ptr": "*i64", "n_parts": "i32", "key_end": "i64"},
           dict(NBINS=S.NB, LOGB=S.LOG_NB, BLOCK_P=16))
    for xt, mode in (("*fp16", 0), ("*fp32", 2)):
        yield H._hist15_kernel, {"X_ptr": xt, "n": "i64", "H_ptr": "*i64"}, dict(KEY_MODE=mode, BLOCK=1024)
    # apply: TIES of 3 magnitude-pruned bf16 deltas (one ranked per-row level), DPPA bands, DARE+mask
    configs = [
        (("*bf16",) * 3, (1, 1, 1), (0, 0, 0), (1, 1, 1), (1, 0, 0), (1, 0, 0), 1, "*bf16", True),
        (("*fp32",) * 2, (1, 1), (1, 2), (2, 2), (3, 0), (0, 0), 0, "*fp32", False),
        (("*bf16",) * 2, (2, 3), (0, 0), (1, 1), (0, 0), (0, 0), 1, "*bf16", True),
    ]
    for dts, kinds, modes, nlevs, ranked, parts, comb, out, has_base in configs:
        m = len(dts)
        sig = {"Ds": dts, "MASKS": ("*u8",) * m, "METAS": ("*i64",) * m, "RANKS": ("*i64",) * m, "FP": "*fp32",
               "B_ptr": out, "O_ptr": out, "n": "i64"}
        yield A._apply_kernel, sig, dict(M=m, KINDS=kinds, KEY_MODES=modes, NLEVS=nlevs, RANKEDS=ranked, PARTS=parts,
                                         KMAX=max(nlevs), COMBINE=comb, ELECT=comb, DIVISOR=0, NORMALIZE=True,
                                         HAS_BASE=has_base, BLOCK=2048)
    yield (A._abs_sums_kernel, {"D_ptr": "*bf16", "MASK": "*u8", "META": "*i64", "RANK": "*i64", "FP": "*fp32",
                                "OUT": "*fp64", "n": "i64"},
           dict(KIND=1, KEY_MODE=0, NLEV=2, RANKED=2, PART=1, BLOCK=2048))
    yield (A._tie_count_kernel, {"X_ptr": "*fp32", "n": "i64", "META": "*i64", "COUNTS": "*i64", "FIRST": "*i64"},
           dict(KEY_MODE=1, NLEV=2, RANKED=3, PART=1, BLOCK=2048))


def compile_all(sm: int = 90) -> int:
    """Compile every case for ``sm``; returns the number of kernels compiled, raises on error."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset (the interpreter replaces the compiler)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    count = 0
    for fn, sig, consts in _cases():
        full = dict(sig)
        full.update({k: "constexpr" for k in consts})
        src = ASTSource(fn, full, constexprs=consts)
        triton.compile(src, target=GPUTarget("cuda", sm, 32), options={"num_warps": 8})
        count += 1
    return count


if __name__ == "__main__":
    n = compile_all(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
    print(f"compiled {n} Triton kernels")
