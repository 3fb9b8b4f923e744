"""``dppa search`` on a small synthetic family with the built-in loss evaluator; its output is what
``dppa merge`` writes for the best factors; bad arguments are one error line."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from engine_util import cli, dir_digest, family, write_config

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from dppa_kernels.tasks.tokenizer import char_tokenizer

    root = tmp_path_factory.mktemp("search")
    base, fts = family(root / "fam", n_ft=2)
    char_tokenizer().save_pretrained(str(root / "tok"))
    data = root / "val.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{a}+{b}=", "answer": str(a + b)}) + "\n"
                            for a in range(7) for b in range(3)))
    cfg = write_config(root / "cfg.yaml", "dppa", base, fts,
                       model_params=[{"weight": 1.0, "densities": [0.1, 0.2]}, {"weight": 0.5, "densities": [0.2, 0.4]}])
    return root, cfg, data


def _search(setup, out, *extra):
    root, cfg, data = setup
    return cli("search", cfg, "--eval", "dppa_kernels.eval:loss", "--eval-data", data, "--tokenizer", root / "tok",
               "--out", out, "--no-progress", *extra)


def test_search_writes_the_best_merge_report_and_plot(setup, tmp_path):
    root, cfg, data = setup
    out = tmp_path / "best"
    r = _search(setup, out, "--max-evals", "6")
    assert r.exit_code == 0, r.output
    rep = json.loads((out / "search_report.json").read_text())
    assert rep["higher_is_better"] is False and rep["strategy"] == "greedy"
    assert 1 <= len(rep["candidates"]) <= 6
    best = min(rep["candidates"], key=lambda c: c["score"])  # a loss: lower is better
    assert rep["best_alphas"] == [best["alphas"]] * 2 and rep["best_score"] == best["score"]
    assert rep["plot"] == "search_scores.png" and (out / "search_scores.png").stat().st_size > 1000
    assert set(rep["timings"]) >= {"statistics_s", "search_s", "eval_s", "merge_s", "total_s"}
    # the written model is exactly dppa merge's for the searched factors
    cfg_best = yaml.safe_load(open(cfg))
    for m, a in zip(cfg_best["models"], rep["best_alphas"]):
        m["parameters"]["alphas"] = a
    path = tmp_path / "best.yaml"
    path.write_text(yaml.safe_dump(cfg_best))
    assert cli("merge", path, "--out", tmp_path / "merge", "--no-progress").exit_code == 0
    assert dir_digest(out) == dir_digest(tmp_path / "merge")
    # ... and scores what the search measured for it (the in-memory merge equals the written one)
    from transformers import AutoModelForCausalLM

    from dppa_kernels.eval import loss

    model = AutoModelForCausalLM.from_pretrained(str(out), torch_dtype="auto")
    assert loss(model, data=str(data), tokenizer=str(root / "tok")) == pytest.approx(rep["best_score"], rel=1e-6)


def test_grid_strategy(setup, tmp_path):
    r = _search(setup, tmp_path / "grid", "--strategy", "grid", "--max-evals", "3")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "grid" / "search_report.json").read_text())
    assert rep["strategy"] == "grid" and len(rep["candidates"]) == 3 and rep["complete"] is False


def _error_line(r) -> str:
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error: "), r.output
    return lines[0]


def test_bad_arguments_are_one_error_line(setup, tmp_path):
    root, cfg, data = setup
    out = tmp_path / "x"
    assert "MODULE:FUNCTION" in _error_line(cli("search", cfg, "--eval", "dppa_kernels.eval", "--out", out))
    assert "cannot import" in _error_line(cli("search", cfg, "--eval", "no_such_mod_xyz:f", "--out", out))
    assert "has no 'nope'" in _error_line(cli("search", cfg, "--eval", "dppa_kernels.eval:nope", "--out", out))
    assert "--strategy" in _error_line(cli("search", cfg, "--eval", "dppa_kernels.eval:loss", "--out", out,
                                           "--strategy", "random"))
    assert "does not exist" in _error_line(cli("search", cfg, "--eval", "dppa_kernels.eval:loss", "--out", out,
                                               "--eval-data", tmp_path / "missing.jsonl"))
    c = yaml.safe_load(open(cfg))
    ties = write_config(tmp_path / "ties.yaml", "ties", c["base_model"], [m["model"] for m in c["models"]],
                        model_params=[{"weight": 1.0, "density": 0.5}] * 2)
    assert "dppa or dppa_ties" in _error_line(cli("search", ties, "--eval", "dppa_kernels.eval:loss", "--out", out,
                                                  "--eval-data", data))
    assert not out.exists()


def test_failing_evaluator_names_the_candidate_and_writes_nothing(setup, tmp_path, monkeypatch):
    import sys
    import types

    mod = types.ModuleType("dppa_test_bad_eval")
    n = [0]

    def flaky(model, **kw):
        n[0] += 1
        if n[0] == 2:
            raise RuntimeError("validation set exploded")
        return 1.0
    mod.flaky = flaky
    monkeypatch.setitem(sys.modules, "dppa_test_bad_eval", mod)
    root, cfg, _ = setup
    out = tmp_path / "bad"
    line = _error_line(cli("search", cfg, "--eval", "dppa_test_bad_eval:flaky", "--out", out, "--no-progress"))
    assert "alphas [1.9, 0.0]" in line and "validation set exploded" in line
    assert not out.exists() or not os.listdir(out)


def test_exact_match_evaluator_and_eval_args(setup, tmp_path):
    root, cfg, data = setup
    r = cli("search", cfg, "--eval", "dppa_kernels.eval:exact_match", "--eval-data", data, "--tokenizer", root / "tok",
            "--eval-arg", "limit=5", "--eval-arg", "max_new_tokens=3", "--out", tmp_path / "em", "--max-evals", "2",
            "--no-progress")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "em" / "search_report.json").read_text())
    assert rep["higher_is_better"] is True and rep["eval_kwargs"]["limit"] == "5"
    assert len(rep["candidates"]) == 2 and all(0.0 <= c["score"] <= 1.0 for c in rep["candidates"])
