"""The lm-evaluation-harness evaluator, offline: local custom task YAMLs over local JSONL files, a
tiny model on the CPU, every socket connection refused. Its scores equal lm-eval's own
``simple_evaluate`` (multiple choice with few-shot examples, greedy generation), a uniform model
gives the exact expected accuracy, and ``dppa search --eval dppa_kernels.eval:lm_eval`` runs end to
end: the best score it reports is lm-eval's score of the model it writes."""

from __future__ import annotations

import json
import socket

import pytest
import torch

from dppa_kernels import eval as E
from dppa_kernels import tasks as T
from engine_util import cli, family, write_config

# lm-evaluation-harness is the optional extra 'dppa-kernels[eval]'; .ci/setup installs lm-eval==0.4.13,
# so in CI this module always runs (a machine without the extra has nothing here to test).
lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed")

TINY = T.ModelShape(hidden=32, layers=1, heads=2, kv_heads=2, intermediate=64, max_positions=64)

CHOICE_TASK = """task: dppa_choice
dataset_path: json
dataset_kwargs:
  data_files: {{train: {train}, test: {test}}}
  cache_dir: {cache}
training_split: train
test_split: test
fewshot_split: train
num_fewshot: 1
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""

GEN_TASK = """task: dppa_gen
dataset_path: json
dataset_kwargs:
  data_files: {{test: {test}}}
  cache_dir: {cache}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["<eos>"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """No network: the Hub libraries' offline switches, and any socket connection fails loudly."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def refuse(self, address, *args, **kwargs):
        raise OSError(f"network access in an offline test: {address!r}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Two local tasks (a datasets cache of their own, so nothing cached elsewhere is read)."""
    root = tmp_path_factory.mktemp("lm_eval")
    data = T.draw_splits("lookup", {"train": 6, "test": 12}, seed=1, size_range=(2, 3))
    choice = {}
    for split, exs in data.items():
        rows = []
        for i, ex in enumerate(exs):
            wrong = [c for c in "0123456789" if c != ex.answer][i % 9]
            label = i % 2
            rows.append({"prompt": ex.prompt, "choices": [wrong, ex.answer] if label else [ex.answer, wrong],
                         "label": label})
        choice[split] = _write_jsonl(root / f"choice_{split}.jsonl", rows)
    gen = _write_jsonl(root / "gen.jsonl", [{"prompt": ex.prompt, "answer": ex.answer} for ex in data["test"]])
    tasks = root / "tasks"
    tasks.mkdir()
    cache = root / "hf_datasets"
    (tasks / "dppa_choice.yaml").write_text(CHOICE_TASK.format(train=choice["train"], test=choice["test"], cache=cache))
    (tasks / "dppa_gen.yaml").write_text(GEN_TASK.format(test=gen, cache=cache))
    return tasks


@pytest.fixture(scope="module")
def trained():
    """A tiny model trained briefly on lookup, so that its scores are neither 0 nor 1."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread avoids OpenMP waits on a shared machine
    try:
        tok = T.char_tokenizer()
        data = T.draw_splits("lookup", {"train": 400}, seed=0, size_range=(2, 3))
        model = T.build_model(tok, TINY, seed=0)
        T.train_model(model, tok, data["train"], T.TrainConfig(steps=80, batch_size=32, lr=1e-2, warmup=5))
        yield model, tok
    finally:
        torch.set_num_threads(n)


def _simple_evaluate(model, tok, task_dir, task):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tok, batch_size=8), tasks=[task],
                          task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                          log_samples=False)
    return {k.split(",")[0]: v for k, v in out["results"][task].items() if isinstance(v, float)}


def test_scores_equal_lm_evals_own_simple_evaluate(trained, task_dir):
    model, tok = trained
    want = _simple_evaluate(model, tok, task_dir, "dppa_choice")
    for metric in ("acc", "acc_norm"):
        assert 0 < want[metric] < 1  # neither trivial value: a wrong set-up would change it
        got = E.lm_eval(model, tasks="dppa_choice", tokenizer=tok, include_path=task_dir, metric=metric)
        assert got == want[metric]
    want_gen = _simple_evaluate(model, tok, task_dir, "dppa_gen")["exact_match"]
    assert 0 < want_gen < 1
    assert E.lm_eval(model, tasks="dppa_gen", tokenizer=tok, include_path=task_dir) == want_gen
    both = E.lm_eval(model, tasks=["dppa_choice", "dppa_gen"], tokenizer=tok, include_path=task_dir)
    assert both == pytest.approx((want["acc"] + want_gen) / 2)  # each task's first metric, averaged


def test_uniform_model_exact_accuracy(task_dir):
    """All logits zero: every choice is equally likely and lm-eval picks the first, so acc is the
    share of label 0 (half the docs)."""
    tok = T.char_tokenizer()
    model = T.build_model(tok, TINY, seed=0)
    with torch.no_grad():
        model.model.norm.weight.zero_()
    assert E.lm_eval(model, tasks="dppa_choice", tokenizer=tok, include_path=task_dir, metric="acc") == 0.5
    with pytest.raises(ValueError, match="metric 'f1' is not among"):
        E.lm_eval(model, tasks="dppa_choice", tokenizer=tok, include_path=task_dir, metric="f1")
    with pytest.raises(ValueError, match="is not a folder"):
        E.lm_eval(model, tasks="dppa_choice", tokenizer=tok, include_path=task_dir / "missing")


def test_dppa_search_with_the_lm_eval_evaluator(task_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base, fts = family(tmp_path / "fam", n_ft=2, vocab=64)
    tok_dir = tmp_path / "tok"
    T.char_tokenizer().save_pretrained(str(tok_dir))
    cfg = write_config(tmp_path / "cfg.yaml", "dppa", base, fts,
                       model_params=[{"weight": 1.0, "densities": [0.1, 0.2]}] * 2)
    out = tmp_path / "best"
    r = cli("search", cfg, "--eval", "dppa_kernels.eval:lm_eval", "--eval-arg", "tasks=dppa_choice",
            "--eval-arg", f"include_path={task_dir}", "--eval-arg", "metric=acc", "--tokenizer", tok_dir,
            "--max-evals", "3", "--out", out, "--no-progress")
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "search_report.json").read_text())
    assert rep["higher_is_better"] is True and len(rep["candidates"]) == 3
    assert all(0 <= c["score"] <= 1 for c in rep["candidates"])
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype="auto")
    from transformers import AutoTokenizer

    assert _simple_evaluate(model, AutoTokenizer.from_pretrained(str(tok_dir)), task_dir, "dppa_choice")["acc"] == \
        rep["best_score"]
