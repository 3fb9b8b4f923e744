"""pat.fold: the folded dense model equals the hard-masked PAT model."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402
from test_pat_model import FAMILIES, VOCAB, ids, tiny  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from dppa_kernels import pat  # noqa: E402

D = 64


def trained_like(model, kept: int, seed: int = 0, rank: int = 6, identity_loss: str = "code"):
    """Prepare and give every PAT parameter non-trivial values: L0, L1 ≠ 0, s ≠ 1, and a W_M with
    exactly ``kept`` positive entries at random positions (no exact zeros)."""
    pat.prepare(model, keep=kept, rank=rank, total_steps=90, identity_loss=identity_loss,
                backend="torch")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, h in pat.hsms(model):
            h.l0.copy_(torch.randn(h.l0.shape, generator=g) / D ** 0.5)
            h.l1.copy_(torch.randn(h.l1.shape, generator=g) * 0.3)
            if h.scale is not None:
                h.scale.copy_(torch.rand(D, generator=g) + 0.5)
            if h.v is not None:
                h.v.copy_(torch.randn(h.v.shape, generator=g))
        w = pat.get_mask(model).weight
        mag = torch.rand(D, generator=g) * 0.5 + 0.05
        order = torch.randperm(D, generator=g)
        sign = torch.full((D,), -1.0)
        sign[order[:kept]] = 1.0
        w.copy_(sign * mag)
    pat.set_step(model, 40)
    return model


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def expected_params(cfg, d):
    """Parameter count of a Llama-family model with hidden size d (head_dim kept), untied."""
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    h, kv, inter, L, V = (cfg.num_attention_heads, cfg.num_key_value_heads,
                              cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size)
    qkv_bias = (h + 2 * kv) * hd if cfg.model_type == "qwen2" or getattr(
        cfg, "attention_bias", False) else 0
    o_bias = d if getattr(cfg, "attention_bias", False) else 0
    mlp_bias = (2 * inter + d) if getattr(cfg, "mlp_bias", False) else 0
    per_layer = d * (h + 2 * kv) * hd + h * hd * d + 3 * d * inter + 2 * d
    return V * d + L * (per_layer + qkv_bias + o_bias + mlp_bias) + d + V * d


@pytest.mark.parametrize("family,kept,extra", [
    ("llama", 48, dict(attention_bias=True, mlp_bias=True)),   # biases up- and downstream
    ("mistral", 41, {}),                                         # d' not a multiple of anything
    ("qwen2", 44, dict(tie_word_embeddings=True)),               # q/k/v biases, tied embeddings
])
def test_fold_equals_masked_model_and_reloads(family, kept, extra, tmp_path):
    model = trained_like(tiny(family, **extra), kept)
    pat.binarize(model)
    x = ids(shape=(3, 13))
    with torch.no_grad():
        masked = model(x).logits
    before = {k: v.clone() for k, v in model.state_dict().items() if torch.is_tensor(v)}
    folded = pat.fold(model)
    assert type(folded) is type(model) and folded.config.hidden_size == kept
    with torch.no_grad():
        got = folded(x).logits
    assert rel_err(got, masked) <= 1e-5
    # the trained model is untouched and still computes the masked function
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(model(x).logits, masked)
    # physically smaller: every d-sided matrix lost (d − d')/d of its size
    assert n_params(folded) == expected_params(folded.config, kept)
    orig = expected_params(tiny(family, **extra).config, D)
    if not tiny(family, **extra).config.tie_word_embeddings:
        assert n_params(tiny(family, **extra)) == orig
    assert abs(1 - n_params(folded) / orig - (D - kept) / D) < 0.01
    assert not any("pat_" in k for k in folded.state_dict())
    # plain transformers reloads it and computes the same logits
    folded.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(reloaded) is type(model)
    assert reloaded.lm_head.weight.data_ptr() != reloaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, got, rtol=0, atol=0)


def test_fold_merges_lora_exactly():
    peft = pytest.importorskip("peft")
    base = tiny("llama")
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"])
    pm = peft.get_peft_model(base, lora)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    trained_like(pm, 40)
    pat.binarize(pm)
    x = ids()
    with torch.no_grad():
        masked = pm(input_ids=x).logits
    folded = pat.fold(pm, verify_ids=x)
    assert type(folded).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        assert rel_err(folded(x).logits, masked) <= 1e-5


def test_fold_paper_variant_and_multiple_of():
    model = trained_like(tiny("mistral"), 37, identity_loss="paper")
    pat.binarize(model, multiple_of=8)  # 37 → 40 (nearest multiple of 8)
    assert pat.num_active(model) == 40
    x = ids()
    with torch.no_grad():
        masked = model(x).logits
    folded = pat.fold(model)
    assert folded.config.hidden_size == 40
    with torch.no_grad():
        assert rel_err(folded(x).logits, masked) <= 1e-5


def test_fold_eps_and_dtype():
    model = trained_like(tiny("qwen2"), 32)
    pat.binarize(model)
    eps = model.config.rms_norm_eps
    folded = pat.fold(model, dtype=torch.bfloat16)
    assert folded.dtype == torch.bfloat16
    assert folded.config.rms_norm_eps == pytest.approx(eps * 2)
    assert folded.config.head_dim == 16 and folded.config.num_attention_heads == 4
    plain = pat.fold(model, exact_eps=False)
    assert plain.config.rms_norm_eps == eps
    exact = pat.fold(model)
    x = ids()
    with torch.no_grad():
        masked = model(x).logits
        # tiny random models have mean(x²) ≈ 4e-4, so ε = 1e-6 alone costs ≈ 1e-3 relative
        err_plain, err_exact = rel_err(plain(x).logits, masked), rel_err(exact(x).logits, masked)
        assert err_exact <= 1e-5 and 10 * err_exact < err_plain <= 1e-2
        assert rel_err(folded(x).logits.float(), masked) <= 3e-2  # bf16 weights


def test_fold_bad_input():
    model = trained_like(tiny("llama"), 48)
    with pytest.raises(ValueError, match="call pat.binarize"):
        pat.fold(model)
    with pytest.raises(ValueError, match="call pat.prepare"):
        pat.fold(tiny("llama"))
    pat.binarize(model)
    with pytest.raises(TypeError, match="dtype must be"):
        pat.fold(model, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="differs from the masked model"):
        pat.fold(model, exact_eps=False, verify_ids=ids(), verify_rtol=1e-7)
    # transformers' LlamaConfig demands hidden_size % num_attention_heads == 0: the multiple_of
    # override is not checked against it, fold says what to do
    odd = trained_like(tiny("llama"), 45)
    pat.binarize(odd, multiple_of=3)
    with pytest.raises(ValueError, match=r"hidden_size d'=45.*not a multiple of the number of "
                                         r"attention heads.*multiple_of"):
        pat.fold(odd)


def test_families_cover_the_spec():
    assert set(FAMILIES) == {"llama", "mistral", "qwen2"} and VOCAB < 300
