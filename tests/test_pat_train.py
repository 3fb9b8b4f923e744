"""PATTrainer (losses, schedule, logging, gradient accumulation, LoRA, gradient checkpointing),
the response-only collator and the JSONL loader."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from test_pat_model import tiny, toy_batch  # noqa: E402

from dppa_kernels import pat  # noqa: E402
from dppa_kernels.pat.trainer import LOG_KEYS  # noqa: E402

transformers.logging.set_verbosity_error()


def pairs(n=64, length=12, split=5, seed=0):
    rows = toy_batch(n=n, length=length, gen=torch.Generator().manual_seed(seed))
    return [{"prompt_ids": r[:split].tolist(), "response_ids": r[split:].tolist()} for r in rows]


def args_for(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8,
                learning_rate=3e-3, report_to=[], save_strategy="no", logging_steps=1,
                use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=3)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def test_collator_masks_prompt_and_padding():
    col = pat.ResponseOnlyCollator(pad_token_id=0, pad_to_multiple_of=4)
    b = col([{"prompt_ids": [5, 6, 7], "response_ids": [8, 9]},
             {"prompt_ids": [5], "response_ids": [3, 4, 2]},
             {"input_ids": [1, 2], "labels": [-100, 2]}])
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0], [5, 3, 4, 2, 0, 0, 0, 0],
                                       [1, 2, 0, 0, 0, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, -100, -100, 8, 9, -100, -100, -100],
                                    [-100, 3, 4, 2, -100, -100, -100, -100],
                                    [-100, 2, -100, -100, -100, -100, -100, -100]]
    assert b["attention_mask"].sum(1).tolist() == [5, 4, 2]
    with pytest.raises(ValueError, match="pad_token_id must be a non-negative int"):
        pat.ResponseOnlyCollator(-1)


def test_collator_loss_is_response_only():
    """The model's loss on a collated batch equals the CE over response tokens alone."""
    model = tiny("llama")
    b = pat.ResponseOnlyCollator(0)(pairs(n=3))
    with torch.no_grad():
        out = model(**b)
    logits, ids = out.logits[:, :-1], b["input_ids"][:, 1:]
    resp = b["labels"][:, 1:] != -100
    want = torch.nn.functional.cross_entropy(logits[resp], ids[resp])
    torch.testing.assert_close(out.loss, want)


def test_load_jsonl_and_tokenize(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n\n{"q": "c", "a": "d", "prompt": "e", '
                 '"response": "f"}\n')
    assert pat.load_jsonl(p) == [{"prompt": "a", "response": "b"},
                                 {"prompt": "e", "response": "f"}]
    bad = {
        '{"prompt": "a"}': r"d.jsonl:2: missing field 'response' \(fields: \['prompt'\]\)",
        '{"prompt": 3, "response": "x"}': "field 'prompt' must be a string, got 3",
        '{"prompt": "a", "response": ""}': "field 'response' is empty",
        '[1, 2]': "expected a JSON object",
        '{"prompt": "a", ': "not valid JSON",
    }
    for line, match in bad.items():
        p.write_text('{"prompt": "ok", "response": "ok"}\n' + line + "\n")
        with pytest.raises(ValueError, match=match):
            pat.load_jsonl(p)
    with pytest.raises(ValueError, match="does not exist"):
        pat.load_jsonl(tmp_path / "missing.jsonl")
    p.write_text("\n")
    with pytest.raises(ValueError, match="has no rows"):
        pat.load_jsonl(p)

    class CharTok:  # the two calls tokenize_pairs makes of a tokenizer
        eos_token_id = 1

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": ([2] if add_special_tokens else []) + [ord(c) for c in text]}

    feats = pat.tokenize_pairs([{"prompt": "ab", "response": "cd"},
                                {"prompt": "x" * 30, "response": "y"}], CharTok(),
                               template="Q:{prompt}\nA:", max_length=12)
    assert feats == [{"prompt_ids": [2] + [ord(c) for c in "Q:ab\nA:"],
                      "response_ids": [ord("c"), ord("d"), 1]}]
    with pytest.raises(ValueError, match="template must contain"):
        pat.tokenize_pairs([], CharTok(), template="no placeholder")


def test_trainer_adds_losses_logs_and_advances_schedule(tmp_path):
    model = tiny("llama")
    pm = pat.add_lora(model, rank=4, alpha=8, dropout=0.0)
    pat.prepare(pm, keep=48, backend="torch")  # no schedule length: the trainer supplies it
    tr = pat.PATTrainer(model=pm, args=args_for(tmp_path, max_steps=9), train_dataset=pairs(),
                        data_collator=pat.ResponseOnlyCollator(0))
    assert tr.args.remove_unused_columns is False  # the collator needs its own columns
    tr.train()
    mask = pat.get_mask(pm)
    assert mask.schedule.total_steps == 9 and mask.step == 9 and mask.schedule.length == 3
    logs = [r for r in tr.state.log_history if "loss" in r]
    assert len(logs) == 9 and all(k in r for k in LOG_KEYS for r in logs)
    for r in logs:  # the logged total is the task loss plus both PAT terms
        total = r["pat_task_loss"] + r["pat_sparsity_loss"] + r["pat_identity_loss"]
        assert r["loss"] == pytest.approx(total, rel=1e-3, abs=1e-3)
    assert logs[0]["pat_tau"] == pytest.approx(1.0) and logs[-1]["pat_tau"] > 1.0
    assert logs[0]["pat_sparsity_loss"] > 0 and all(0 <= r["pat_kept"] <= 64 for r in logs)
    # the mask proxy has its own parameter group (mask_lr="auto" = max(lr, 0.5 / n0))
    groups = [g for g in tr.optimizer.param_groups if any(p is mask.weight for p in g["params"])]
    assert len(groups) == 1 and len(groups[0]["params"]) == 1
    assert groups[0]["initial_lr"] == pytest.approx(max(3e-3, 0.5 / 3))


def _one_sgd_step(tmp_path, bs, ga, seed=0):
    torch.manual_seed(seed)
    model = tiny("llama")
    pat.prepare(model, keep=40, rank=4, total_steps=10, backend="torch")
    with torch.no_grad():
        for _, h in pat.hsms(model):
            h.l1.normal_(0, 0.1)
        pat.get_mask(model).weight.normal_(0, 0.05)
    args = args_for(tmp_path, max_steps=1, per_device_train_batch_size=bs,
                    gradient_accumulation_steps=ga, optim="sgd", lr_scheduler_type="constant",
                    learning_rate=0.5, max_grad_norm=0.0)
    pat.PATTrainer(model=model, args=args, train_dataset=pairs(n=8), mask_lr=None,
                   data_collator=pat.ResponseOnlyCollator(0)).train()
    return [p.detach().clone() for p in pat.pat_parameters(model)]


def test_pat_losses_count_once_per_step_under_accumulation(tmp_path):
    """One SGD step on 8 rows: batch 8 × 1 and batch 4 × 2 accumulated update alike."""
    a = _one_sgd_step(tmp_path, 8, 1)
    b = _one_sgd_step(tmp_path, 4, 2)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)


