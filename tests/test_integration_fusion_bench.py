"""FusionBench drop-ins, state-dict level: TIES trim / election / disjoint merge equal to FusionBench's
own ``ties_merging_utils`` on every backend, FusionBench's errors and edge cases kept, autograd
inputs handed to FusionBench, DARE's keep probability and statistics, install/uninstall hygiene.
Algorithm classes and the program entry point: ``test_integration_fusion_bench_algorithms.py``."""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import types

import pytest
import torch
from helpers import quantised_delta, realistic_delta

U = pytest.importorskip("fusion_bench.method.ties_merging.ties_merging_utils",
                        reason="fusion-bench is not installed (pip install 'dppa-kernels[fusion-bench]')")
DU = pytest.importorskip("fusion_bench.method.dare.utils", reason="fusion-bench is not installed")

from dppa_kernels.backends.registry import availability  # noqa: E402
from dppa_kernels.integrations import fusion_bench as fb  # noqa: E402
from dppa_kernels.integrations import fusion_bench_ties as fb_ties  # noqa: E402
from dppa_kernels.integrations.fusion_bench_dare import keep_probability  # noqa: E402

# FusionBench's own functions, captured before any install()
HOST = {n: getattr(U, n) for n in ("topk_values_mask", "resolve_sign", "ties_merging", "disjoint_merge")}
HOST_DROP = DU.param_random_drop_
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDS = ["fp32", "bf16", "fp16"]


@pytest.fixture(autouse=True)
def _clean():
    yield
    fb.uninstall()
    fb.set_options(rng="hash", backend="auto")


def use_backend(name):
    ok, why = availability()[name]
    if not ok:  # CI requires cpu and triton (DPPA_REQUIRE_BACKENDS, tests/test_ops.py)
        pytest.skip(f"{name} backend not available here: {why}")
    fb.set_options(backend=name)
    return name


@pytest.fixture(params=["cpu", "torch", "triton"])
def backend(request):
    return use_backend(request.param)


@pytest.fixture(params=["cpu", "torch"])
def fast_backend(request):
    """The full parity matrix runs here; Triton (an interpreter on the CPU) gets a smaller one."""
    return use_backend(request.param)


def host_ties(x, K, merge_func):
    with contextlib.redirect_stdout(io.StringIO()):  # FusionBench prints its progress
        return HOST["ties_merging"](x.clone(), K, merge_func)


