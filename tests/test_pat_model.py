"""pat.prepare on tiny random Llama / Mistral / Qwen2 models: identity at step 0, training,
PEFT LoRA alongside, gradient checkpointing, the Trainer callback and bad input."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from dppa_kernels import pat  # noqa: E402

FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}
VOCAB = 97


def tiny(family: str = "llama", seed: int = 0, **overrides):
    """A random 2-layer model, d = 64, 4 heads × 16 (2 KV heads), fp32, eval mode."""
    cfg_cls, model_cls = FAMILIES[family]
    kw = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    kw.update(overrides)
    torch.manual_seed(seed)
    return model_cls(cfg_cls(**kw)).float().eval()


def toy_batch(n: int = 16, length: int = 20, gen=None):
    """Arithmetic sequences mod V: the next token is predictable from the previous one."""
    start = torch.randint(0, VOCAB, (n, 1), generator=gen)
    return (start + 5 * torch.arange(length)) % VOCAB


def ids(seed=1, shape=(2, 11)):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_step0_logits_equal_original(family):
    model = tiny(family)
    x = ids()
    with torch.no_grad():
        before = model(x).logits
    params = {k: v.clone() for k, v in model.state_dict().items()}
    pat.prepare(model, keep=48, backend="torch")
    with torch.no_grad():
        after = model(x).logits
    assert torch.equal(before, after)
    assert len(pat.hsms(model)) == 2 * 2 + 1
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items() if k in params)
    assert pat.get_mask(model).target == 48
    assert all(h.rank == round(0.05 * 64) for _, h in pat.hsms(model))  # rank "auto"


def test_triton_backend_in_the_model_matches_torch():
    """One forward/backward through the prepared model with the fused op vs the reference."""
    if not pat.triton_status()[0]:
        pytest.skip(f"Triton HSM kernels unavailable: {pat.triton_status()[1]}")
    models = [tiny("llama"), tiny("llama")]
    x = ids(shape=(2, 9))
    grads = []
    for model, backend in zip(models, ("triton", "torch")):
        torch.manual_seed(3)  # same L0 init in both models
        pat.prepare(model, keep=40, rank=4, total_steps=30, backend=backend)
        with torch.no_grad():
            for _, h in pat.hsms(model):
                h.l1.normal_(0, 0.2)
                h.scale.uniform_(0.5, 1.5)
        pat.set_step(model, 4)
        out = model(x, labels=x)
        out.loss.backward()
        grads.append((out.logits.detach(), [p.grad.clone() for p in pat.pat_parameters(model)]))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _train(model, steps, lr=3e-3, extra=True, gen_seed=0):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                            weight_decay=0.0)
    gen = torch.Generator().manual_seed(gen_seed)
    history = []
    model.train()
    for n in range(1, steps + 1):
        pat.set_step(model, n)
        x = toy_batch(gen=gen)
        ce = model(x, labels=x).loss
        loss = ce + (pat.sparsity_loss(model) + pat.identity_loss(model) if extra else 0.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append((ce.item(), pat.num_active(model)))
    model.eval()
    return history


def test_training_lowers_loss_and_moves_mask_to_target():
    """60 steps, n0 = 60 (freeze at 48), one lr for everything as in the recipe."""
    model = tiny("llama")
    pat.prepare(model, keep=48, schedule=pat.MaskSchedule(n0=60), backend="torch")
    hist = _train(model, 60)
    ce = [h[0] for h in hist]
    assert sum(ce[-5:]) / 5 < 0.5 * sum(ce[:5]) / 5
    # W_M starts at 0 (no channel > 0); the count loss drives the kept count to ≈ 48 of 64
    active = pat.num_active(model)
    assert abs(active - 48) <= 64 // 8, hist
    assert len({h[1] for h in hist}) > 2  # the mask really moved
    rep = pat.binarize(model)  # the count, or the nearest width LlamaConfig (4 heads) accepts
    assert rep["count"] == active and pat.num_active(model) == rep["width"]
    assert rep["width"] % 4 == 0 and abs(rep["width"] - active) <= 2


def test_identity_loss_covers_every_hsm():
    model = tiny("mistral")
    pat.prepare(model, keep=40, rank=6, backend="torch")
    per = [h.identity_loss() for _, h in pat.hsms(model)]
    total = pat.identity_loss(model)
    assert torch.isfinite(total) and total.item() == pytest.approx(sum(p.item() for p in per))
    # Kaiming L0 with L1 = 0: L0 L0ᵀ ≈ I/3, so each term is ≈ (2/3)²/r
    assert 0.2 / 6 < per[0].item() < 1.5 / 6
    total.backward()
    assert all(h.l0.grad is not None and h.l0.grad.abs().sum() > 0 for _, h in pat.hsms(model))
    official = pat.identity_loss(model, scope="official")
    assert official.item() == pytest.approx(per[0].item() + per[-2].item() + per[-1].item())
    with pytest.raises(ValueError, match="scope must be one of"):
        pat.identity_loss(model, scope="some")


def test_paper_identity_variant():
    model = tiny("qwen2")
    x = ids()
    with torch.no_grad():
        before = model(x).logits
    pat.prepare(model, keep=32, rank=4, identity_loss="paper", backend="torch")
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)  # v = 0: D = I
    h = pat.hsms(model)[0][1]
    assert h.scale is None and h.v is not None
    torch.testing.assert_close(h.l1.t() @ h.l1, torch.eye(4), atol=1e-5, rtol=0)
    loss = pat.identity_loss(model)
    assert torch.isfinite(loss)
    loss.backward()
    assert h.l0.grad.abs().sum() > 0


def test_peft_lora_alongside():
    peft = pytest.importorskip("peft")
    model = tiny("llama")
    lora = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    pm = peft.get_peft_model(model, lora)
    pat.prepare(pm, keep=40, total_steps=30, backend="torch")
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any("pat_hsm" in n for n in trainable)
    assert not any(n.endswith("q_proj.base_layer.weight") for n in trainable)
    pat.set_step(pm, 2)
    x = ids()
    out = pm(input_ids=x, labels=x)
    (out.loss + pat.sparsity_loss(pm) + pat.identity_loss(pm)).backward()
    assert pat.get_mask(pm).weight.grad.abs().sum() > 0
    lora_b = [p for n, p in pm.named_parameters() if "lora_B" in n]
    assert all(p.grad is not None for p in lora_b)
    # prepare first, PEFT second: PEFT freezes PAT parameters; mark_trainable restores them
    model2 = pat.prepare(tiny("llama"), keep=40, backend="torch")
    pm2 = peft.get_peft_model(model2, lora)
    assert not pat.get_mask(pm2).weight.requires_grad
    pat.mark_trainable(pm2)
    assert all(p.requires_grad for p in pat.pat_parameters(pm2))
    # LoRA on the embedding after prepare would bypass the embedding HSM: refused
    pm3 = peft.get_peft_model(pat.prepare(tiny("llama"), keep=40, backend="torch"),
                              peft.LoraConfig(r=2, target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="embed_tokens was replaced after pat.prepare"):
        pat.sparsity_loss(pm3)


def test_gradient_checkpointing_gives_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = tiny("llama")
        pat.prepare(model, keep=40, total_steps=30, backend="torch")
        if ckpt:
            model.gradient_checkpointing_enable()
        model.train()
        pat.set_step(model, 3)
        x = ids()
        model(x, labels=x).loss.backward()
        grads.append([p.grad.clone() for p in pat.pat_parameters(model)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_trainer_callback_sets_step_and_schedule(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny("llama")
    pat.prepare(model, keep=40, backend="torch")  # no total_steps: the callback supplies it
    seen = []

    class Recorder(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            seen.append((state.global_step, pat.get_mask(model).step))

    data = [{"input_ids": r, "labels": r} for r in toy_batch(n=48, length=12)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=1e-3, report_to=[], save_strategy="no",
        logging_strategy="no", use_cpu=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   callbacks=[pat.PATCallback(), Recorder()])
    trainer.train()
    mask = pat.get_mask(model)
    assert mask.schedule.total_steps == 6 and mask.step == 6
    assert seen == [(n, n + 1) for n in range(6)]  # the update about to be applied, 1-based


@pytest.mark.parametrize("keep", [0, -3, 64, 100, 1.0, 0.0])
def test_bad_keep(keep):
    with pytest.raises(ValueError, match="keep"):
        pat.prepare(tiny("llama"), keep=keep)


def test_bad_arguments_and_architecture():
    with pytest.raises(TypeError, match="keep must be an int"):
        pat.prepare(tiny("llama"), keep=True)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        pat.prepare("llama", keep=3)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="model_type 'gpt2'.*not supported.*llama, mistral, qwen2"):
        pat.prepare(gpt2, keep=16)
    with pytest.raises(ValueError, match=r"rank must be in \[1, hidden size 64\], got 65"):
        pat.prepare(tiny("llama"), keep=16, rank=65)
    with pytest.raises(TypeError, match="rank must be an int or 'auto'"):
        pat.prepare(tiny("llama"), keep=16, rank=2.5)
    with pytest.raises(ValueError, match="identity_loss must be one of"):
        pat.prepare(tiny("llama"), keep=16, identity_loss="ortho")
    with pytest.raises(ValueError, match="either schedule or total_steps"):
        pat.prepare(tiny("llama"), keep=16, schedule=pat.MaskSchedule(), total_steps=10)
    model = pat.prepare(tiny("llama"), keep=16)
    with pytest.raises(ValueError, match="already has PAT modules"):
        pat.prepare(model, keep=16)
    with pytest.raises(ValueError, match="schedule length is unknown"):
        pat.set_step(model, 1)
    with pytest.raises(ValueError, match="step must be a non-negative int"):
        pat.set_step(model, -1)
    with pytest.raises(ValueError, match="call pat.prepare"):
        pat.sparsity_loss(tiny("llama"))


def test_remove_restores_original_function():
    model = tiny("qwen2")
    x = ids()
    with torch.no_grad():
        before = model(x).logits
    pat.prepare(model, keep=40, total_steps=30, backend="torch")
    with torch.no_grad():
        for _, h in pat.hsms(model):
            h.l1.normal_()
    pat.remove(model)
    with torch.no_grad():
        assert torch.equal(model(x).logits, before)
    assert not any("pat_" in n for n, _ in model.named_parameters())
