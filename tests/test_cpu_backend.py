"""The C++ CPU backend against the reference (``dppa_kernels.reference``) and the torch backend.

Thresholds, counts, histograms and masks must be identical (ties included); merged values within
fp32 rounding of the float64 reference. Inputs are realistic deltas with many ties,
Δ = bf16(base + N(0, σ)) − bf16(base), and heavily quantised values; exact zeros are replaced by a
tiny value of random sign (one more large tie group) so that a mask can be read off Δ·f.
"""

from __future__ import annotations

import math

import pytest
import torch

from dppa_kernels import reference as R
from dppa_kernels.backends.base import ApplyPlan
from dppa_kernels.backends.cpu import CpuBackend
from dppa_kernels.backends.torch_backend import TorchBackend
from dppa_kernels.reference import rng
from dppa_kernels.reference import sparsify as SP
from dppa_kernels.spec import CombineSpec, SparsifySpec

CPU = CpuBackend()
_OK, _WHY = CPU.available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"CPU extension not built: {_WHY}")
TORCH = TorchBackend()

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SHAPES = [(1,), (7,), (1023,), (4097,), (5, 123, 123), (9, 7, 41)]
DTYPE_ID = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", None: "own"}


def _id(v):
    return DTYPE_ID.get(v, str(v)) if isinstance(v, torch.dtype) or v is None else str(v)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(1234)
    nt = torch.get_num_threads()
    yield
    torch.set_num_threads(nt)


def make_delta(shape, dtype, kind="s1e-4", gen=None):
    """Realistic tie-heavy delta without exact zeros."""
    if kind.startswith("s"):
        sigma = float(kind[1:])
        base = (torch.randn(shape, generator=gen) * 0.02).to(torch.bfloat16)
        ft = (base.float() + torch.randn(shape, generator=gen) * sigma).to(torch.bfloat16)
        d = ft.float() - base.float()
    else:  # heavily quantised: 17 levels
        d = torch.randint(-8, 9, shape, generator=gen).float() * 2.0**-10
    d = d.to(dtype)
    tiny = (torch.randint(0, 2, shape, generator=gen) * 2 - 1).to(dtype) * 2.0**-20
    d = torch.where(d == 0, tiny, d)
    assert not bool((d == 0).any())
    return d


def part_len(shape, n, partition, block_size):
    if partition == "tensor":
        return n
    if partition == "row":
        return shape[-1]
    return block_size


def keep_counts(shape, n, partition, block_size, density, count_rule="floor"):
    length = part_len(shape, n, partition, block_size)
    lens = [min(length, n - s) for s in range(0, n, length)]
    return torch.tensor([R.keep_count(m, density, count_rule) for m in lens], dtype=torch.int64)


def threshold_plan(be, x, densities, tie_mode, partition, block_size, key_dtype, factors, d1_all=False):
    """K-level thresholds plan, selected by ``be`` (the same construction as dppa_kernels.ops)."""
    ks, taus, aboves, eqs = [], [], [], []
    for d in densities:
        k = keep_counts(tuple(x.shape), x.numel(), partition, block_size, d)
        if d >= 1.0 and d1_all:
            k = keep_counts(tuple(x.shape), x.numel(), partition, block_size, 1.0)
        t, a, e = be.select(x, k, partition, block_size, key_dtype)
        ks.append(k), taus.append(t), aboves.append(a), eqs.append(e)
    k, above = torch.stack(ks, 1), torch.stack(aboves, 1)
    return ApplyPlan("thresholds", partition=partition, block_size=block_size, key_dtype=key_dtype,
                     tie_mode=tie_mode, tau_key=torch.stack(taus, 1), budget=(k - above).clamp(min=0),
                     c_eq=torch.stack(eqs, 1), factors=tuple(factors))


def factor_of(be, x, plan):
    """Per-element factor read off apply (fp32 output of Δ·f; f a power of two, so exact)."""
    out = be.apply([x], None, [plan], [1.0], CombineSpec("sum"), torch.float32)
    return out / x.float()


def block_for(shape):
    n = math.prod(shape)
    return 37 if n <= 5000 else 1031


