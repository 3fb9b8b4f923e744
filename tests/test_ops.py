"""Public ops: input validation, NaN/Inf found by the passes themselves, inputs left unmodified,
on every backend (tests/backends.py). What each backend computes against the reference is in
tests/test_backend_parity.py."""

import os
import re

import pytest
import torch
from backends import BACKENDS, on
from helpers import DTYPE_IDS, DTYPES, family, realistic_delta

import dppa_kernels as dk
from dppa_kernels.backends.registry import availability


@pytest.fixture(params=BACKENDS)
def any_backend(request):
    """(backend, device) of every backend that runs here (tests/backends.py: triton on CPU tensors
    under the interpreter, triton and cuda on CUDA tensors on a GPU machine)."""
    return request.param, on(request.param).type


def test_dp_densities_from_deltas_equals_from_histograms():
    _, deltas = family((16, 16), 6, torch.bfloat16, sigma=2e-3)
    names = [f"model.layers.{i // 2}.mlp.{'up' if i % 2 else 'down'}_proj.weight" for i in range(6)]
    stats = dict(zip(names, deltas))
    a = dk.dp_densities(stats, densities=(0.3,))
    b = dk.dp_densities({n: dk.tensor_histogram(t) for n, t in stats.items()}, densities=(0.3,))
    assert a.densities == b.densities and len(a.densities) == 6


def test_inputs_are_not_modified(any_backend):
    be, device = any_backend
    base, deltas = family((64, 64), 3, torch.bfloat16)
    base, deltas = base.to(device), [d.to(device) for d in deltas]
    copies = [d.clone() for d in deltas], base.clone()
    dk.merge_deltas(deltas, base, method="dare_ties", density=0.3, backend=be)
    dk.prune(deltas[0], "magnitude", density=0.3, backend=be)
    assert all(torch.equal(a, b) for a, b in zip(deltas, copies[0])) and torch.equal(base, copies[1])


def test_non_contiguous_and_empty_inputs(any_backend):
    be, device = any_backend
    x = realistic_delta((64, 32), torch.float32).t()
    got = dk.prune(x.to(device), "magnitude", density=0.3, backend=be)
    assert not x.to(device).is_contiguous()
    assert torch.equal(got.cpu(), dk.prune(x.contiguous(), "magnitude", density=0.3, backend="reference"))
    e = torch.empty(0, 8, device=device)
    assert dk.prune(e, "magnitude", density=0.5, backend=be).shape == (0, 8)


@pytest.mark.parametrize("call, exc, words", [
    (lambda x: dk.prune(x, "magnitude", density=1.5), ValueError, "density must be in [0, 1], got 1.5"),
    (lambda x: dk.prune(x, "magnitude", density=-0.1), ValueError, "got -0.1"),
    (lambda x: dk.prune(x.to(torch.int32), "magnitude", density=0.5), TypeError, "torch.int32"),
    (lambda x: dk.prune(x, "nope", density=0.5), ValueError, "'nope'"),
    (lambda x: dk.prune(x, "magnitude", density=0.5, colour=1), ValueError, "colour"),
    (lambda x: dk.prune(x, "magnitude", density=0.5, tie_mode="lt"), ValueError, "'lt'"),
    (lambda x: dk.prune(x, "bands", densities=(0.2, 0.1), alphas=(1, 1)), ValueError, "non-decreasing"),
    (lambda x: dk.prune(x, "bands", densities=(0.1, 0.2), alphas=(1, -1)), ValueError, ">= 0"),
    (lambda x: dk.prune(x, "della", density=0.1, epsilon=0.2), ValueError, "epsilon"),
    (lambda x: dk.merge_deltas([x, x[:, :3]], x, method="ties"), ValueError, "deltas[1] has shape (8, 3)"),
    (lambda x: dk.merge_deltas([x, x.double()], x), TypeError, "deltas[1] has dtype torch.float64"),
    (lambda x: dk.merge_deltas([x], x[:2]), ValueError, "base has shape (2, 8)"),
    (lambda x: dk.merge_deltas([x], x, method="slerp"), ValueError, "unknown method 'slerp'"),
    (lambda x: dk.merge_deltas([x], x, method="ties", densty=0.2), ValueError, "densty"),
    (lambda x: dk.merge_deltas([x, x], x, method="ties", density=[0.1]), ValueError, "density has 1 values"),
    (lambda x: dk.magnitude_threshold(x, 0.5, backend="gpu"), ValueError, "'gpu'"),
    (lambda x: dk.magnitude_threshold(x, 0.5, partition="block"), ValueError, "block_size"),
    (lambda x: dk.prune(x.double(), "magnitude", density=0.5, backend="torch"), TypeError, "float64"),
])
def test_bad_input_errors_name_the_argument(call, exc, words):
    x = realistic_delta((8, 8), torch.float32)
    with pytest.raises(exc) as info:
        call(x)
    assert words in str(info.value)


