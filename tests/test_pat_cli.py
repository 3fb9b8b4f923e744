"""``dppa pat train`` end to end on a tiny local model, and its refusals before any training."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import json  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from dppa_kernels.cli import app  # noqa: E402

CHARS = [chr(i) for i in range(32, 127)] + ["\n"]


def char_tokenizer():
    """A character-level fast tokenizer built locally (no download)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + CHARS)}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def model_dir(path, family="llama", **kw):
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = char_tokenizer()
    cfg = AutoConfig.for_model(family, vocab_size=len(tok), hidden_size=64, intermediate_size=96,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                               eos_token_id=2, **kw)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def data_file(path, n=96, drop_field_at=None):
    g = torch.Generator().manual_seed(0)
    with open(path, "w") as f:
        for i in range(n):
            a, b = (int(x) for x in torch.randint(0, 50, (2,), generator=g))
            row = {"prompt": f"{a}+{b}", "response": str(a + b)}
            if i == drop_field_at:
                del row["response"]
            f.write(json.dumps(row) + "\n")
    return str(path)


TEMPLATE = "{prompt}="


def run(*args):
    return CliRunner().invoke(app, ["pat", "train", *map(str, args)])


def test_pat_train_end_to_end(tmp_path):
    from transformers import AutoModelForCausalLM

    model = model_dir(tmp_path / "base")
    data = data_file(tmp_path / "d.jsonl")
    out = tmp_path / "out"
    res = run("--model", model, "--data", data, "--keep", 0.75, "--out", out, "--max-steps", 12,
              "--lr", 3e-3, "--lora-rank", 4, "--lora-alpha", 8, "--batch-size", 8,
              "--grad-accum", 1, "--template", TEMPLATE, "--no-progress",
              "--gradient-checkpointing")
    assert res.exit_code == 0, res.output
    assert "done: d=64 -> d'=" in res.output
    rep = json.loads((out / "pat_report.json").read_text())
    assert rep["kept_width"] % 4 == 0 and 0 < rep["kept_width"] < 64  # Llama: heads divide d'
    assert rep["params_after"] < rep["params_before"]
    assert rep["fold_rel_err"] <= 1e-5 and rep["reload_rel_err"] <= 1e-5
    assert rep["steps"] == 12 and rep["losses"]["closing_gap"] is not None
    assert rep["binarize"]["width"] == rep["kept_width"]
    assert {"train_s", "binarize_fold_verify_s", "total_s"} <= set(rep["timings"])
    assert (out / "pat_training.png").stat().st_size > 1000
    # a plain transformers model, smaller, no PAT code or tensors in it
    m = AutoModelForCausalLM.from_pretrained(out)
    assert m.config.hidden_size == rep["kept_width"] and type(m).__name__ == "LlamaForCausalLM"
    assert not any("pat_" in k or "lora" in k for k in m.state_dict())
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]  # no leftovers


def test_pat_train_keep_one_is_dense_lora(tmp_path):
    from transformers import AutoModelForCausalLM

    model = model_dir(tmp_path / "base", family="qwen2")
    out = tmp_path / "out"
    res = run("--model", model, "--data", data_file(tmp_path / "d.jsonl", n=40), "--keep", 1,
              "--out", out, "--max-steps", 3, "--lr", 3e-3, "--lora-rank", 2, "--template",
              TEMPLATE, "--no-progress")
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "pat_report.json").read_text())
    assert rep["kept_width"] == 64 and rep["params_after"] == rep["params_before"]
    assert AutoModelForCausalLM.from_pretrained(out).config.hidden_size == 64


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return model_dir(tmp_path_factory.mktemp("base"))


@pytest.mark.parametrize("case,match", [
    ("missing_field", r"d.jsonl:4: missing field 'response'"),
    ("keep_zero", r"keep must be a fraction of the hidden size in \(0, 1\], got 0.0"),
    ("keep_big", r"keep must be a fraction of the hidden size in \(0, 1\], got 1.5"),
    ("gpt2", r"model_type 'gpt2', which PAT does not support; supported: llama, mistral, qwen2"),
    ("no_model", r"is not a folder with a config.json"),
    ("too_short", r"n0 must be >= 2 .* from total_steps=3"),
    ("cuda", r"device 'cuda' was requested but torch sees no CUDA device"),
    ("mask_schedule", r"mask_schedule must be one of"),
])
def test_pat_train_refuses_bad_input_before_training(tmp_path, base, case, match):
    from transformers import GPT2Config

    data = data_file(tmp_path / "d.jsonl", drop_field_at=3 if case == "missing_field" else None)
    model, keep, extra = base, 0.75, []
    if case == "keep_zero":
        keep = 0
    elif case == "keep_big":
        keep = 1.5
    elif case == "gpt2":
        model = str(tmp_path / "gpt2")
        GPT2Config(n_embd=32, n_layer=1, n_head=2).save_pretrained(model)
    elif case == "no_model":
        model = str(tmp_path / "nothing")
    elif case == "too_short":
        extra = ["--max-steps", 3]
    elif case == "cuda":
        if torch.cuda.is_available():
            # the case tests the refusal of --device cuda where there is no GPU; on a GPU machine
            # the same command would start training, which is not what this case checks
            pytest.skip("a CUDA device is present: the refusal needs a machine without one")
        extra = ["--device", "cuda"]
    elif case == "mask_schedule":
        extra = ["--mask-schedule", "frozen"]
    out = tmp_path / "out"
    res = run("--model", model, "--data", data, "--keep", keep, "--out", out, "--template",
              TEMPLATE, "--no-progress", *extra)
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    import re

    assert re.search(match, lines[0]), lines[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_demo_writes_a_model_and_data_train_accepts(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dppa_kernels import pat
    from dppa_kernels.pat.demo import make_demo

    paths = make_demo(tmp_path / "demo", pretrain_steps=2, n_train=8, n_test=2, echo=lambda s: None)
    rows = pat.load_jsonl(paths["train"])
    assert len(rows) == 8 * 5 and len(pat.load_jsonl(paths["test"])) == 2 * 5
    assert not {r["prompt"] for r in rows} & {r["prompt"] for r in pat.load_jsonl(paths["test"])}
    tok = AutoTokenizer.from_pretrained(paths["model"])
    assert AutoModelForCausalLM.from_pretrained(paths["model"]).config.model_type == "llama"
    assert tok.decode(tok(rows[0]["prompt"], add_special_tokens=False)["input_ids"]) == \
        rows[0]["prompt"]
    with pytest.raises(ValueError, match="is not empty"):
        make_demo(tmp_path / "demo", pretrain_steps=2)