# --------------------------------------------------------------------------------- select
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape,partition", [((1_100_000,), "tensor"), ((2, 70_001), "row")], ids=str)
def test_select_long_partitions_all_threads(dtype, shape, partition):
    """Partitions long enough to be split across threads (fp32: two radix passes)."""
    x = make_delta(shape, dtype, "s1e-4")
    for kd in (None, torch.bfloat16):
        for d in (0.1, 0.5):
            ref = R.magnitude_threshold_ref(x, d, partition=partition, key_dtype=kd)
            k = ref["k"]
            for nt in (1, 2):
                torch.set_num_threads(nt)
                got = CPU.select(x, k, partition, None, kd)
                for name, g in zip(("tau_key", "c_above", "c_eq"), got):
                    assert torch.equal(g, ref[name]), (nt, _id(kd), d, name)


def test_select_fp32_distinct_low_bits():
    """fp32 keys that differ only in the low 16 bits (the second radix pass decides)."""
    base = torch.full((200_000,), 0.01).view(torch.int32)
    x = (base + torch.randint(0, 1 << 16, (200_000,), dtype=torch.int32)).view(torch.float32)
    x = x * torch.where(torch.rand(200_000) < 0.5, -1.0, 1.0)
    for partition in ("tensor", "block"):
        for d in (0.01, 0.3, 0.77):
            ref = R.magnitude_threshold_ref(x, d, partition=partition, block_size=9001)
            got = CPU.select(x, ref["k"], partition, 9001, None)
            for name, g in zip(("tau_key", "c_above", "c_eq"), got):
                assert torch.equal(g, ref[name]), (partition, d, name)


def test_key_dtype_rounding_matches_torch():
    """fp32 -> bf16 / fp16 keys round to nearest even exactly as .to() does (ties, overflow, subnormals)."""
    b = torch.randint(0, 1 << 31, (300_000,), dtype=torch.int64)
    b[::3] = (b[::3] & ~0xFFFF) | 0x8000  # exact bf16 rounding ties
    b[1::7] = (b[1::7] & ~0x1FFF) | 0x1000  # exact fp16 rounding ties
    x = b.to(torch.int32).view(torch.float32)
    x = x[torch.isfinite(x)]
    x = x[x.abs() < 1e30]  # finite everywhere; fp16 overflow to inf is still exercised
    for sd in (torch.bfloat16, torch.float16):
        assert torch.equal(CPU.histogram(x, sd), R.histogram_ref(x, sd)), _id(sd)


# --------------------------------------------------------------------------------- histogram
# --------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("tie_mode", ["exact_k", "ge", "gt"])
@pytest.mark.parametrize("shape,partition", [((5, 123, 123), "tensor"), ((9, 7, 41), "row"), ((4097,), "block")],
                         ids=str)
def test_band_codes_match_reference(dtype, tie_mode, shape, partition):
    bs = 37 if partition == "block" else None
    dens = [0.05, 0.2, 0.45]
    x = make_delta(shape, dtype, "s1e-4")
    plan = threshold_plan(CPU, x, dens, tie_mode, partition, bs, None, (4.0, 2.0, 1.0))
    f = factor_of(CPU, x, plan)
    codes = torch.zeros(shape, dtype=torch.int64)
    for j, fj in enumerate((4.0, 2.0, 1.0)):
        codes[f == fj] = j + 1
    ref = R.band_codes_ref(x, dens, tie_mode=tie_mode, partition=partition, block_size=bs)
    assert torch.equal(codes, ref), int((codes != ref).sum())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=_id)
@pytest.mark.parametrize("shape,partition,bs", [((300_007,), "tensor", None), ((3, 100_003), "row", None),
                                                ((300_007,), "block", 40_009)], ids=str)
def test_exact_k_ties_across_chunks_and_threads(dtype, shape, partition, bs):
    """Tie budgets that run out deep inside partitions spanning many thread chunks."""
    x = make_delta(shape, dtype, "quant")
    for d in (0.1, 0.5, 0.9):
        plan = threshold_plan(CPU, x, [d], "exact_k", partition, bs, None, (1.0,))
        assert plan.needs_tie_rank()
        ref = R.magnitude_mask_ref(x, d, tie_mode="exact_k", partition=partition, block_size=bs)
        outs = []
        for nt in (1, 2):
            torch.set_num_threads(nt)
            outs.append(factor_of(CPU, x, plan) != 0)
            assert torch.equal(outs[-1], ref), (nt, d, int((outs[-1] != ref).sum()))


