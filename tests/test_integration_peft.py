"""PEFT drop-ins: equal to ``peft.utils.merge_utils`` on tie-free inputs, PEFT's edge cases kept,
LoRA ``add_weighted_adapter`` unchanged by ``install()``, and install/uninstall hygiene."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

mu = pytest.importorskip("peft.utils.merge_utils", reason="peft is not installed")

from dppa_kernels.integrations import peft as dp  # noqa: E402

W = torch.tensor([0.7, -0.4, 0.5])


@pytest.fixture(autouse=True)
def _clean():
    yield
    dp.uninstall()
    dp.set_options(rng="hash", zero_density="nan", backend="auto")


def _tensors(m=3, shape=(48, 40), dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(shape, generator=g) * 0.01).to(dtype) for _ in range(m)]  # continuous: no ties


@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 0.9])
def test_single_tensor_pruning_equals_peft(density):
    x = _tensors(1)[0]
    assert torch.equal(dp.magnitude_based_pruning(x, density), mu.magnitude_based_pruning(x, density))
    assert torch.equal(dp.prune(x, density, "magnitude"), mu.prune(x, density, "magnitude"))


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_sign_mask_and_disjoint_merge_equal_peft(method):
    st = torch.stack(_tensors())
    st[0, :3] = 0.0  # zeros never agree
    mask = dp.calculate_majority_sign_mask(st, method)
    assert mask.dtype == torch.bool and torch.equal(mask, mu.calculate_majority_sign_mask(st, method))
    weighted = st * W.view(-1, 1, 1)
    assert torch.equal(dp.disjoint_merge(weighted, mask), mu.disjoint_merge(weighted, mask))
    with pytest.raises(RuntimeError, match="Unimplemented"):
        dp.calculate_majority_sign_mask(st, "median")


@pytest.mark.parametrize("density", [0.1, 0.45, 1.0])
def test_merge_functions_equal_peft(density):
    ts = _tensors()
    assert torch.equal(dp.task_arithmetic(ts, W), mu.task_arithmetic(ts, W))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # density 1 warns in both
        assert torch.equal(dp.magnitude_prune(ts, W, density), mu.magnitude_prune(ts, W, density))
        for method in ("total", "frequency"):
            assert torch.equal(dp.ties(ts, W, density, method), mu.ties(ts, W, density, method))


@pytest.mark.parametrize("tdtype,wdtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float16),
                                           (torch.bfloat16, torch.bfloat16)])
def test_output_dtypes_follow_peft(tdtype, wdtype):
    ts, w = _tensors(dtype=tdtype), W.to(wdtype)
    for i, (ours, theirs) in enumerate(((dp.task_arithmetic(ts, w), mu.task_arithmetic(ts, w)),
                                        (dp.magnitude_prune(ts, w, 0.5), mu.magnitude_prune(ts, w, 0.5)),
                                        (dp.ties(ts, w, 0.5), mu.ties(ts, w, 0.5)))):
        assert ours.dtype == theirs.dtype
        # we round once, PEFT after each op: a few low-precision ulps apart; pruned outputs also
        # differ where low-precision |x| ties straddle the cut (PEFT's topk breaks them arbitrarily)
        # (atol: PEFT's per-term roundings of terms up to ~0.03 cost up to ~2e-4 near cancellations)
        close = torch.isclose(ours.float(), theirs.float(), rtol=2e-2, atol=3e-4)
        assert bool(close.all()) if i == 0 else float(close.float().mean()) > 0.97


def test_random_pruning_hash_rng_statistics_and_seeding():
    x = _tensors(1, shape=(200, 100))[0]
    torch.manual_seed(7)
    a = dp.random_pruning(x, 0.3, rescale=True)
    torch.manual_seed(7)
    b = dp.random_pruning(x, 0.3, rescale=True)
    c = dp.random_pruning(x, 0.3, rescale=True)
    assert torch.equal(a, b) and not torch.equal(a, c)  # torch.manual_seed controls the draws
    kept = a != 0
    n = x.numel()
    assert abs(float(kept.float().mean()) - 0.3) < 5 * math.sqrt(0.3 * 0.7 / n)
    assert torch.allclose(a[kept], x[kept] / 0.3, rtol=1e-6)  # ÷ density, as PEFT
    plain = dp.random_pruning(x, 0.3, rescale=False)
    assert torch.equal(plain[plain != 0], x[plain != 0])


def test_dare_hash_rng_statistics():
    ts = _tensors(2, shape=(300, 100))
    w = torch.tensor([1.0, 1.0])
    out = dp.dare_linear(ts, w, 0.4)
    zero = float((out == 0).float().mean())
    assert abs(zero - 0.6 ** 2) < 0.01  # both dropped
    ref = mu.dare_linear(ts, w, 0.4)
    assert abs(float((ref == 0).float().mean()) - zero) < 0.015
    assert abs(float(out.abs().sum() / ref.abs().sum()) - 1) < 0.03
    ties_out = dp.dare_ties(ts, w, 0.4)
    assert abs(float((ties_out == 0).float().mean()) - 0.36) < 0.01


def test_torch_rng_option_reproduces_peft_draws():
    ts = _tensors()
    dp.set_options(rng="torch")
    for fn, args in ((("random_pruning"), (ts[0], 0.3, True)), ("dare_linear", (ts, W, 0.3)),
                     ("dare_ties", (ts, W, 0.3)), ("dare_ties", (ts, W, 0.6, "frequency"))):
        torch.manual_seed(3)
        ours = getattr(dp, fn)(*args)
        torch.manual_seed(3)
        theirs = getattr(mu, fn)(*args)
        assert torch.equal(ours, theirs), fn


def test_peft_edge_cases_kept():
    x = _tensors(1)[0]
    with pytest.warns(UserWarning, match="no pruning"):
        assert dp.prune(x, 1.0, "random") is x
    with pytest.raises(ValueError, match=">= 0"):
        dp.prune(x, -0.1, "magnitude")
    with pytest.raises(ValueError, match="Unknown method"):
        dp.prune(x, 0.5, "gaussian")
    # PEFT's defect, reproduced by default: density 0 with rescale is 0/0 = NaN
    assert bool(mu.random_pruning(x, 0.0, True).isnan().all())
    assert bool(dp.random_pruning(x, 0.0, True).isnan().all())
    assert bool(dp.dare_ties(_tensors(), W, 0.0).isnan().all())
    assert bool(mu.dare_ties(_tensors(), W, 0.0).isnan().all())
    dp.set_options(zero_density="zeros")
    assert torch.equal(dp.random_pruning(x, 0.0, True), torch.zeros_like(x))
    assert torch.equal(dp.dare_linear(_tensors(), W, 0.0), torch.zeros_like(x))
    with pytest.raises(ValueError):
        dp.set_options(rng="philox")


def test_autograd_inputs_go_to_peft():
    ts = [t.requires_grad_() for t in _tensors()]
    out = dp.ties(ts, W, 0.3)
    assert out.grad_fn is not None and torch.equal(out, mu.ties(ts, W, 0.3))
    with torch.no_grad():
        assert dp.ties(ts, W, 0.3).grad_fn is None



def _outcome(fn, *args):
    """The result of ``fn(*args)`` after seeding torch, or the type of the error it raises."""
    torch.manual_seed(5)
    try:
        return fn(*args)
    except Exception as exc:  # the type is what is compared
        return type(exc)


MERGES = {"task_arithmetic": (), "magnitude_prune": (0.5,), "ties": (0.5,), "dare_linear": (0.5,),
          "dare_ties": (0.5,)}


@pytest.mark.parametrize("case", ["list", "float64", "0-dim", "1x3", "3x1x1x1", "wrong-count", "nan-density",
                                  "tensor-density"])
@pytest.mark.parametrize("fn", list(MERGES))
def test_merge_inputs_peft_refuses_or_treats_otherwise_go_to_peft(fn, case):
    """Weights PEFT refuses (a list) stay refused; weights it broadcasts (0-dim, [1, n]) or that
    make its result float64 get its result; a NaN density gets its error."""
    ts, density = _tensors(), MERGES[fn]
    weights = {"list": W.tolist(), "float64": W.double(), "0-dim": torch.tensor(0.5), "1x3": W.reshape(1, 3),
               "3x1x1x1": W.reshape(3, 1, 1, 1), "wrong-count": W[:2]}.get(case, W)
    if density and case == "nan-density":
        density = (float("nan"),)
    elif density and case == "tensor-density":
        density = (torch.tensor(0.5),)
    theirs, ours = _outcome(getattr(mu, fn), ts, weights, *density), _outcome(getattr(dp, fn), ts, weights, *density)
    if isinstance(theirs, torch.Tensor):
        assert isinstance(ours, torch.Tensor) and ours.dtype == theirs.dtype
        assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-9), (fn, case)
    else:
        assert ours is theirs, (fn, case, ours, theirs)


def test_float64_weights_are_peft_promotion_not_an_error():
    """LoRA builds its weights with torch.tensor(list): float64 under a float64 default dtype,
    while the (fp32) adapters stay fp32."""
    def merged():
        model = _lora_model()
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            model.add_weighted_adapter(["a", "b"], [0.7, 0.5], "m", combination_type="ties", density=0.4)
        finally:
            torch.set_default_dtype(previous)
        return {n: p.detach().clone() for n, p in model.named_parameters() if ".m." in n}

    plain = merged()
    dp.install()
    fast = merged()
    assert plain.keys() == fast.keys() and plain
    for n in plain:
        assert plain[n].dtype == torch.float32 and torch.equal(plain[n], fast[n]), n


# ---------------------------------------------------------------- LoRA add_weighted_adapter

class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin1 = torch.nn.Linear(64, 64)
        self.lin2 = torch.nn.Linear(64, 48)

    def forward(self, x):
        return self.lin2(torch.relu(self.lin1(x)))


def _lora_model():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = dict(target_modules=["lin1", "lin2"], init_lora_weights=False)
    model = get_peft_model(_Tiny(), LoraConfig(r=8, lora_alpha=16, **cfg), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=8, lora_alpha=8, **cfg))
    return model


def _weighted(combination_type, seed=11, **kw):
    model = _lora_model()
    torch.manual_seed(seed)
    model.add_weighted_adapter(["a", "b"], [0.7, 0.5], "m", combination_type=combination_type, **kw)
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".m." in n or n.endswith(".m")}


@pytest.mark.parametrize("combination_type,kw", [
    ("ties_svd", {"density": 0.3, "svd_rank": 8}), ("ties", {"density": 0.4}),
    ("magnitude_prune_svd", {"density": 0.5, "svd_rank": 8}), ("svd", {"svd_rank": 8}),
])
def test_add_weighted_adapter_same_with_install(combination_type, kw):
    plain = _weighted(combination_type, **kw)
    dp.install()
    fast = _weighted(combination_type, **kw)
    assert plain.keys() == fast.keys() and plain
    for n in plain:
        assert torch.allclose(plain[n], fast[n], rtol=1e-5, atol=1e-6), n


def _delta_w(params, layer):
    a = params[f"base_model.model.{layer}.lora_A.m.weight"]
    b = params[f"base_model.model.{layer}.lora_B.m.weight"]
    return b @ a


def test_add_weighted_adapter_dare_ties_svd():
    kw = dict(density=0.4, svd_rank=48)  # full rank: the SVD keeps the whole merged ΔW
    plain = _weighted("dare_ties_svd", **kw)
    dp.install(rng="torch")  # PEFT's own draws: the same adapter
    same = _weighted("dare_ties_svd", **kw)
    for n in plain:
        assert torch.allclose(plain[n], same[n], rtol=1e-4, atol=1e-6), n
    dp.set_options(rng="hash")  # our RNG: the same adapter in distribution
    for layer in ("lin1", "lin2"):
        d_plain, d_fast = _delta_w(plain, layer), _delta_w(_weighted("dare_ties_svd", **kw), layer)
        z_plain, z_fast = float((d_plain.abs() < 1e-7).float().mean()), float((d_fast.abs() < 1e-7).float().mean())
        assert abs(z_plain - z_fast) < 0.05
        assert abs(float(d_fast.norm() / d_plain.norm()) - 1) < 0.1


def _peft_snapshot():
    import peft.tuners.lora.model as lm

    return ([(n, id(getattr(mu, n))) for n in dp.FUNCTIONS] + [(n, id(getattr(lm, n))) for n in dp.LORA_NAMES],
            sorted(vars(mu)), sorted(vars(lm)))


def test_install_uninstall_restore_peft_exactly():
    import peft.tuners.lora.model as lm

    before = _peft_snapshot()
    dp.install()
    dp.install()  # idempotent
    assert dp.is_installed()
    assert mu.ties is dp.ties and mu.prune is dp.prune
    assert lm.ties.__module__ == dp.__name__ and lm.ties is not mu.ties  # LoRA's detaching variants
    dp.uninstall()
    dp.uninstall()
    assert _peft_snapshot() == before
