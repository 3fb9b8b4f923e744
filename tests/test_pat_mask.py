"""Unified mask: schedule values, gate, count/polarisation losses, binarisation."""

import math

import pytest
import torch

from dppa_kernels.pat import MaskSchedule, UnifiedMask
from dppa_kernels.pat.mask import polarization, ste_step


@pytest.mark.parametrize("freeze", [0.8, None], ids=["code", "paper"])
def test_tau_table_of_the_spec(freeze):
    """τ for n0 = 10 000: 1.0, 4.0, 8.4, 13.3, 41.3 at n = 1, 1 k, 3.3 k (= n0/3), 5 k, 8 k
    (n_f = 8 000)."""
    sch = MaskSchedule(n0=10_000, freeze=freeze)
    got = [round(sch.tau(n), 1) for n in (1, 1000, 3333, 5000, 8000)]
    assert got == [1.0, 4.0, 8.4, 13.3, 41.3]


def test_n0_from_total_steps_and_beta():
    sch = MaskSchedule(total_steps=30_000)
    assert sch.length == 10_000
    assert sch.beta(0) == 0.5 and sch.beta(2_500) == 0.25
    assert sch.beta(5_000) == 0.0 and sch.beta(9_000) == 0.0
    assert MaskSchedule(total_steps=30, s0_fraction=0.5).length == 15


def test_freeze_holds_tau_and_detaches():
    sch = MaskSchedule(n0=100)  # n_f = 80
    assert sch.freeze_step == 80
    assert not sch.frozen(79) and sch.frozen(80) and sch.frozen(500)
    assert sch.tau(80) == sch.tau(95) == sch.tau(10_000)
    mask = UnifiedMask(6, 3, sch)
    mask.step = 79
    mask.gate().sum().backward()
    assert mask.weight.grad is not None and mask.weight.grad.abs().sum() > 0
    mask.weight.grad = None
    mask.step = 80
    assert not mask.gate().requires_grad
    assert not mask.sparsity_loss().requires_grad


def test_paper_variant_tail():
    sch = MaskSchedule(n0=100, freeze=None)
    assert sch.freeze_step is None and not sch.frozen(10**6)
    assert sch.tau(100) == pytest.approx(1e6) and sch.tau(5_000) == pytest.approx(1e6)
    assert 1.0 < sch.tau(99) < 1e6


def test_step0_gate_is_exactly_one_without_schedule_length():
    mask = UnifiedMask(16, 8)  # no total_steps: step 0 still works
    assert torch.equal(mask.gate(), torch.ones(16))
    mask.step = 1
    with pytest.raises(ValueError, match="schedule length is unknown"):
        mask.gate()


def test_clamp_floor_has_zero_gradient():
    mask = UnifiedMask(4, 2, MaskSchedule(n0=10))
    mask.step = 9  # β = 0, τ = τ(8) held (freeze at 8)
    with torch.no_grad():
        mask.weight.copy_(torch.tensor([-100.0, -0.01, 0.01, 100.0]))
    m = mask.gate()
    assert m[0] == pytest.approx(1 / (1 + math.exp(10)), rel=1e-6)  # floor 4.5e-5
    mask.step = 5  # not frozen: gradients flow except where clamped
    mask.gate().sum().backward()
    g = mask.weight.grad
    assert g[0] == 0 and g[1] > 0 and g[2] > 0


def test_count_loss_code_and_paper():
    w = torch.tensor([0.0, 0.3, -0.2, -0.1, 0.5, 1.0])  # STE counts W ≥ 0: 4 kept
    mask = UnifiedMask(6, 2)
    with torch.no_grad():
        mask.weight.copy_(w)
    loss = mask.count_loss()
    assert loss.item() == pytest.approx(10 * abs(4 - 2) / 2)
    loss.backward()
    assert torch.allclose(mask.weight.grad, torch.full((6,), 10 / 2))  # identity backward
    paper = UnifiedMask(6, 5, count_loss="paper")
    with torch.no_grad():
        paper.weight.copy_(w)
    loss = paper.count_loss()
    assert loss.item() == pytest.approx(1.0)
    loss.backward()
    assert torch.allclose(paper.weight.grad, torch.full((6,), -1.0))