# --------------------------------------------------------------------------------- random masks
@pytest.mark.parametrize("shape", [(1,), (1023,), (9, 7, 41), (262_147,)], ids=_id)
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.999999])
def test_dare_mask_bit_identical(shape, density):
    x = make_delta(shape, torch.bfloat16, "s2e-3")
    k1, k2 = rng.stream_keys(7, "model.layers.0.mlp", 2)
    plan = ApplyPlan("dare", k1=k1, k2=k2, thr32=rng.threshold32(density))
    ref = SP.dare_factor(x, density, 7, "model.layers.0.mlp", 2) > 0
    for nt in (1, 2):
        torch.set_num_threads(nt)
        got = factor_of(CPU, x, plan) != 0
        assert torch.equal(got, ref), (nt, int((got != ref).sum()))


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("shape", [(1,), (7,), (4097,), (9, 7, 41), (64, 3001)], ids=_id)
def test_della_mask_bit_identical(dtype, shape):
    x = make_delta(shape, dtype, "s1e-4")
    k1, k2 = rng.stream_keys(11, "w", 1)
    for d, eps in ((0.2, 0.1), (0.5, 0.15), (0.1, 0.3), (0.9, 0.15)):
        ref = SP.della_factor(x, d, eps, 11, "w", 1) > 0
        for nt in (1, 2):
            torch.set_num_threads(nt)
            got = CPU.della_mask(x, d, eps, k1, k2)
            assert got.dtype == torch.bool and got.shape == x.shape
            assert torch.equal(got, ref), (nt, d, eps, int((got != ref).sum()))


@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("kind", ["zeros_and_ties", "wide_range", "narrow_range", "all_zero"])
def test_della_mask_both_rank_paths(dtype, kind):
    """Rows whose magnitudes span few keys (counting-sort ranks, zeros first) and rows spanning
    the whole exponent range (radix-sort ranks) both give the reference's mask."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(24, 1000, generator=g)
    if kind == "zeros_and_ties":
        x = (x * 4).round() / 4 * 1e-3
        x[::3] = 0.0
        x[1, :] = -0.0
    elif kind == "wide_range":
        x = x * torch.exp(torch.randn(24, 1000, generator=g) * 12).clamp(max=1e4)
    elif kind == "narrow_range":
        x = 1.0 + x.abs() * 1e-2
    else:
        x = torch.zeros(24, 1000)
    x = x.to(dtype)
    k1, k2 = rng.stream_keys(3, "w", 0)
    for d, eps in ((0.2, 0.1), (0.6, 0.3)):
        ref = SP.della_factor(x, d, eps, 3, "w", 0) > 0
        got = CPU.della_mask(x, d, eps, k1, k2)
        assert torch.equal(got, ref), (kind, d, eps, int((got != ref).sum()))


# --------------------------------------------------------------------------------- L1 sums
@pytest.mark.parametrize("dtype", DTYPES, ids=_id)
def test_abs_sums_match_reference(dtype):
    x = make_delta((5, 123, 123), dtype, "s2e-3")
    k1, k2 = rng.stream_keys(3, "", 0)
    plans = {
        "dense": (ApplyPlan("dense"), torch.ones(x.shape, dtype=torch.float64)),
        "dare": (ApplyPlan("dare", k1=k1, k2=k2, thr32=rng.threshold32(0.3)), SP.dare_factor(x, 0.3, 3)),
        "bands": (threshold_plan(CPU, x, [0.1, 0.3], "exact_k", "row", None, None, (1.7, 1.1)),
                  SP.bands_factor(x, [0.1, 0.3], [1.7, 1.1], "direct", partition="row")),
    }
    mask = torch.rand(x.shape) < 0.3
    plans["mask"] = (ApplyPlan("mask", mask=mask), mask.to(torch.float64))
    xd = x.to(torch.float64)
    for name, (plan, f) in plans.items():
        before, after = CPU.abs_sums(x, plan)
        assert before == pytest.approx(float(xd.abs().sum()), rel=1e-12), name
        assert after == pytest.approx(float((xd * f).abs().sum()), rel=1e-12), name
        torch.set_num_threads(1)
        assert CPU.abs_sums(x, plan) == (before, after), name  # chunked sums: thread-count independent
        torch.set_num_threads(2)


# --------------------------------------------------------------------------------- merge
def _ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` at |v| (float64)."""
    mant, tiny = {torch.bfloat16: (7, 2.0**-126), torch.float16: (10, 2.0**-14)}[dtype]
    _, e = torch.frexp(v.abs().clamp(min=tiny))
    return torch.ldexp(torch.ones_like(v), (e - 1 - mant).to(torch.int32))