def test_nan_inf_rejected_by_default_and_allowed_on_request():
    x = realistic_delta((16,), torch.float32)
    x[3] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        dk.prune(x, "magnitude", density=0.5)
    with pytest.raises(ValueError, match=r"deltas\[1\] contains 1 NaN/Inf"):
        dk.merge_deltas([x.nan_to_num(), x], None, method="task_arithmetic")
    y = x.nan_to_num(posinf=1.0)
    y[5] = float("inf")
    out = dk.prune(y, "magnitude", density=0.5, check_finite=False, backend="reference")
    assert torch.isinf(out[5])


def test_required_backends_are_available():
    """.ci/test names the backends CI builds (DPPA_REQUIRE_BACKENDS): their suites skip when a
    backend is missing, so a broken build must fail here instead of passing by skipping."""
    required = [b for b in os.environ.get("DPPA_REQUIRE_BACKENDS", "").split(",") if b.strip()]
    missing = {b: availability()[b.strip()][1] for b in required if not availability()[b.strip()][0]}
    assert not missing, f"required backends unavailable: {missing}"


def test_forced_unavailable_backend_raises_with_reason():
    ok, why = availability()["cuda"]
    if ok:
        # This test needs an unavailable backend; on a GPU machine the cuda backend is available.
        pytest.skip("a CUDA backend is available here")
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        dk.prune(torch.ones(4), "magnitude", density=0.5, backend="cuda")


# ---------------------------------------------------------------- NaN/Inf: found by the passes themselves

def _poisoned(shape, dtype, device, seed=0):
    """(finite delta, the same with a NaN at a random element and -Inf at the last one)."""
    ok = realistic_delta(shape, dtype, sigma=2e-3, seed=seed).to(device)
    bad = ok.clone()
    flat = bad.view(-1)
    flat[int(torch.randint(0, flat.numel() - 1, (1,), generator=torch.Generator().manual_seed(seed)))] = float("nan")
    flat[-1] = float("-inf")
    return ok, bad