def test_trainer_with_lora_and_gradient_checkpointing(tmp_path):
    """Same losses with and without gradient checkpointing (LoRA on every linear layer)."""
    runs = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = tiny("qwen2")
        pm = pat.add_lora(model, rank=4, alpha=8, dropout=0.0)
        pat.prepare(pm, keep=40, backend="torch")
        args = args_for(tmp_path, max_steps=6, gradient_checkpointing=ckpt)
        tr = pat.PATTrainer(model=pm, args=args, train_dataset=pairs(),
                            data_collator=pat.ResponseOnlyCollator(0))
        tr.train()
        lora = sorted(n for n, p in pm.named_parameters() if p.requires_grad and "lora_" in n)
        assert len(lora) == 2 * 7 * 2  # A and B of q/k/v/o/gate/up/down in both layers
        runs.append([r["loss"] for r in tr.state.log_history if "loss" in r])
    assert runs[0] == pytest.approx(runs[1], rel=1e-4)


def test_trainer_refuses_unprepared_model_and_bad_mask_lr(tmp_path):
    with pytest.raises(ValueError, match="call pat.prepare"):
        pat.PATTrainer(model=tiny("llama"), args=args_for(tmp_path))
    model = pat.prepare(tiny("llama"), keep=40, backend="torch")
    with pytest.raises(ValueError, match="mask_lr must be"):
        pat.PATTrainer(model=model, args=args_for(tmp_path), mask_lr=-1.0)


def test_recipe_defaults_follow_the_spec():
    r = pat.RECIPE
    assert (r.lora_rank, r.lora_alpha, r.lora_dropout, r.learning_rate, r.max_grad_norm,
            r.lr_scheduler_type, r.warmup_steps, r.seed, r.max_length) == (
        20, 4.0, 0.05, 5e-5, 0.3, "cosine", 100, 42, 256)
    cfg = pat.lora_config()
    assert set(cfg.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                       "up_proj", "down_proj"}
    from dppa_kernels.pat.recipe import mask_learning_rate, warmup_steps

    assert mask_learning_rate(5e-5, 10_000) == pytest.approx(5e-5)  # the recipe is unchanged
    assert mask_learning_rate(5e-5, 100) == pytest.approx(5e-3)
    assert mask_learning_rate(5e-5, 100, None) == 5e-5
    assert warmup_steps(30_000) == 100 and warmup_steps(300) == 30
    assert json.dumps(r.__dict__)  # plain values (they go into the report)