def assert_merge_close(got, ref64, out_dtype, scale_bound):
    """fp32: rtol 1e-6 plus fp32 rounding of the largest partial sum (cancellation); bf16/fp16:
    at most 1 ulp from the float64 value (one rounding, plus fp32 noise that may cross a midpoint)."""
    g = got.to(torch.float64)
    fp32_noise = 8 * 2.0**-24 * scale_bound
    if out_dtype == torch.float32:
        bad = (g - ref64).abs() > 1e-6 * ref64.abs() + fp32_noise
    else:
        bad = (g - ref64).abs() > _ulp(ref64, out_dtype) + fp32_noise
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0])
        pytest.fail(f"{int(bad.sum())} mismatches, first at {i}: got {float(g.reshape(-1)[i])!r}, "
                    f"ref {float(ref64.reshape(-1)[i])!r}")


def _plan_for(be, delta, spec: SparsifySpec, seed, stream):
    """ApplyPlan of a spec (magnitude / bands / dare / della / none) with its rescale."""
    if spec.method == "none":
        plan = ApplyPlan("dense")
    elif spec.method in ("magnitude", "bands"):
        dens = [spec.density] if spec.method == "magnitude" else list(spec.densities)
        facs = (1.0,) if spec.method == "magnitude" else SP.band_factors(spec.alphas, spec.band_combine)
        plan = threshold_plan(be, delta, dens, spec.tie_mode, spec.partition, spec.block_size, spec.key_dtype, facs)
    elif spec.method == "dare":
        k1, k2 = rng.stream_keys(seed, "t", stream)
        plan = ApplyPlan("dare", k1=k1, k2=k2, thr32=rng.threshold32(spec.density))
    else:
        k1, k2 = rng.stream_keys(seed, "t", stream)
        plan = ApplyPlan("mask", mask=be.della_mask(delta, spec.density, spec.epsilon, k1, k2))
    if spec.rescale == "inv_density":
        plan.scale = 1.0 / spec.density
    elif spec.rescale == "l1":
        before, after = be.abs_sums(delta, plan)
        plan.scale = 1.0 if (before < SP.L1_EPS or after < SP.L1_EPS) else before / after
    return plan


SPECS = [
    SparsifySpec("magnitude", density=0.2, tie_mode="exact_k"),
    SparsifySpec("magnitude", density=0.5, tie_mode="ge", partition="row", rescale="l1"),
    SparsifySpec("bands", densities=(0.1, 0.3), alphas=(1.5, 1.2), partition="block", block_size=53, tie_mode="gt"),
    SparsifySpec("dare", density=0.3, rescale="inv_density"),
    SparsifySpec("della", density=0.4, epsilon=0.1, rescale="l1"),
    SparsifySpec("none"),
    SparsifySpec("magnitude", density=0.3, key_dtype=torch.bfloat16, rescale="l1"),
]
COMBINES = [
    CombineSpec("sum"),
    CombineSpec("sum", divisor="weights", normalize=True, lam=0.9),
    CombineSpec("ties", elect="weighted_sum", divisor="weights", normalize=True),
    CombineSpec("ties", elect="count", divisor="count", normalize=True, lam=1.3),
    CombineSpec("ties", elect="sum", divisor="none", normalize=False),
    CombineSpec("ties", elect="frequency", divisor="count", normalize=True),
]


_MERGE_CASES: dict = {}


@pytest.mark.parametrize("combine", COMBINES, ids=lambda c: f"{c.combine}-{c.elect}-{c.divisor}-{int(c.normalize)}")
@pytest.mark.parametrize("out_dtype", DTYPES, ids=_id)
@pytest.mark.parametrize("M,shape,with_base", [(3, (9, 7, 41), True), (4, (4097,), False), (16, (5, 123, 123), True)],
                         ids=str)
