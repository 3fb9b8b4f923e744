"""The fused apply / merge pass (``backends.base`` ``apply``) and the L1 sums, in Triton.

For element e and model i (plan semantics in ``backends.base``):

    f_i  = plan factor: 1 (dense) | factors[j] of the first level j keeping e (thresholds)
           | [hash_bits(e; k1, k2) < thr32] (dare) | mask[e] (mask)
    v_i  = fp32(Δ_i[e]) · f_i · scale_i ;  u_i = w_i · v_i
    sum :  mixed = Σ u_i                       (÷ Σw, M or 1 when normalising)
    ties:  s = sign of Σ u_i | Σ sign u_i | Σ v_i | Σ sign v_i (elect), majority = s ≥ 0 ? +1 : −1,
           agree_i = sign(u_i or v_i) == majority (zeros never agree), mixed = Σ u_i·agree_i
           (÷ Σ w_i·agree_i (0 → 1) | max(Σ agree_i, 1) | 1)
    out  = cast(base[e] + λ·mixed)             (one rounding, to out_dtype)

Arithmetic: every fp32 operation above rounds on its own, in the order written (model order for
the sums), and the division is IEEE (``div_rn``): the same operations as the torch and CPU
backends and mergekit, so all of them give the same bytes. Hence the launches pass
``enable_fp_fusion=False`` (``LAUNCH``): triton would otherwise contract ``vote + v·w`` and
``base + mixed·λ`` into fmas (one rounding instead of two), which moves near-zero TIES votes to
the other sign and every sum off mergekit's by an ulp; and a plain ``/`` is the approximate
``div.full.f32``.

Thresholds: level j keeps key > τ_j[p], and key == τ_j[p] if (``ge``) always, (``gt``) never,
(``exact_k``) its rank among the ties of its partition, in flat index order, is < budget[p, j].
Ranks (only for levels where some partition keeps part of its ties) come from a tie-count pass:
per chunk of BLOCK elements the number of ties, and per partition the ties in its first chunk
before its start; an exclusive scan over chunks turns these into the ties before every chunk and
every partition start, so the apply pass ranks a tie as (ties before its chunk) + (ties before it
in the chunk, ``tl.cumsum``) − (ties before its partition). Same rule as docs/methods.md (tie rules).

Memory: the output only; per call O(P·K + N/BLOCK) int64 of plan metadata (τ, budgets, chunk tie
prefixes: 8/BLOCK bytes per element per ranked level), no per-element temporary.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from ..vocab import DIVISOR_CODES, ELECT_CODES, PLAN_KIND_CODES, partition_geometry
from .common import hash_bits, interpreting, key_mode, magnitude_key, next_pow2, nonfinite

HDR = tl.constexpr(8)  # int64 header of a model's metadata: L, P, C, k1, k2, thr32, -, -
ALL_TIES = 1 << 62  # budget meaning "keep every tie" (tie_mode ge)
# launch options of every kernel here: fp32 rounds like torch (module docstring, "Arithmetic")
LAUNCH = {"num_warps": 8, "enable_fp_fusion": False}


@triton.jit
def _model_factor(x, offs, ok, chunk, META, RANK, MASK, FP, fbase,
                  KIND: tl.constexpr, KEY_MODE: tl.constexpr, NLEV: tl.constexpr, RANKED: tl.constexpr,
                  PART: tl.constexpr):
    """fp32 factor f of one model for the tile ``offs`` (see the module docstring)."""
    if KIND == 0:
        f = tl.full(offs.shape, 1.0, tl.float32)
    elif KIND == 1:
        n_parts = tl.load(META + 1)
        n_chunks = tl.load(META + 2)
        key = magnitude_key(x, KEY_MODE).to(tl.int64)
        f = tl.zeros(offs.shape, tl.float32)
        assigned = offs < 0
        if PART:
            p = offs // tl.load(META + 0)
        for j in tl.static_range(NLEV):
            if PART:  # per-element gathers of the partition's τ and budget (cached)
                tau = tl.load(META + HDR + p * NLEV + j, mask=ok, other=0)
                bud = tl.load(META + HDR + n_parts * NLEV + p * NLEV + j, mask=ok, other=0)
            else:
                tau = tl.load(META + HDR + j)
                bud = tl.load(META + HDR + NLEV + j)
            eq = ok & (key == tau)
            inside = key > tau
            if (RANKED >> j) & 1:
                e32 = eq.to(tl.int32)
                before_chunk = tl.load(RANK + j * (n_parts + n_chunks) + n_parts + chunk)
                if PART:
                    before_part = tl.load(RANK + j * (n_parts + n_chunks) + p, mask=ok, other=0)
                else:
                    before_part = tl.load(RANK + j * (n_parts + n_chunks))
                rank = before_chunk + (tl.cumsum(e32, 0) - e32).to(tl.int64) - before_part
                inside = inside | (eq & (rank < bud))
            else:  # no partial level: budget 0 keeps no tie, budget >= c_eq keeps all
                inside = inside | (eq & (bud > 0))
            fj = tl.load(FP + fbase + 2 + j)
            f = tl.where(inside & ~assigned, fj, f)
            assigned = assigned | inside
    elif KIND == 2:
        k1 = tl.load(META + 3).to(tl.uint32)
        k2 = tl.load(META + 4).to(tl.uint32)
        thr = tl.load(META + 5)
        f = (hash_bits(offs, k1, k2).to(tl.int64) < thr).to(tl.float32)
    else:
        f = (tl.load(MASK + offs, mask=ok, other=0) != 0).to(tl.float32)
    return f


@triton.jit
def _sign(v):
    return (v > 0).to(tl.float32) - (v < 0).to(tl.float32)


@triton.jit
def _count_nonfinite(x, ok, NF_ptr):
    """Add the number of NaN/Inf among the tile's valid elements to NF[0] (one atomic, if any)."""
    bad = tl.sum((ok & nonfinite(x)).to(tl.int32), 0)
    tl.atomic_add(NF_ptr, bad, mask=bad > 0, sem="relaxed")