def same(a, b, backend=None):
    """Equal values (NaN == NaN, -0 == +0), dtypes and shapes.

    Only exception: the Triton interpreter truncates fp32 -> bf16 stores (a GPU rounds to nearest
    even, like torch), so its bf16 results may sit one bf16 ulp towards zero.
    """
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    if backend == "triton" and a.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        ulp = torch.finfo(torch.bfloat16).eps * b.float().abs()
        assert bool(((a.float() - b.float()).abs() <= ulp).all()) and bool((a.float().abs() <= b.float().abs()).all())
        return
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def task_matrix(n, d, dtype, kind, seed=0):
    """[n, d] flattened task vectors: realistic low-precision deltas, a coarse grid (ties at every
    threshold), or opposite pairs that cancel exactly under a majority of the given sign."""
    if kind == "realistic":
        return torch.stack([realistic_delta((d,), dtype, seed=seed + i) for i in range(n)])
    if kind == "grid":
        return torch.stack([quantised_delta((d,), dtype, seed=seed + i) for i in range(n)])
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g).abs() * (1.0 if kind == "cancel+" else -1.0)
    if kind == "cancel0":  # as many + as - elected signs: FusionBench's majority sign is 0
        x[:, d // 2:] *= -1
    half = d // 3
    x[0, :half] = torch.round(torch.randn(half, generator=g) * 16) / 16
    x[1, :half] = -x[0, :half]  # these columns sum to exactly 0 with nonzero values
    return x.to(dtype)


# ---------------------------------------------------------------- TIES parity

def check_ties(backend, dtype, kind, merge_func, d, cases):
    for n, K in cases:
        x = task_matrix(n, d, dtype, kind if n > 1 or not kind.startswith("cancel") else "grid", seed=n)
        before = x.clone()
        same(fb.ties_merging(x, K, merge_func), host_ties(x, K, merge_func), backend)
        assert torch.equal(x, before), "input modified"


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("kind", ["realistic", "grid", "cancel+", "cancel-", "cancel0"])
@pytest.mark.parametrize("merge_func", ["sum", "mean", "max", "dis-mean"])
def test_ties_merging_equals_fusion_bench(fast_backend, dtype, kind, merge_func):
    cases = ((3, 20), (2, 0.2), (4, 0.7), (1, 0.05), (3, 0), (3, 99.9))
    check_ties(fast_backend, dtype, kind, merge_func, 2003, cases)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("kind", ["grid", "cancel0"])
@pytest.mark.parametrize("merge_func", ["sum", "mean", "max"])
def test_ties_merging_equals_fusion_bench_triton(dtype, kind, merge_func):
    check_ties(use_backend("triton"), dtype, kind, merge_func, 129, ((3, 20), (4, 0.7)))


# Triton runs in its CPU interpreter here: small shapes without the mask cover it
TOPK_CASES = ([(b, s, m) for b in ("cpu", "torch") for s in ((1, 1), (3, 1), (1, 9), (3, 1001), (5, 257))
               for m in (False, True)] + [("triton", s, False) for s in ((1, 1), (3, 1), (1, 9), (5, 129))])


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("backend_name,shape,return_mask", TOPK_CASES, ids=str)
def test_topk_values_mask_equals_fusion_bench(backend_name, dtype, shape, return_mask):
    backend = use_backend(backend_name)
    x = task_matrix(shape[0], shape[1], dtype, "grid", seed=shape[1])
    for K in (0, 0.3, 30, 0.999):
        ours, host = fb.topk_values_mask(x, K, return_mask), HOST["topk_values_mask"](x.clone(), K, return_mask)
        assert len(ours) == len(host)
        for a, b in zip(ours, host):
            same(a, b, backend)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("kind", ["realistic", "cancel-", "cancel0"])
def test_resolve_sign_equals_fusion_bench(backend, dtype, kind):
    x = task_matrix(3, 777, dtype, kind)
    same(fb.resolve_sign(x), HOST["resolve_sign"](x.clone()))


def test_ties_many_models_and_non_contiguous_input():
    """5–8 models (torch regroups only a few tail columns) and a transposed view."""
    for n in (5, 8):
        x = torch.randn(n, 20011)
        for merge_func in ("sum", "mean"):
            same(fb.ties_merging(x, 0.2, merge_func), host_ties(x, 0.2, merge_func))
    xt = torch.randn(4099, 3).t()
    assert not xt.is_contiguous()
    same(fb.ties_merging(xt, 20, "sum"), host_ties(xt, 20, "sum"))


def test_threshold_rank_follows_fusion_bench_K_rule():
    """K > 1 is a percentage; the threshold is the (int(d·K) + 1)-th largest; ties all kept."""
    assert fb_ties.keep_rank(10, 0.2) == 3 and fb_ties.keep_rank(10, 20) == 3
    assert fb_ties.keep_rank(10, 0) == 1 and fb_ties.keep_rank(10, 0.95) == 10
    for bad in (1, 100, 1.0, -0.5, None, "0.2", True):
        assert fb_ties.keep_rank(10, bad) is None, bad
    x = torch.tensor([[5.0, -4, 3, 3, 3, 1, 0, 0, 0, 0]])
    kept, frac = fb.topk_values_mask(x, 0.2)  # rank 3: |x| >= 3 keeps the three tied 3s too
    assert torch.equal(kept, torch.tensor([[5.0, -4, 3, 3, 3, 0, 0, 0, 0, 0]])) and float(frac) == 0.5


# ---------------------------------------------------------------- FusionBench's edge cases and errors

def _error(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            fn(*args)
        except Exception as exc:  # the type FusionBench raises is what we compare
            return type(exc)
    return None


@pytest.mark.parametrize("args", [
    (torch.randn(3, 50), 1, "sum"),  # K = 1: kthvalue(0)
    (torch.randn(3, 50), 100, "sum"),
    (torch.randn(3, 50), -0.5, "sum"),
    (torch.randn(3, 50), None, "sum"),
    (torch.randn(3, 50), 0.2, "median"),  # unknown merge function
    (torch.randn(50), 0.2, "sum"),  # 1-D input
], ids=["K=1", "K=100", "K<0", "K=None", "median", "1-D"])
def test_fusion_bench_errors_kept(args):
    expected = _error(HOST["ties_merging"], args[0].clone(), *args[1:])
    assert expected is not None
    assert _error(fb.ties_merging, *args) is expected
    if args[2] == "sum":
        assert _error(fb.topk_values_mask, args[0], args[1]) is _error(HOST["topk_values_mask"], args[0].clone(), args[1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["kept", "trimmed"])
def test_non_finite_inputs_get_fusion_bench_results(bad, where):
    x = torch.randn(3, 200)
    x[1, 7 if where == "kept" else 8] = bad
    if where == "trimmed":
        x[1, 8] = bad
        x[2, :] = bad  # a whole row: its threshold itself is not finite
    for merge_func in ("sum", "mean", "max"):
        same(fb.ties_merging(x, 20, merge_func), host_ties(x, 20, merge_func))
    for a, b in zip(fb.topk_values_mask(x, 20, True), HOST["topk_values_mask"](x.clone(), 20, True)):
        same(a, b)
    same(fb.resolve_sign(x), HOST["resolve_sign"](x.clone()))


def test_float64_inputs_use_fusion_bench():
    x = torch.randn(3, 500, dtype=torch.float64)
    same(fb.ties_merging(x, 20, "mean"), host_ties(x, 20, "mean"))


def test_autograd_inputs_go_to_fusion_bench():
    x = torch.randn(3, 400, requires_grad=True)
    out = fb.ties_merging(x, 20, "sum")
    assert out.grad_fn is not None, "kernels are not differentiable: FusionBench's code must run"
    out.sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    host_ties(ref, 20, "sum").sum().backward()
    assert torch.equal(x.grad, ref.grad)
    kept, _ = fb.topk_values_mask(x, 20)
    assert kept.grad_fn is not None and fb.resolve_sign(x).grad_fn is not None
    with torch.no_grad():  # no recording: the kernels run, same values
        out_ng = fb.ties_merging(x, 20, "sum")
    assert out_ng.grad_fn is None and torch.equal(out_ng, out.detach())


def test_fused_path_runs_without_fallback(monkeypatch):
    """The values above come from our kernels, not from the fallback."""
    def boom(*a, **k):
        raise AssertionError("FusionBench's own code ran")

    x = task_matrix(3, 999, torch.bfloat16, "cancel-")
    expected = {m: host_ties(x, 20, m) for m in ("sum", "mean", "max")}
    fb.install()
    for name in ("ties_merging", "topk_values_mask", "resolve_sign"):
        monkeypatch.setitem(fb._state["originals"], (fb.TIES_MODULE, name), boom)
    for merge_func, want in expected.items():
        same(U.ties_merging(x, 20, merge_func), want)
    U.topk_values_mask(x, 20, True)
    U.resolve_sign(x)


# ---------------------------------------------------------------- DARE

@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
def test_keep_probability_is_torch_rand_like_draw(dtype):
    """Exactly P(rand_like(x) > p) of torch's CPU draw: checked against 4M real draws."""
    g = torch.Generator().manual_seed(11)
    n = 4_000_000
    draws = torch.rand(n, dtype=dtype, generator=g)
    for p in (-0.1, 0.0, 0.1, 0.3, 0.5, 0.9, 0.99, 0.999, 1.0):
        q = keep_probability(dtype, p)
        assert q * 2**24 == int(q * 2**24)
        emp = float((draws > p).double().mean())
        assert abs(emp - q) <= 5 * math.sqrt(q * (1 - q) / n) + 1e-12, (p, q, emp)
    assert keep_probability(torch.bfloat16, 0.999) == 0.0  # 0.999 rounds to 1 in bf16: all dropped
    assert keep_probability(torch.float32, 0.1) != keep_probability(torch.bfloat16, 0.1)


@pytest.mark.parametrize("dtype", DTYPES, ids=IDS)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("rescale", [True, False])
def test_param_random_drop_statistics(dtype, p, rescale):
    n = 1 << 19
    x = (torch.randn(n) * 0.01 + 0.02).to(dtype)  # mean 0.02: the rescaled mean must keep it
    param = torch.nn.Parameter(x.clone())
    torch.manual_seed(5)
    fb.param_random_drop_(param, p, rescale)
    out = param.data
    kept = out != 0
    q = keep_probability(dtype, p)
    frac = float(kept.double().mean())
    assert abs(frac - q) <= 5 * math.sqrt(q * (1 - q) / n), (frac, q)
    host = torch.nn.Parameter(x.clone())  # FusionBench's own draws: the same keep rate
    HOST_DROP(host, p, rescale)
    frac_host = float((host.data != 0).double().mean())
    assert abs(frac - frac_host) <= 5 * math.sqrt(2 * q * (1 - q) / n)
    expect = x / (1 - p) if rescale else x  # kept values: FusionBench's own division
    assert torch.equal(out[kept], expect[kept]) and out.dtype == dtype and out.shape == x.shape
    if rescale:
        assert abs(float(out.double().mean()) / float(x.double().mean()) - q / (1 - p)) < 0.02
    # independent of the magnitude: keep rate the same among small and large entries
    small = x.float().abs() < x.float().abs().median()
    assert abs(float(kept[small].double().mean()) - float(kept[~small].double().mean())) < 0.01


def test_param_random_drop_seeding_and_fresh_draws():
    x = torch.randn(10_000)
    outs = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        a, b = torch.nn.Parameter(x.clone()), torch.nn.Parameter(x.clone())
        fb.param_random_drop_(a, 0.5, True)
        fb.param_random_drop_(b, 0.5, True)
        assert not torch.equal(a.data != 0, b.data != 0), "two calls drew the same mask"
        outs.append(a.data)
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])


def test_param_random_drop_edge_cases():
    x = torch.randn(1000, dtype=torch.bfloat16)
    for p, rescale in ((0.999, True), (1.0, True), (1.0, False), (-0.5, True)):
        a, b = torch.nn.Parameter(x.clone()), torch.nn.Parameter(x.clone())
        fb.param_random_drop_(a, p, rescale)
        HOST_DROP(b, p, rescale)
        same(a.data, b.data)  # deterministic here: all kept or all dropped (1 − p = 0: NaN)
    nan = torch.nn.Parameter(torch.tensor([1.0, float("nan"), 2.0]))  # FusionBench's code decides
    fb.param_random_drop_(nan, 0.5, True)
    assert math.isnan(float(nan.data[1]))


def test_torch_rng_option_reproduces_fusion_bench_draws():
    fb.set_options(rng="torch")
    x = torch.randn(3000)
    a, b = torch.nn.Parameter(x.clone()), torch.nn.Parameter(x.clone())
    torch.manual_seed(9)
    fb.param_random_drop_(a, 0.3, True)
    torch.manual_seed(9)
    HOST_DROP(b, 0.3, True)
    same(a.data, b.data)


def test_module_random_drop_uses_the_drop_in(monkeypatch):
    """FusionBench's module_random_drop_ calls param_random_drop_ through its module: ours once installed."""
    calls = []
    real = fb._dare.random_drop
    monkeypatch.setattr(fb._dare, "random_drop", lambda *a: calls.append(a[0].shape) or real(*a))
    fb.install()
    m = torch.nn.Sequential(torch.nn.Linear(300, 300), torch.nn.Linear(300, 10))
    DU.module_random_drop_(m, 0.9, True)
    assert calls == [p.shape for p in m.parameters()]
    kept = torch.cat([(p.data != 0).reshape(-1) for p in m.parameters()]).double().mean()
    assert abs(float(kept) - keep_probability(torch.float32, 0.9)) < 0.01


# ---------------------------------------------------------------- install / uninstall

def _holders():
    """(module, attr) of every loaded FusionBench module attribute that is one of the originals."""
    originals = {id(f): f for f in list(HOST.values()) + [HOST_DROP]}
    out = {}
    for name, m in list(sys.modules.items()):
        if m is not None and name.startswith("fusion_bench"):
            for attr, v in vars(m).items():
                if id(v) in originals and v is originals[id(v)]:
                    out[(name, attr)] = v
    return out


def test_install_uninstall_restore_fusion_bench_exactly():
    import fusion_bench.method.dare.task_arithmetic  # noqa: F401  (import by name: patched there too)
    import fusion_bench.method.dare.ties_merging as dare_ties
    import fusion_bench.method.ties_merging.ties_merging as ties_mod

    before = _holders()
    assert ("fusion_bench.method.ties_merging.ties_merging", "ties_merging") in before
    assert ("fusion_bench.method.dare.ties_merging", "param_random_drop_") in before
    fb.install(rng="hash")
    fb.install()  # idempotent
    assert fb.is_installed()
    assert ties_mod.ties_merging is fb.ties_merging and dare_ties.ties_merging is fb.ties_merging
    assert dare_ties.param_random_drop_ is fb.param_random_drop_ and DU.param_random_drop_ is fb.param_random_drop_
    assert U.topk_values_mask is fb.topk_values_mask and U.disjoint_merge is HOST["disjoint_merge"]
    remaining = {k for k, v in _holders().items() if v is not HOST["disjoint_merge"]}
    assert not remaining, remaining
    # a FusionBench module imported while installed picks up the patched name, and is restored
    probe = types.ModuleType("fusion_bench._dk_probe")
    sys.modules[probe.__name__] = probe
    try:
        exec("from fusion_bench.method.ties_merging.ties_merging_utils import ties_merging", vars(probe))
        assert probe.ties_merging is fb.ties_merging
        fb.uninstall()
        assert probe.ties_merging is HOST["ties_merging"]
    finally:
        del sys.modules[probe.__name__]
    assert not fb.is_installed() and _holders() == before
    fb.uninstall()  # no-op


def test_options_validated():
    with pytest.raises(ValueError, match="rng"):
        fb.set_options(rng="numpy")
    with pytest.raises(ValueError, match="backend"):
        fb.install(backend="reference")
    assert not fb.is_installed()


def test_install_extra_resolves():
    """The extra .ci/setup asks for and the one the install hint names are extras the installed
    metadata provides, spelled exactly as there: pip before 23.3 compares them unnormalised."""
    import importlib.metadata
    import re
    from pathlib import Path

    provided = set(importlib.metadata.metadata("dppa-kernels").get_all("Provides-Extra") or [])
    setup_script = (Path(__file__).resolve().parents[1] / ".ci" / "setup").read_text()
    requested = re.search(r'-e "\.\[([^\]]+)\]"', setup_script).group(1).split(",")
    assert "fusion-bench" in requested and not set(requested) - provided, (requested, provided)
    with pytest.raises(ImportError, match=re.escape("pip install 'dppa-kernels[fusion-bench]'")):
        fb._module("fusion_bench._no_such_module")