def test_apply_combine_rules_match_reference(combine, out_dtype, M, shape, with_base):
    key = (M, shape, with_base)
    if key not in _MERGE_CASES:  # inputs, plans and reference values shared by the combine cases
        dtype = [torch.bfloat16, torch.float16, torch.float32][M % 3]
        deltas = [make_delta(shape, dtype, ("s1e-4", "s2e-3", "quant")[i % 3]) for i in range(M)]
        specs = [SPECS[i % len(SPECS)] for i in range(M)]
        base = (torch.randn(shape) * 0.02).to(torch.bfloat16) if with_base else None
        plans = [_plan_for(CPU, d, s, 5, i) for i, (d, s) in enumerate(zip(deltas, specs))]
        vals = [R.sparsify_ref(d, s, seed=5, name="t", stream=i) for i, (d, s) in enumerate(zip(deltas, specs))]
        _MERGE_CASES[key] = deltas, base, plans, vals
    deltas, base, plans, vals = _MERGE_CASES[key]
    weights = [(0.3, 1.0, 0.5, 0.7)[i % 4] for i in range(M)]
    got = CPU.apply(deltas, base, plans, weights, combine, out_dtype)
    assert got.dtype == out_dtype and got.shape == deltas[0].shape
    ref = R.combine_ref(vals, weights, combine)
    if base is not None:
        ref = base.to(torch.float64) + ref
    bound = sum(abs(w) * float(v.abs().max()) for w, v in zip(weights, vals)) / min(weights) * abs(combine.lam)
    bound += 0.0 if base is None else float(base.abs().max().float())
    assert_merge_close(got, ref, out_dtype, bound)
    alt = TORCH.apply(deltas, base, plans, weights, combine, out_dtype)  # same fp32 formula
    assert_merge_close(got, alt.to(torch.float64), out_dtype, bound)


def test_merge_threads_bit_identical():
    shape = (3, 100_003)
    deltas = [make_delta(shape, torch.bfloat16, k) for k in ("s1e-4", "s2e-3", "quant")]
    base = (torch.randn(shape) * 0.02).to(torch.bfloat16)
    specs = [SPECS[0], SPECS[2], SPECS[3]]
    plans = [_plan_for(CPU, d, s, 9, i) for i, (d, s) in enumerate(zip(deltas, specs))]
    outs = []
    for nt in (1, 2):
        torch.set_num_threads(nt)
        outs.append(CPU.apply(deltas, base, plans, [1.0, 0.5, 0.7], COMBINES[2], torch.bfloat16))
    assert torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16))


def test_backend_contract():
    assert CPU.name == "cpu"
    assert CPU.supports(torch.device("cpu")) and not CPU.supports(torch.device("meta"))
    x = make_delta((0,), torch.bfloat16)
    tau, above, eq = CPU.select(x, torch.zeros(1, dtype=torch.int64), "tensor", None, None)
    assert tau.tolist() == [1 << 15] and above.tolist() == [0] and eq.tolist() == [0]
    out = CPU.apply([x], None, [ApplyPlan("dense")], [1.0], CombineSpec("sum"), torch.float32)
    assert out.shape == (0,)


SMALL_CALLS_SCRIPT = r"""
import os, sys, torch
import dppa_kernels as dk
from dppa_kernels._C import cpu_extension

limit = cpu_extension().module.SERIAL_BELOW
torch.set_num_threads(4)
tasks = lambda: len(os.listdir("/proc/self/task"))
side = int(limit ** 0.5) // 2  # a square well below the limit
base, d = torch.randn(side, side).bfloat16(), torch.randn(side, side).bfloat16()
dk.magnitude_threshold(d, 0.5, check_finite=False, backend="reference")  # warm up torch alone
before = tasks()
for _ in range(3):
    dk.merge_deltas([d, d], base, method="ties", density=0.3, backend="cpu")
    dk.merge_deltas([d, d], base, method="della", density=0.3, epsilon=0.1, rescale=True, backend="cpu")
    dk.prune(d, "magnitude", density=0.2, partition="row", backend="cpu")
small = tasks()
big = torch.randn(limit * 4).bfloat16()
dk.merge_deltas([big, big], big, method="ties", density=0.3, backend="cpu")
print(before, small, tasks())
"""


@pytest.mark.skipif(not __import__("os").path.isdir("/proc/self/task"), reason="needs Linux /proc to count threads")
def test_small_calls_run_on_the_calling_thread():
    """Calls below SERIAL_BELOW elements never start an OpenMP team (its start-up and barrier cost
    more than the work); a larger call does, which shows that the count can see one."""
    import subprocess
    import sys

    m = CPU._m
    assert m.threads_for(8, m.SERIAL_BELOW - 1) == 1 and m.threads_for(8, m.SERIAL_BELOW) == 8
    r = subprocess.run([sys.executable, "-c", SMALL_CALLS_SCRIPT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    before, small, big = map(int, r.stdout.split())
    assert small == before, f"small calls started {small - before} thread(s)"
    assert big > small, "the large call should have started an OpenMP team"