@triton.jit
def _apply_kernel(Ds, MASKS, METAS, RANKS, FP, B_ptr, O_ptr, NF_ptr, n,
                  M: tl.constexpr, KINDS: tl.constexpr, KEY_MODES: tl.constexpr, NLEVS: tl.constexpr,
                  RANKEDS: tl.constexpr, PARTS: tl.constexpr, KMAX: tl.constexpr, COMBINE: tl.constexpr,
                  ELECT: tl.constexpr, DIVISOR: tl.constexpr, NORMALIZE: tl.constexpr, HAS_BASE: tl.constexpr,
                  CHECKS: tl.constexpr, BLOCK: tl.constexpr):
    """CHECKS[i] (i < M: delta i, M: the base): count that input's NaN/Inf into NF[i]."""
    chunk = tl.program_id(0).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    lam = tl.load(FP + 0)
    vals = ()
    wts = ()
    for i in tl.static_range(M):
        fbase = 2 + i * (2 + KMAX)
        x = tl.load(Ds[i] + offs, mask=ok, other=0)
        if CHECKS[i]:
            _count_nonfinite(x, ok, NF_ptr + i)
        f = _model_factor(x, offs, ok, chunk, METAS[i], RANKS[i], MASKS[i], FP, fbase,
                          KINDS[i], KEY_MODES[i], NLEVS[i], RANKEDS[i], PARTS[i])
        vals = vals + (x.to(tl.float32) * f * tl.load(FP + fbase + 1),)
        wts = wts + (tl.load(FP + fbase),)
    mixed = tl.zeros((BLOCK,), tl.float32)
    if COMBINE == 0:
        for i in tl.static_range(M):
            mixed += vals[i] * wts[i]
        div = tl.zeros((BLOCK,), tl.float32) + tl.load(FP + 1)  # Σw (|Σw| < 1e-8 → 1), M or 1, from the host
    else:
        vote = tl.zeros((BLOCK,), tl.float32)
        for i in tl.static_range(M):
            if ELECT == 0:
                vote += vals[i] * wts[i]
            elif ELECT == 1:
                vote += _sign(vals[i] * wts[i])
            elif ELECT == 2:
                vote += vals[i]
            else:
                vote += _sign(vals[i])
        major = tl.where(vote >= 0, 1.0, -1.0)
        div = tl.zeros((BLOCK,), tl.float32)
        for i in tl.static_range(M):
            u = vals[i] * wts[i]
            if ELECT <= 1:
                agree = _sign(u) == major
            else:
                agree = _sign(vals[i]) == major
            mixed += tl.where(agree, u, 0.0)
            if DIVISOR == 0:
                div += tl.where(agree, wts[i], 0.0)
            else:
                div += agree.to(tl.float32)
        if DIVISOR == 0:
            div = tl.where(div == 0, 1.0, div)
        elif DIVISOR == 1:
            div = tl.maximum(div, 1.0)
        else:
            div = tl.full((BLOCK,), 1.0, tl.float32)
    if NORMALIZE:
        mixed = tl.math.div_rn(mixed, div)  # IEEE: a plain / is div.full.f32 (2 ulp)
    mixed = mixed * lam
    if HAS_BASE:
        b = tl.load(B_ptr + offs, mask=ok, other=0)
        if CHECKS[M]:
            _count_nonfinite(b, ok, NF_ptr + M)
        mixed = b.to(tl.float32) + mixed
    tl.store(O_ptr + offs, mixed.to(O_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _abs_sums_kernel(D_ptr, MASK, META, RANK, FP, OUT, n, KIND: tl.constexpr, KEY_MODE: tl.constexpr,
                     NLEV: tl.constexpr, RANKED: tl.constexpr, PART: tl.constexpr, BLOCK: tl.constexpr):
    """OUT[chunk] = (Σ|Δ|, Σ|f·Δ|) over the chunk, in fp64."""
    chunk = tl.program_id(0).to(tl.int64)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    x = tl.load(D_ptr + offs, mask=ok, other=0)
    f = _model_factor(x, offs, ok, chunk, META, RANK, MASK, FP, 0, KIND, KEY_MODE, NLEV, RANKED, PART)
    xf = x.to(tl.float32)
    tl.store(OUT + 2 * chunk, tl.sum(tl.abs(xf).to(tl.float64), 0))
    tl.store(OUT + 2 * chunk + 1, tl.sum(tl.abs(xf * f).to(tl.float64), 0))


@triton.jit
def _tie_count_kernel(X_ptr, n, META, COUNTS, FIRST, KEY_MODE: tl.constexpr, NLEV: tl.constexpr,
                      RANKED: tl.constexpr, PART: tl.constexpr, BLOCK: tl.constexpr):
    """Per ranked level j: COUNTS[j, chunk] = #ties in the chunk; FIRST[j, p] = #ties in p's first
    chunk before p's first element."""
    chunk = tl.program_id(0).to(tl.int64)
    n_chunks = tl.num_programs(0)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    n_parts = tl.load(META + 1)
    part_len = tl.load(META + 0)
    if PART:
        p = offs // part_len
    else:
        p = offs * 0
    x = tl.load(X_ptr + offs, mask=ok, other=0)
    key = magnitude_key(x, KEY_MODE).to(tl.int64)
    starts = ok & (offs - p * part_len == 0)
    for j in tl.static_range(NLEV):
        if (RANKED >> j) & 1:
            tau = tl.load(META + HDR + p * NLEV + j, mask=ok, other=-1)
            e32 = (ok & (key == tau)).to(tl.int32)
            tl.store(COUNTS + j * n_chunks + chunk, tl.sum(e32, 0).to(tl.int64))
            tl.store(FIRST + j * n_parts + p, (tl.cumsum(e32, 0) - e32).to(tl.int64), mask=starts)


def _block(n: int) -> int:
    if interpreting():
        return min(max(next_pow2(-(-n // 32)), 1024), 1 << 16)
    return 2048


class _Model:
    """Host-side description of one model's plan, packed for the kernels."""

    def __init__(self, delta: torch.Tensor, plan, n_chunks: int):
        n = delta.numel()
        self.kind = PLAN_KIND_CODES[plan.kind]
        self.key_mode, self.nlev, self.ranked, self.part = 0, 1, 0, 0
        header = [n, 1, n_chunks, 0, 0, 0, 0, 0]
        body = torch.zeros(0, dtype=torch.int64)
        self.factors = [1.0]
        if plan.kind == "thresholds":
            self.key_mode, _ = key_mode(delta.dtype, plan.key_dtype)
            tau = plan.tau_key.to(torch.int64).cpu().reshape(plan.tau_key.shape[0], -1)
            n_parts, nlev = tau.shape
            part_len, _ = partition_geometry(delta.shape, plan.partition, plan.block_size)
            part_len = max(part_len, 1)  # an empty tensor: one partition of "length 1" (no division by 0)
            self.part = int(n_parts > 1 or part_len < n)
            if plan.tie_mode == "ge":
                bud = torch.full_like(tau, ALL_TIES)
            elif plan.tie_mode == "gt":
                bud = torch.zeros_like(tau)
            else:
                bud = plan.budget.to(torch.int64).cpu().reshape(n_parts, nlev)
                ceq = plan.c_eq.to(torch.int64).cpu().reshape(n_parts, nlev) if plan.c_eq is not None else None
                partial = (bud > 0) & (bud < ceq) if ceq is not None else bud > 0
                self.ranked = sum(1 << j for j in range(nlev) if bool(partial[:, j].any()))
            header[0], header[1] = part_len, n_parts
            self.nlev = nlev
            self.factors = [float(f) for f in plan.factors]
            body = torch.cat([tau.reshape(-1), bud.reshape(-1)])
        elif plan.kind == "dare":
            header[3], header[4], header[5] = int(plan.k1) & 0xFFFFFFFF, int(plan.k2) & 0xFFFFFFFF, int(plan.thr32)
        self.meta_cpu = torch.cat([torch.tensor(header, dtype=torch.int64), body])
        self.mask = plan.mask.reshape(-1).view(torch.uint8) if plan.kind == "mask" else delta
        self.n_parts = header[1]
        self.part_len = header[0]


def _upload(models: Sequence[_Model], device) -> list[torch.Tensor]:
    """One host-to-device copy for every model's metadata; returns per-model views."""
    flat = torch.cat([m.meta_cpu for m in models]).to(device)
    out, at = [], 0
    for m in models:
        out.append(flat[at: at + m.meta_cpu.numel()])
        at += m.meta_cpu.numel()
    return out


def _tie_ranks(delta: torch.Tensor, m: _Model, meta: torch.Tensor, block: int) -> torch.Tensor:
    """RANK buffer [K, P + C] int64: ties before each partition start, then before each chunk."""
    n = delta.numel()
    n_chunks = -(-n // block)
    counts = torch.zeros(m.nlev, n_chunks, dtype=torch.int64, device=delta.device)
    first = torch.zeros(m.nlev, m.n_parts, dtype=torch.int64, device=delta.device)
    _tie_count_kernel[(n_chunks,)](delta, n, meta, counts, first, KEY_MODE=m.key_mode, NLEV=m.nlev,
                                   RANKED=m.ranked, PART=m.part, BLOCK=block, **LAUNCH)
    before_chunk = torch.cumsum(counts, 1) - counts
    start_chunk = (torch.arange(m.n_parts, device=delta.device, dtype=torch.int64) * m.part_len) // block
    before_part = before_chunk[:, start_chunk] + first
    return torch.cat([before_part, before_chunk], 1).contiguous()


def _prepare(deltas, plans, block):
    n = deltas[0].numel()
    n_chunks = -(-n // block)
    models = [_Model(d, p, n_chunks) for d, p in zip(deltas, plans)]
    metas = _upload(models, deltas[0].device)
    ranks = [(_tie_ranks(d, m, meta, block) if m.ranked else meta) for d, m, meta in zip(deltas, models, metas)]
    return models, metas, ranks


def apply(deltas: Sequence[torch.Tensor], base: Optional[torch.Tensor], plans, weights, combine,
          out_dtype: torch.dtype, out: Optional[torch.Tensor] = None, check_finite: Sequence[int] = ()):
    """Fused sparsify + combine + base add + cast (``backends.base`` ``apply``).

    ``out``: optional contiguous destination of Δ's shape and ``out_dtype`` (tests pass a view of a
    sentinel-filled buffer to catch out-of-bounds stores). ``check_finite``: input indices (deltas,
    then the base) whose NaN/Inf the pass counts; returns (out, int64 CPU counts of length M + 1)
    then, else just out.
    """
    shape, dev = deltas[0].shape, deltas[0].device
    n = deltas[0].numel()
    if out is None:
        out = torch.empty(shape, dtype=out_dtype, device=dev)
    checks = tuple(i in check_finite for i in range(len(deltas) + 1))
    if n == 0:
        return (out, torch.zeros(len(checks), dtype=torch.int64)) if check_finite else out
    block = _block(n)
    models, metas, ranks = _prepare(deltas, plans, block)
    kmax = max(m.nlev for m in models)
    w = [float(x) for x in weights]
    if combine.divisor == "weights":
        s = sum(w)
        sdiv = 1.0 if abs(s) < 1e-8 else s
    elif combine.divisor == "count":
        sdiv = float(len(deltas))
    else:
        sdiv = 1.0
    fp = [float(combine.lam), sdiv]
    for wi, p, m in zip(w, plans, models):
        fp += [wi, float(p.scale)] + (m.factors + [0.0] * kmax)[:kmax]
    fp_t = torch.tensor(fp, dtype=torch.float32).to(dev)
    nf = torch.zeros(len(checks), dtype=torch.int32, device=dev)
    _apply_kernel[(-(-n // block),)](
        tuple(deltas), tuple(m.mask for m in models), tuple(metas), tuple(ranks), fp_t,
        out if base is None else base, out, nf, n,
        M=len(deltas), KINDS=tuple(m.kind for m in models), KEY_MODES=tuple(m.key_mode for m in models),
        NLEVS=tuple(m.nlev for m in models), RANKEDS=tuple(m.ranked for m in models),
        PARTS=tuple(m.part for m in models), KMAX=kmax, COMBINE=int(combine.combine == "ties"),
        ELECT=ELECT_CODES[combine.elect], DIVISOR=DIVISOR_CODES[combine.divisor], NORMALIZE=bool(combine.normalize),
        HAS_BASE=base is not None, CHECKS=checks if base is not None else checks[:-1] + (False,), BLOCK=block,
        **LAUNCH)
    # the counts are read only when asked for: an unchecked call stays free of host synchronisation
    return (out, nf.to(torch.int64).cpu()) if check_finite else out


def abs_sums(delta: torch.Tensor, plan) -> tuple[float, float]:
    """(Σ|Δ|, Σ|f·Δ|) with f the plan's factor (no scale); fp64 partial sums per chunk."""
    n = delta.numel()
    if n == 0:
        return 0.0, 0.0
    block = _block(n)
    models, metas, ranks = _prepare([delta], [plan], block)
    m = models[0]
    fp_t = torch.tensor([0.0, 0.0] + m.factors, dtype=torch.float32).to(delta.device)
    n_chunks = -(-n // block)
    part = torch.empty(n_chunks, 2, dtype=torch.float64, device=delta.device)
    _abs_sums_kernel[(n_chunks,)](delta, m.mask, metas[0], ranks[0], fp_t, part, n, KIND=m.kind,
                                  KEY_MODE=m.key_mode, NLEV=m.nlev, RANKED=m.ranked, PART=m.part,
                                  BLOCK=block, **LAUNCH)
    s = part.sum(0).cpu()  # the result must reach the host
    return float(s[0]), float(s[1])
