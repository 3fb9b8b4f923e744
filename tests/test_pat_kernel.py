"""Fused HSM kernel vs the torch reference: output and all gradients, fp32/bf16/fp16, odd shapes."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from dppa_kernels.pat import hsm, hsm_ref, ops, triton_status  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]
# (y shape, rank): one program; ≥ 2 row and column programs; r above BLOCK_R (two K chunks);
# r = 1 padded to 16; a 3-D activation.
CASES = [((1, 16), 1), ((7, 64), 3), ((130, 96), 5), ((33, 200), 70), ((2, 9, 40), 2)]
# atol per dtype, relative to max|ref|: ≥ 1 bf16 ulp, since the interpreter truncates fp32 → bf16
ATOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def _devices():
    devs = []
    ok, why = triton_status()
    if ok and why == "interpreted":
        devs.append("cpu")
    if torch.cuda.is_available() and ok and why == "compiled":
        devs.append("cuda")
    return devs or [pytest.param("cpu", marks=pytest.mark.skip(
        reason=f"Triton HSM kernels cannot run here: {why}"))]


@pytest.fixture(scope="module", autouse=True)
def _kernels_really_run():
    """A GPU-less run must exercise the interpreted kernels, not silently the torch fallback."""
    ok, why = triton_status()
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1":
        assert ok and why == "interpreted", why
    yield


def _inputs(shape, rank, dtype, device, residual, scale):
    d = shape[-1]
    g = torch.Generator().manual_seed(sum(shape) * 31 + rank)
    # realistic magnitudes: activations O(1), a trained low-rank path O(0.1), s around 1
    y = torch.randn(shape, generator=g).to(dtype)
    t = dict(
        y=y,
        l0=torch.randn(rank, d, generator=g) / d ** 0.5,
        l1=torch.randn(d, rank, generator=g) * 0.3,
        s=(torch.rand(d, generator=g) + 0.5) if scale else None,
        m=torch.rand(d, generator=g),
        residual=torch.randn(shape, generator=g).to(dtype) if residual else None,
    )
    return {k: (None if v is None else v.to(device).requires_grad_()) for k, v in t.items()}


def _run(fn, t, dout):
    for v in t.values():
        if v is not None:
            v.grad = None
    out = fn(**t)
    out.backward(dout.to(out.dtype))
    return out.detach().float(), {k: v.grad.detach().float() for k, v in t.items() if v is not None}


def _close(name, got, ref, lowp, atol):
    """|got − ref| ≤ 2·|torch low-precision − ref| + atol·max(1, max|ref|) (flash-attn rule)."""
    scale = max(1.0, float(ref.abs().max()))
    tol = 2 * float((lowp - ref).abs().max()) + atol * scale
    err = (got - ref).abs()
    bad = err > tol
    assert not torch.isnan(got).any(), f"{name}: NaN in kernel output"
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {err.numel()} mismatches, max err "
                           f"{float(err.max()):.3g} > tol {tol:.3g}; first at "
                           f"{tuple(int(i) for i in bad.nonzero()[0])}: got "
                           f"{float(got[bad][0]):.6g}, ref {float(ref[bad][0]):.6g}")


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,rank", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("residual,scale", [(True, True), (False, False)],
                         ids=["res+scale", "nores+noscale"])
def test_fused_matches_reference(device, dtype, shape, rank, residual, scale):
    t = _inputs(shape, rank, dtype, device, residual, scale)
    dout = torch.randn(shape, generator=torch.Generator().manual_seed(7)).to(device)

    out_k, g_k = _run(lambda **a: hsm(**a, backend="triton"), t, dout)

    def ref32(y, residual, **a):  # fp32 oracle on the same (rounded) inputs
        return hsm_ref(y.float(), residual=None if residual is None else residual.float(),
                       upcast=True, **a)

    out_r, g_r = _run(ref32, t, dout)
    out_t, g_t = _run(lambda **a: hsm(**a, backend="torch"), t, dout)
    atol = ATOL[dtype]
    _close("out", out_k, out_r, out_t, atol)
    assert set(g_k) == set(g_r)
    for k in g_r:
        _close(f"d{k}", g_k[k], g_r[k], g_t[k], atol)
    assert out_k.dtype == torch.float32 and hsm(**t, backend="triton").dtype == dtype


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fp32_residual_stream_with_bf16_activations(device, backend):
    """out_dtype=float32: bf16 y, fp32 residual and output; gradients keep their dtypes."""
    t = _inputs((37, 80), 4, torch.bfloat16, device, residual=False, scale=True)
    del t["residual"]
    res = torch.randn(37, 80, device=device, requires_grad=True)
    out = hsm(**t, residual=res, out_dtype=torch.float32, backend=backend)
    assert out.dtype == torch.float32
    ref = hsm_ref(t["y"].float(), t["l0"], t["l1"], t["s"], t["m"], res, upcast=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=8e-3 * float(ref.detach().abs().max()))
    out.backward(torch.ones_like(out))
    assert res.grad.dtype == torch.float32 and t["y"].grad.dtype == torch.bfloat16
    assert torch.equal(res.grad, torch.ones_like(res))
    with pytest.raises(TypeError, match="residual must have the output dtype"):
        hsm(**t, residual=res, backend=backend)


@pytest.mark.parametrize("device", _devices())
def test_strided_input_and_inputs_untouched(device):
    """y and residual as column slices of wider buffers (row stride ≠ d); buffers unchanged."""
    d, r = 40, 4
    big_y = torch.randn(12, 64, device=device)
    big_r = torch.randn(12, 64, device=device)
    y, res = big_y[:, 8:8 + d], big_r[:, 3:3 + d]
    l0, l1 = torch.randn(r, d, device=device), torch.randn(d, r, device=device)
    s, m = torch.rand(d, device=device), torch.rand(d, device=device)
    copies = [t.clone() for t in (big_y, big_r, l0, l1, s, m)]
    out = hsm(y, l0, l1, s, m, res, backend="triton")
    torch.testing.assert_close(out, hsm_ref(y, l0, l1, s, m, res), rtol=1e-5, atol=1e-5)
    for a, b in zip((big_y, big_r, l0, l1, s, m), copies):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", _devices())
def test_identity_at_init_is_exact(device):
    """L1 = 0, s = 1, m = 1: out = y exactly (the prepared model equals the base at step 0), with
    the tensors on the device the kernels run on (compiled Triton: CUDA only)."""
    y = torch.randn(5, 32, device=device)
    l0, l1 = torch.randn(2, 32, device=device), torch.zeros(32, 2, device=device)
    s = m = torch.ones(32, device=device)
    for backend in ("triton", "torch"):
        out = hsm(y, l0, l1, s, m, backend=backend)
        assert out.device == y.device and torch.equal(out, y), backend


def test_forced_triton_unavailable_raises_and_auto_falls_back(monkeypatch):
    monkeypatch.setitem(ops._TRITON, "status", (False, "triton is not importable: test"))
    y, l0, l1 = torch.randn(3, 8), torch.randn(2, 8), torch.randn(8, 2)
    s, m = torch.rand(8), torch.rand(8)
    with pytest.raises(RuntimeError, match="triton is not importable: test"):
        hsm(y, l0, l1, s, m, backend="triton")
    torch.testing.assert_close(hsm(y, l0, l1, s, m), hsm_ref(y, l0, l1, s, m))
    monkeypatch.setenv("DPPA_KERNELS_BACKEND", "triton")
    with pytest.raises(RuntimeError):
        hsm(y, l0, l1, s, m)


@pytest.mark.parametrize("env,want", [("torch", "torch"), ("reference", "torch"), ("auto", None), ("", None)])
def test_backend_env_means_what_it_means_for_every_op(monkeypatch, env, want):
    """DPPA_KERNELS_BACKEND is read by the one registry: the same names, the same meaning."""
    from dppa_kernels.backends.registry import resolve

    monkeypatch.setenv("DPPA_KERNELS_BACKEND", env or "auto")
    auto = "triton" if ops._triton_runs_on(torch.device("cpu"))[0] else "torch"
    assert ops.select_backend("auto", torch.device("cpu")) == (want or auto)
    assert ops.select_backend("torch", torch.device("cpu")) == "torch"  # an explicit request wins
    assert resolve("auto", torch.device("cpu")) in ("reference", "torch", "cpu")


@pytest.mark.parametrize("env", ["cpu", "cuda"])
def test_backend_env_without_an_hsm_kernel_raises(monkeypatch, env):
    monkeypatch.setenv("DPPA_KERNELS_BACKEND", env)
    y, l0, l1 = torch.randn(3, 8), torch.randn(2, 8), torch.randn(8, 2)
    with pytest.raises(ValueError, match=f"DPPA_KERNELS_BACKEND='{env}': the HSM op has no {env} kernel"):
        hsm(y, l0, l1, None, torch.ones(8))
    monkeypatch.setenv("DPPA_KERNELS_BACKEND", "fast")
    with pytest.raises(ValueError, match="DPPA_KERNELS_BACKEND must be one of"):
        hsm(y, l0, l1, None, torch.ones(8))


def test_import_without_triton_falls_back():
    """`import dppa_kernels.pat` must work without triton; the reason is recorded."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from dppa_kernels import pat\n"
        "ok, why = pat.triton_status()\n"
        "assert not ok and 'triton is not importable' in why, why\n"
        "y = torch.randn(3, 8)\n"
        "out = pat.hsm(y, torch.randn(2, 8), torch.zeros(8, 2), None, torch.ones(8))\n"
        "assert torch.equal(out, y)\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(l1=torch.randn(8, 3)), ValueError, r"l1 has shape \(8, 3\), expected \(8, 2\)"),
    (dict(s=torch.rand(7)), ValueError, r"s has shape \(7,\), expected \(8,\)"),
    (dict(m=torch.rand(8).double()), TypeError, "m must be float32"),
    (dict(y=torch.randint(0, 3, (3, 8))), TypeError, "y must be float32"),
    (dict(residual=torch.randn(3, 8).half()), TypeError, "residual must have the output dtype"),
    (dict(out_dtype=torch.int32), TypeError, "out_dtype must be"),
    (dict(l0=torch.randn(8)), ValueError, "l0 must be a 2-D tensor"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(backend="cuda"), ValueError, "backend='cuda': the HSM op has no cuda kernel"),
])
def test_bad_input(kwargs, exc, match):
    args = dict(y=torch.randn(3, 8), l0=torch.randn(2, 8), l1=torch.randn(8, 2), s=torch.rand(8),
                m=torch.rand(8))
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        hsm(**args)