# (id, call(op inputs), name in the error); x is the poisoned tensor, y a finite one of the same shape
NONFINITE_CASES = [
    ("threshold", lambda x, y, be: dk.magnitude_threshold(x, 0.2, backend=be), "x"),
    ("threshold_rows_keep_none", lambda x, y, be: dk.magnitude_threshold(x, 0.0, partition="row", backend=be), "x"),
    ("threshold_blocks", lambda x, y, be: dk.magnitude_threshold(x, 0.3, partition="block", block_size=100,
                                                                 backend=be), "x"),
    ("prune_magnitude", lambda x, y, be: dk.prune(x, "magnitude", density=0.3, backend=be), "x"),
    ("prune_magnitude_keep_all", lambda x, y, be: dk.prune(x, "magnitude", density=1.0, backend=be), "x"),
    ("prune_dare", lambda x, y, be: dk.prune(x, "dare", density=0.3, backend=be), "x"),
    ("prune_della", lambda x, y, be: dk.prune(x, "della", density=0.4, epsilon=0.1, backend=be), "x"),
    ("prune_bands", lambda x, y, be: dk.prune(x, "bands", densities=(0.1, 0.2), backend=be), "x"),
    ("prune_breadcrumbs", lambda x, y, be: dk.prune(x, "breadcrumbs", density=0.3, gamma=0.05, backend=be), "x"),
    ("histogram", lambda x, y, be: dk.tensor_histogram(x, backend=be), "x"),
    ("merge_ties_delta", lambda x, y, be: dk.merge_deltas([y, x], y, method="ties", density=0.3, backend=be),
     "deltas[1]"),
    ("merge_ties_base", lambda x, y, be: dk.merge_deltas([y, y], x, method="ties", density=0.3, backend=be), "base"),
    ("merge_task_arithmetic", lambda x, y, be: dk.merge_deltas([y, x], y, method="task_arithmetic", backend=be),
     "deltas[1]"),
    ("merge_dare_ties", lambda x, y, be: dk.merge_deltas([x, y], y, method="dare_ties", density=0.5, backend=be),
     "deltas[0]"),
    ("merge_della_no_base", lambda x, y, be: dk.merge_deltas([y, x], None, method="della", density=0.4,
                                                             epsilon=0.1, backend=be), "deltas[1]"),
]
CASE_IDS = [c[0] for c in NONFINITE_CASES]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN·0
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", NONFINITE_CASES, ids=CASE_IDS)
def test_nonfinite_inputs_rejected_by_the_pass_that_reads_them(any_backend, dtype, case, monkeypatch):
    """Every default call refuses a NaN/Inf anywhere (a partition with nothing to keep included),
    naming the tensor and the count. The explicit check only runs to word the error, after a
    backend pass reported the input: the call on finite data never runs it (next test)."""
    be, device = any_backend
    _, call, name = case
    ok, bad = _poisoned((12, 130), dtype, device)
    from dppa_kernels import _validate as V

    calls = []
    real = V.check_finite
    monkeypatch.setattr(V, "check_finite", lambda t, n: calls.append(n) or real(t, n))
    with pytest.raises(ValueError, match="^" + re.escape(f"{name} contains 2 NaN/Inf")):
        call(bad, ok, be)
    assert calls[-1] == name  # the candidates the pass reported, confirmed up to the bad one


@pytest.mark.parametrize("case", NONFINITE_CASES, ids=CASE_IDS)
def test_default_call_runs_no_separate_finiteness_pass(any_backend, case, monkeypatch):
    """On finite inputs the default (checked) call neither runs the explicit check nor any isfinite
    over a tensor: the finiteness of every input is read off the select/histogram/apply passes."""
    be, device = any_backend
    _, call, _ = case
    ok, _ = _poisoned((12, 130), torch.bfloat16, device)
    from dppa_kernels import _validate as V

    explicit, sizes = [], []
    real_isfinite = torch.isfinite
    monkeypatch.setattr(V, "check_finite", lambda t, n: explicit.append(n))
    monkeypatch.setattr(torch, "isfinite", lambda t: sizes.append(t.numel()) or real_isfinite(t))
    call(ok, ok, be)
    assert explicit == [] and all(n <= 1 for n in sizes), (explicit, sizes)