def test_ste_and_polarization():
    w = torch.tensor([0.0, -1e-3, 2.0], requires_grad=True)
    s = ste_step(w)
    assert s.tolist() == [1.0, 0.0, 1.0]
    s.sum().backward()
    assert w.grad.tolist() == [1.0, 1.0, 1.0]
    # empty selections count 0 (the code logs NaN at step 0)
    assert polarization(torch.zeros(5)).item() == pytest.approx(0.25)
    assert polarization(torch.full((3,), 0.5)).item() == 0.0
    w = torch.tensor([0.7, 0.3, -0.5, -0.9])
    want = ((0.2 ** 2 + 0.2 ** 2) / 2) + ((0.0 + 0.4 ** 2) / 2)
    assert polarization(w).item() == pytest.approx(want)
    mask = UnifiedMask(4, 2, polarization=False)
    with torch.no_grad():
        mask.weight.copy_(w)
    assert mask.sparsity_loss().item() == pytest.approx(mask.count_loss().item())
    mask.use_polarization = True
    assert mask.sparsity_loss().item() == pytest.approx(mask.count_loss().item() + want)


def test_binarize_hard_gate_and_state_roundtrip():
    mask = UnifiedMask(8, 4, MaskSchedule(n0=10))
    with torch.no_grad():
        mask.weight.copy_(torch.tensor([0.5, -0.5, 0.2, -0.1, 0.3, -0.4, -0.2, 0.1]))
    mask.step = 7
    mask.binarize()
    assert mask.gate().tolist() == [1, 0, 1, 0, 1, 0, 0, 1]
    assert mask.keep_indices().tolist() == [0, 2, 4, 7] and mask.num_active() == 4
    other = UnifiedMask(8, 4, MaskSchedule(n0=10))
    other.load_state_dict(mask.state_dict())
    assert other.step == 7 and other.binarized and other.keep_indices().tolist() == [0, 2, 4, 7]
    mask.unbinarize()
    assert not mask.binarized and 0 < float(mask.gate().detach().min()) < 1


def test_binarize_multiple_of_keeps_largest():
    mask = UnifiedMask(32, 16)
    with torch.no_grad():
        mask.weight.copy_(torch.linspace(-1, 1, 32) + 1 / 64)  # 16 positive, no zeros
        mask.weight[3] = 5.0  # a strongly kept channel among the negatives' positions
    mask.binarize(multiple_of=8)  # 17 positive → 16
    keep = mask.keep_indices()
    assert keep.numel() == 16 and 3 in keep.tolist()
    assert bool((mask.weight[keep].min() >= mask.weight[mask.gate() == 0].max()))


@pytest.mark.parametrize("w,match", [
    (torch.tensor([0.5, 0.0, -0.5, 0.2]), "exact zeros"),
    (torch.full((4,), 0.3), "keeps 4 of 4"),
    (torch.full((4,), -0.3), "keeps 0 of 4"),
])
def test_binarize_errors(w, match):
    mask = UnifiedMask(4, 2)
    with torch.no_grad():
        mask.weight.copy_(w)
    with pytest.raises(ValueError, match=match):
        mask.binarize()


@pytest.mark.parametrize("kwargs,match", [
    (dict(total_steps=0), "total_steps must be a positive int"),
    (dict(n0=2.5), "n0 must be a positive int"),
    (dict(s0_fraction=0.0), "s0_fraction must be in"),
    (dict(freeze=1.5), "freeze must be in"),
    (dict(beta0=-0.1), "beta0 must be in"),
    (dict(eps=0.0), "eps must be > 0"),
    (dict(clamp_min=1.0), "clamp_min must be < 0"),
])
def test_schedule_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MaskSchedule(**kwargs)


def test_schedule_too_short_and_bad_mask_args():
    with pytest.raises(ValueError, match="n0 must be >= 2"):
        MaskSchedule(total_steps=2).length
    with pytest.raises(ValueError, match="count_loss must be one of"):
        UnifiedMask(4, 2, count_loss="l2")
    mask = UnifiedMask(4, 2)
    with torch.no_grad():
        mask.weight.copy_(torch.tensor([0.5, -0.5, 0.2, -0.1]))
    with pytest.raises(ValueError, match="multiple_of must be < hidden size"):
        mask.binarize(multiple_of=4)
    with pytest.raises(ValueError, match="not binarised"):
        mask.keep_indices()
