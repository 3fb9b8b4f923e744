"""pat.binarize() defaults always give a foldable model: a sweep over families, head counts and
the counts a trained mask can end at; the rank default rule; polarisation warnings."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import logging  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from test_pat_model import FAMILIES  # noqa: E402

from dppa_kernels import pat  # noqa: E402
from dppa_kernels.pat.widths import nearest_legal_width, width_error  # noqa: E402

D = 48
HEADS = [1, 2, 3, 4, 6, 8, 12]
COUNTS = [1, 5, 17, 23, 25, 31, 46, 47]


def small(family, heads, kv):
    cfg_cls, model_cls = FAMILIES[family]
    torch.manual_seed(heads)
    cfg = cfg_cls(vocab_size=50, hidden_size=D, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=32)
    return model_cls(cfg).float()


def set_count(model, count, seed):
    """Put W_M where a trained mask could end: ``count`` positive entries, random magnitudes."""
    g = torch.Generator().manual_seed(seed)
    sign = -torch.ones(D)
    sign[torch.randperm(D, generator=g)[:count]] = 1.0
    with torch.no_grad():
        pat.get_mask(model).weight.copy_(sign * (torch.rand(D, generator=g) * 0.5 + 0.01))


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("heads", HEADS)
def test_default_binarize_always_folds(family, heads):
    """prepare (defaults) -> train -> binarize() -> fold() never raises, for every count."""
    kv = 1 if heads % 2 else 2 if heads % 4 else heads // 2
    model = small(family, heads, kv)
    # backend="torch": the interpreted Triton op would only slow the sweep (its own tests cover it)
    pat.prepare(model, keep=0.75, total_steps=6, backend="torch")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, 50, (4, 9), generator=torch.Generator().manual_seed(0))
    for n in (1, 2):  # real training steps: the defaults see a trained model
        pat.set_step(model, n)
        loss = model(x, labels=x).loss + pat.sparsity_loss(model) + pat.identity_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    head_dim = model.model.layers[0].self_attn.head_dim
    for i, count in enumerate(COUNTS):
        set_count(model, count, seed=i)
        pat.get_mask(model).unbinarize()
        rep = pat.binarize(model)
        width = rep["width"]
        assert rep["count"] == count
        assert width_error(model.config, head_dim, width) is None
        # nearest accepted width: nothing accepted lies strictly closer to the count
        assert all(width_error(model.config, head_dim, w) is not None
                   for w in range(1, D) if abs(w - count) < abs(width - count))
        if family == "llama":  # transformers 5: hidden_size % num_attention_heads == 0
            assert width % heads == 0
        else:  # Mistral/Qwen2 accept any width: the mask's own count is kept
            assert width == count
        # the largest W_M are the ones kept
        w = pat.get_mask(model).weight.detach()
        kept = pat.get_mask(model).keep_indices()
        dropped = torch.ones(D, dtype=torch.bool)
        dropped[kept] = False
        assert kept.numel() == width
        assert dropped.sum() == 0 or w[kept].min() >= w[dropped].max()
        folded = pat.fold(model, verify_ids=x)  # raises if folded != masked
        assert folded.config.hidden_size == width


def test_no_foldable_width_is_refused_before_training():
    model = small("llama", D, D)  # head_dim 1: LlamaConfig accepts only multiples of 48
    with pytest.raises(ValueError, match="no folded hidden size in \\[1, 47\\] is accepted"):
        pat.prepare(model, keep=0.5)


def test_nearest_width_ties_go_to_target_then_larger():
    cfg = small("llama", 4, 2).config
    # count 46: 44 and 48 are not both legal (48 = d); widths < 48 only -> 44
    assert nearest_legal_width(cfg, 12, 46, D) == 44
    assert nearest_legal_width(cfg, 12, 42, D, prefer=40) == 40  # 40 and 44 tie: nearer target
    assert nearest_legal_width(cfg, 12, 42, D, prefer=47) == 44
    assert nearest_legal_width(cfg, 12, 42, D) == 44  # no target: the larger


def test_binarize_says_what_it_chose(caplog):
    model = small("llama", 4, 2)
    pat.prepare(model, keep=36, total_steps=30)
    set_count(model, 37, seed=3)
    pat.set_step(model, 30)
    with caplog.at_level(logging.WARNING, logger="dppa_kernels.pat"):
        rep = pat.binarize(model)
    assert rep["width"] == 36 and rep["count"] == 37 and "nearest accepted width" in rep["rule"]
    assert "keeps 37 channels" in caplog.text and "d'=36" in caplog.text
    # override: multiple_of is taken as given
    pat.get_mask(model).unbinarize()
    assert pat.binarize(model, multiple_of=5)["width"] == 35


def test_not_polarised_warning_has_the_numbers(caplog):
    model = small("qwen2", 4, 2)
    pat.prepare(model, keep=24, total_steps=300)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a short run: |W_M| < 0.1 everywhere
        pat.get_mask(model).weight.copy_((torch.rand(D, generator=g) - 0.5) * 0.1 + 1e-4)
    pat.set_step(model, 40)
    with caplog.at_level(logging.WARNING, logger="dppa_kernels.pat"):
        rep = pat.binarize(model)
    pol = rep["polarization"]
    assert pol["n_far"] > D // 2 and pol["max_gap"] > 0.3 and pol["median_abs_w"] < 0.05
    assert f"{pol['n_far']} of {D} soft gates" in caplog.text and "not polarised" in caplog.text
    # a polarised mask (|W_M| = 0.5 late in the schedule) gives no warning
    model2 = small("qwen2", 4, 2)
    pat.prepare(model2, keep=24, total_steps=300)
    set_count(model2, 24, seed=1)
    with torch.no_grad():
        w = pat.get_mask(model2).weight
        w.copy_(w.sign() * 0.5)
    pat.set_step(model2, 90)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dppa_kernels.pat"):
        assert pat.binarize(model2)["polarization"]["n_far"] == 0
    assert "not polarised" not in caplog.text


@pytest.mark.parametrize("d,rank", [(4096, 200), (5120, 200), (7168, 200), (2048, 102),
                                    (1024, 51), (64, 3), (8, 1)])
def test_rank_default_rule(d, rank):
    assert pat.resolve_rank("auto", d) == rank


def test_prepare_targets_a_foldable_width(caplog):
    """keep·d = 0.7·48 = 33.6: LlamaConfig (4 heads) accepts 32 and 36; 32 is nearer 33.6."""
    model = small("llama", 4, 2)
    with caplog.at_level(logging.INFO, logger="dppa_kernels.pat"):
        pat.prepare(model, keep=0.7, backend="torch")
    assert pat.get_mask(model).target == 32 and "target is d'=32" in caplog.text
    model = small("llama", 4, 2)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dppa_kernels.pat"):
        pat.prepare(model, keep=45, backend="torch")  # an explicit count is adjusted loudly
    assert pat.get_mask(model).target == 44 and "45 kept channels" in caplog.text
    for family in ("mistral", "qwen2"):  # any width is accepted: the target is kept
        assert pat.get_mask(pat.prepare(small(family, 4, 2), keep=45)).target == 45