def test_reference_keeps_the_explicit_check(monkeypatch):
    x = realistic_delta((8, 8), torch.float32)
    x[2, 2] = float("inf")
    with pytest.raises(ValueError, match=r"^x contains 1 NaN/Inf"):
        dk.prune(x, "dare", density=0.5, backend="reference")


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # the interpreter's fp16 key
@pytest.mark.parametrize("key_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_finite_values_overflowing_a_narrow_key_are_not_refused(any_backend, key_dtype):
    """A finite fp32 value beyond the key dtype's range has an Inf key; the pass reports it, the
    explicit check then finds the input finite, and the call completes like the reference."""
    be, device = any_backend
    x = realistic_delta((9, 77), torch.float32, sigma=2e-3)
    x[3, 5] = 3.4e38 if key_dtype == torch.bfloat16 else 7.0e4
    kw = dict(key_dtype=key_dtype, return_counts=True)
    got = dk.magnitude_threshold(x.to(device), 0.3, backend=be, **kw)
    ref = dk.magnitude_threshold(x, 0.3, backend="reference", **kw)
    for k in ("tau_key", "c_above", "c_eq"):
        assert torch.equal(got[k].cpu(), ref[k]), k
    assert torch.equal(dk.tensor_histogram(x.to(device), stats_dtype=key_dtype, backend=be),
                       dk.tensor_histogram(x, stats_dtype=key_dtype, backend="reference"))


def test_nan_keys_rounded_to_bf16_stay_in_range(any_backend):
    """Unchecked, an fp32 NaN keyed in bf16 gets a NaN key (above Inf's 0x7F80), not key 0 and not
    one outside the 15-bit range (a carry into bit 15 would index past the histogram)."""
    be, device = any_backend
    x = realistic_delta((5, 300), torch.float32, sigma=2e-3)
    x[1, 1] = float("nan")
    x[2, 2] = -float("nan")
    x[3, 3] = torch.tensor(0x7FFFFFFF, dtype=torch.int32).view(torch.float32)  # the largest NaN payload
    got = dk.tensor_histogram(x.to(device), stats_dtype=torch.bfloat16, check_finite=False, backend=be)
    ref = dk.tensor_histogram(x, stats_dtype=torch.bfloat16, check_finite=False, backend="reference")
    assert int(got.sum()) == x.numel() and int(got[0x7F81:].sum()) == 3
    assert torch.equal(got[:0x7F81], ref[:0x7F81])  # every finite key where the reference has it


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN·0
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_primitives_report_nonfinite_inputs_they_were_asked_to_check(any_backend, dtype):
    """The backend contract (backends.base): select and apply raise NonFiniteInput from their own
    pass, naming candidates among the inputs they were asked to check; unasked, they return."""
    from dppa_kernels.backends.base import ApplyPlan, NonFiniteInput
    from dppa_kernels.backends.registry import get_backend
    from dppa_kernels.spec import CombineSpec

    be_name, device = any_backend
    be = get_backend(be_name)
    ok, bad = _poisoned((12, 130), dtype, device)
    k = torch.tensor([300])
    with pytest.raises(NonFiniteInput):
        be.select(bad, k, "tensor", None, None, check_finite=True)
    with pytest.raises(NonFiniteInput):  # k = 0 everywhere: nothing to select, still read
        be.select(bad, torch.zeros(12, dtype=torch.int64), "row", None, None, check_finite=True)
    be.select(bad, k, "tensor", None, None)
    be.select(ok, k, "tensor", None, None, check_finite=True)
    dense = [ApplyPlan("dense")] * 3
    for bad_inputs in ((2,), (3,), (2, 3)):  # the base is input 3
        xs = [bad if i in bad_inputs else ok for i in range(4)]
        with pytest.raises(NonFiniteInput) as info:
            be.apply(xs[:3], xs[3], dense, [1.0] * 3, CombineSpec(), dtype, check_finite=(0, 2, 3))
        # the candidates: the bad inputs, possibly with the other checked ones (a result-side check)
        assert set(bad_inputs) <= set(info.value.inputs) <= {0, 2, 3}
    be.apply([ok, bad, bad], bad, dense, [1.0] * 3, CombineSpec(), dtype)  # not asked: no check


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's fp32 sum
def test_fp32_overflow_in_the_merge_is_not_a_nan_input(any_backend):
    """A merge of finite inputs whose sum overflows fp32 has an Inf result; the apply pass reports
    it, the explicit check finds every input finite, and the result stands (as the reference's)."""
    be, device = any_backend
    d = torch.full((3, 50), 3.0e38)
    d[1] = 1.0
    got = dk.merge_deltas([d.to(device), d.to(device)], None, method="task_arithmetic", backend=be).cpu()
    assert torch.equal(got, dk.merge_deltas([d, d], None, method="task_arithmetic", backend="reference"))
    assert bool(torch.isinf(got[0]).all()) and bool((got[1] == 2.0).all())
