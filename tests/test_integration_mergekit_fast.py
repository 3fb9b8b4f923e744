"""dppa-mergekit-yaml's fast path (our streaming engine, no mergekit import) against its fallback
(mergekit's pipeline with our backend): bit-identical tensors for every method with the same
seed, mergekit's file layout, eligibility (each trigger falls back) and the import check."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from integration_common import CUDA, ROOT, config, load, write_family

from dppa_kernels.integrations import mergekit_cli as cli_mod
from dppa_kernels.engine import MergeError
from dppa_kernels.integrations.mergekit_fast import FastPlan, Unsupported, plan_fast

SEED = ["--random-seed", "7"]
DPPA = [{"weight": 1.0, "densities": [0.1, 0.2], "alphas": [1.8, 1.0]},
        {"weight": 0.7, "densities": [0.15, 0.3], "alphas": [2.0, 0.5]}]
CASES = {
    "task_arithmetic": ([{"weight": 0.7}, {"weight": 0.45}], {"lambda": 0.9}),
    "ties": ([{"weight": 0.6, "density": 0.3}, {"weight": 0.4, "density": 0.55}], None),
    "dare_linear": ([{"weight": 0.6, "density": 0.3}, {"weight": 0.5, "density": 0.5}], None),
    "dare_ties": ([{"weight": 0.6, "density": 0.2}, {"weight": 0.5, "density": 0.3}], None),
    "breadcrumbs": ([{"weight": 0.5, "density": 0.4, "gamma": 0.02}, {"weight": 0.5, "density": 0.3}], None),
    "breadcrumbs_ties": ([{"weight": 1.0, "density": 0.4}, {"weight": 0.8, "density": 0.5, "gamma": 0.05}], None),
    "della": ([{"weight": 1.0, "density": 0.3}, {"weight": 0.7, "density": 0.4, "epsilon": 0.1}], None),
    "della_linear": ([{"weight": 1.0, "density": 0.4, "epsilon": 0.15}, {"weight": 0.6, "density": 0.5}], None),
    "dppa": (DPPA, {"offset_lambda": 0.05, "outlier_mult_unit": 5, "tie_mode": "gt"}),
    "dppa_ties": (DPPA, {"offset_lambda": 0.05, "nonunit_mode": "prune", "lambda": 0.8}),
}
TOKENIZER = {"tokenizer_config.json": "{}", "tokenizer.json": '{"fake": true}', "special_tokens_map.json": "{}",
             "generation_config.json": '{"do_sample": false}', "vocab.json": "{}"}


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """bf16 family; the base has tokenizer files (mergekit copies all of them but vocab.json)."""
    dirs = write_family(tmp_path_factory.mktemp("fast"), n=2, dtype=torch.bfloat16, seed=11)
    for fn, text in TOKENIZER.items():
        (Path(dirs[0]) / fn).write_text(text)
    return dirs


@pytest.fixture(scope="module")
def fam_deep(tmp_path_factory):
    """11 layers: mergekit's name order (layer 10 before layer 2) differs from the natural one."""
    return write_family(tmp_path_factory.mktemp("deep"), n=2, dtype=torch.bfloat16, hidden=16, layers=11,
                        vocab=32, seed=13)


@pytest.fixture(scope="module")
def fam32(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("fast32"), n=2, seed=12)


def _main(args: list) -> None:
    try:
        cli_mod.main(args)
    except SystemExit as exc:  # click's standalone mode exits after the fallback
        assert exc.code in (0, None), exc.code


def _write(cfg: dict, path: Path) -> str:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


def both(cfg: dict, tmp: Path, *flags: str) -> tuple[Path, Path]:
    """(fast output, fallback output) of the same YAML and flags; asserts the fast path ran."""
    path = _write(cfg, tmp / "cfg.yml")
    fast, slow = tmp / "fast", tmp / "slow"
    assert cli_mod.try_fast([path, str(fast), "--quiet", *flags]), "the fast path did not run"
    _main([path, str(slow), "--quiet", "--no-fast-path", *flags])
    return fast, slow


def layout(out: Path) -> tuple:
    """(file names, {shard: {tensor: (dtype, shape)}}, index or None)."""
    from safetensors import safe_open

    shards = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            shards[f.name] = {k: (s.get_slice(k).get_dtype(), tuple(s.get_slice(k).get_shape())) for k in s.keys()}
    idx = out / "model.safetensors.index.json"
    index = json.loads(idx.read_text()) if idx.exists() else None
    if index:
        index["metadata"].pop("mergekit_version", None)  # documented: not written by the fast path
    return sorted(p.name for p in out.iterdir()), shards, index


def assert_same(fast: Path, slow: Path) -> None:
    assert layout(fast) == layout(slow)
    a, b = load(fast), load(slow)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (fast, slow))
    assert ca == cb
    for fn in TOKENIZER:
        assert (fast / fn).exists() == (slow / fn).exists(), fn
    if (slow / "mergekit_config.yml").exists():
        assert (fast / "mergekit_config.yml").read_text() == (slow / "mergekit_config.yml").read_text()
    assert not [p for p in fast.parent.iterdir() if p.name.startswith(".")], "staging left behind"


@pytest.mark.parametrize("method", list(CASES))
def test_fast_path_bit_identical_to_fallback(fam, tmp_path, method):
    params, glob = CASES[method]
    fast, slow = both(config(method, fam, params, glob), tmp_path, *SEED)
    assert_same(fast, slow)
    assert not (fast / "vocab.json").exists() and (fast / "tokenizer.json").exists()  # mergekit's copy rule
    assert "dppa-mergekit-yaml" in (fast / "README.md").read_text()


def test_seed_is_honoured(fam, tmp_path):
    params, _ = CASES["dare_ties"]
    path = _write(config("dare_ties", fam, params), tmp_path / "cfg.yml")
    outs = []
    for seed in ("7", "8"):
        out = tmp_path / f"s{seed}"
        assert cli_mod.try_fast([path, str(out), "--quiet", "--random-seed", seed])
        outs.append(load(out))
    assert any(not torch.equal(outs[0][k], outs[1][k]) for k in outs[0])


def test_shards_dtypes_base_in_models_and_gradients(fam_deep, tmp_path):
    """Several shards (mergekit's order and split), bf16 inputs merged in fp32 and written as
    fp16, the base listed under models, a layer gradient and a filter, no card, no tokenizer."""
    fam = fam_deep
    cfg = config("ties", fam, [{"weight": [0.2, 0.9], "density": 0.4},
                               {"weight": 0.5, "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.6}]}],
                 dtype="float32")
    cfg["models"].insert(0, {"model": fam[0]})
    cfg["out_dtype"] = "float16"
    fast, slow = both(cfg, tmp_path, "--out-shard-size", "10k", "--no-write-model-card", "--no-copy-tokenizer")
    files, shards, index = layout(fast)
    assert len(shards) > 3 and index is not None and "README.md" not in files
    assert_same(fast, slow)
    assert json.loads((fast / "config.json").read_text())["dtype"] == "float16"


def test_tensor_order_option(tmp_path):
    from dppa_kernels.engine import MergeError, parse_config
    from dppa_kernels.engine.plan import build_plan
    from dppa_kernels.engine.source import ModelSource

    fam = write_family(tmp_path, n=1, hidden=16, layers=11, vocab=16)  # layer 10 sorts before layer 2 by name
    cfg = parse_config(config("ties", fam, CASES["ties"][0][:1]))
    srcs = [ModelSource(d) for d in fam]
    plan = {o: [t.name for t in build_plan(cfg, srcs[0], srcs[1:], out_dtype=None, shard_size=10**9,
                                           truncate_vocab=False, order=o).tasks] for o in ("natural", "name")}
    assert plan["name"] == sorted(plan["natural"]) != plan["natural"]
    with pytest.raises(MergeError, match="tensor order"):
        build_plan(cfg, srcs[0], srcs[1:], out_dtype=None, shard_size=1, truncate_vocab=False, order="bogus")
    for s in srcs:
        s.close()


def test_engine_without_tensor_report(fam, tmp_path):
    """tensor_report=False (the fast path's setting) skips only the report's per-tensor rows."""
    from dppa_kernels.engine import MergeOptions, run_merge

    path = _write(config("della", fam, CASES["della"][0]), tmp_path / "cfg.yml")
    reports = {flag: run_merge(path, MergeOptions(out=str(tmp_path / str(flag)), progress=False, seed=3,
                                                  tensor_report=flag)) for flag in (True, False)}
    assert reports[True]["tensors"] and reports[False]["tensors"] == {}
    a, b = load(tmp_path / "True"), load(tmp_path / "False")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_writes_into_existing_output_like_mergekit(fam, tmp_path):
    params, _ = CASES["ties"]
    path = _write(config("ties", fam, params), tmp_path / "cfg.yml")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "model.safetensors").write_text("stale")
    assert cli_mod.try_fast([path, str(out), "--quiet"])
    assert (out / "notes.txt").read_text() == "keep me"
    assert load(out).keys() == load(fam[0]).keys()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_engine_failure_is_an_error_not_a_fallback(fam, tmp_path, monkeypatch, capsys):
    """A failure of the fast path's merge ends the run (one error line, exit 1, nothing left);
    mergekit's pipeline is not tried after it."""
    from dppa_kernels.integrations import mergekit_layout

    def boom(*a, **k):
        raise MergeError("simulated failure after the merge")

    monkeypatch.setattr(mergekit_layout, "write_layout", boom)
    monkeypatch.setattr(cli_mod, "build_command", lambda: pytest.fail("the fallback ran after a refusal"))
    params, _ = CASES["ties"]
    path = _write(config("ties", fam, params), tmp_path / "cfg.yml")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        cli_mod.main([path, str(out), "--quiet", "-v"])
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "simulated failure" in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU: --cuda variant needs CUDA")
@pytest.mark.parametrize("method", ["ties", "dare_ties", "della", "dppa"])
def test_cuda_fast_path_matches_fallback(fam, tmp_path, method):
    params, glob = CASES[method]
    fast, slow = both(config(method, fam, params, glob), tmp_path, *SEED, "--cuda")
    assert_same(fast, slow)


_ = CUDA  # the shared skip marker (used via skipif above for a clearer reason)


def _opts(**kw) -> dict:
    opts = cli_mod.parse_fast(["c.yml", "out", *kw.pop("argv", [])])
    opts.update(kw)
    return opts


def _reason(cfg: dict, tmp: Path, argv=(), out=None):
    """The plan, or the reason the fast path gives for not reproducing the run."""
    path = _write(cfg, tmp / "cfg.yml")
    try:
        return plan_fast(_opts(argv=list(argv)), path, str(out or tmp / "out"))
    except Unsupported as exc:
        return str(exc)


@pytest.mark.parametrize("flag", ["--no-safe-serialization", "--read-to-gpu", "--low-cpu-memory", "--multi-gpu",
                                  "--gpu-rich", "--trust-remote-code", "--unsafe-truncate-embeddings",
                                  "--lora-merge-cache=/tmp/x", "--lora-merge-dtype=float32",
                                  "--transformers-cache=/tmp/x", "--device=xpu"])
def test_options_that_fall_back(fam, tmp_path, flag):
    reason = _reason(config("ties", fam, CASES["ties"][0]), tmp_path, [flag])
    assert isinstance(reason, str) and flag.split("=")[0].lstrip("-").split("-")[0] in reason


def test_noop_options_keep_the_fast_path(fam, tmp_path):
    argv = ["--allow-crimes", "--lazy-unpickle", "--clone-tensors", "--async-write", "--write-threads", "3", "-j", "1",
            "--no-copy-tokenizer", "--no-write-model-card", "--out-shard-size", "2B", "--device", "cpu"]
    plan = _reason(config("ties", fam, CASES["ties"][0]), tmp_path, argv)
    assert isinstance(plan, FastPlan), plan
    assert plan.shard_size == 2 * 10**9 and plan.num_threads == 1 and plan.tokenizer == [] and not plan.write_card


def _edit(fam, **changes) -> dict:
    cfg = config("ties", fam, CASES["ties"][0])
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    return cfg


def test_configs_that_fall_back(fam, fam32, tmp_path):
    sliced = {"merge_method": "ties", "base_model": fam[0],
              "slices": [{"sources": [{"model": d, "layer_range": [0, 2]} for d in fam]}]}
    cases = {
        "slices": sliced,
        "tokenizer_source": _edit(fam, tokenizer_source="base"),
        "chat_template": _edit(fam, chat_template="chatml"),
        "merge_method 'slerp'": _edit(fam, merge_method="slerp"),
        "LoRA": _edit(fam, models=[{"model": fam[1] + "+some/lora", "parameters": {"weight": 1.0}}]),
        "not a local folder": _edit(fam, models=[{"model": "org/model-7b", "parameters": {"weight": 1.0}}]),
        "dtype 'float64'": _edit(fam, dtype="float64"),
        "'tie_mode'": _edit(fam, parameters={"tie_mode": "ge"}),
        "no weight": _edit(fam, models=[{"model": fam[1], "parameters": {"density": 0.5}}]),
        "listed twice": _edit(fam, models=[{"model": fam[1], "parameters": {"weight": 1.0}}] * 2),
        "several dtypes": _edit(fam, base_model=fam32[0]),
        "differs from the working dtype": _edit(fam, out_dtype="float32"),
    }
    for expect, cfg in cases.items():
        reason = _reason(cfg, tmp_path)
        assert isinstance(reason, str) and expect in reason, (expect, reason)
    with pytest.raises(MergeError, match="overlaps"):  # a refusal, not a reason to fall back
        _reason(_edit(fam), tmp_path, out=Path(fam[0]) / "merged")


def test_inputs_that_fall_back(fam, tmp_path):
    """A base tensor mergekit would not write, an unknown architecture, a tokenizer mergekit
    would rebuild with transformers."""
    import shutil

    from safetensors.torch import load_file, save_file

    for what in ("extra", "arch", "tokenizer"):
        dirs = [tmp_path / what / f"m{i}" for i in range(3)]
        for src, dst in zip(fam, dirs):
            shutil.copytree(src, dst)
        if what == "extra":
            for d in dirs:
                sd = load_file(str(d / "model.safetensors"))
                sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8, dtype=torch.bfloat16)
                save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
            expect = "would not write"
        elif what == "arch":
            for d in dirs:
                c = json.loads((d / "config.json").read_text())
                c["architectures"] = ["MyOwnForCausalLM"]
                (d / "config.json").write_text(json.dumps(c))
            expect = "no mergekit architecture"
        else:
            (dirs[0] / "tokenizer.json").unlink()
            expect = "rebuild the tokenizer"
        reason = _reason(config("ties", [str(d) for d in dirs], CASES["ties"][0]), tmp_path / what)
        assert isinstance(reason, str) and expect in reason, (what, reason)


def test_fallback_triggers_really_run_mergekit(fam, tmp_path, capsys):
    """slices: -v says why, and mergekit (with our backend) writes the merge."""
    cfg = {"merge_method": "ties", "base_model": fam[0], "parameters": {"density": 0.5, "weight": 0.5},
           "slices": [{"sources": [{"model": d, "layer_range": [0, 2]} for d in fam]}]}
    out = tmp_path / "out"
    _main([_write(cfg, tmp_path / "cfg.yml"), str(out), "--quiet", "-v", "--no-copy-tokenizer"])
    assert "fast path off (config key 'slices')" in capsys.readouterr().err
    assert load(out).keys() == load(fam[0]).keys()


@pytest.mark.parametrize("argv,env,fast", [
    (["c.yml", "out"], None, True),
    (["c.yml", "out", "--no-fast-path"], None, False),
    (["c.yml", "out"], "0", False),
    (["c.yml", "out"], "1", True),
    (["--help"], None, False),
])
def test_switches(monkeypatch, argv, env, fast):
    calls = []
    monkeypatch.setattr(cli_mod, "try_fast", lambda args: calls.append(("fast", args)) or False)
    monkeypatch.setattr(cli_mod, "build_command", lambda: (lambda args, prog_name: calls.append(("mk", args))))
    if env is None:
        monkeypatch.delenv(cli_mod.FAST_ENV, raising=False)
    else:
        monkeypatch.setenv(cli_mod.FAST_ENV, env)
    cli_mod.main(argv)
    stripped = [a for a in argv if a != "--no-fast-path"]
    assert calls == ([("fast", stripped)] if fast else []) + [("mk", stripped)]


def test_fast_path_imports_no_mergekit_transformers_peft(fam, tmp_path):
    path = _write(config("dare_ties", fam, CASES["dare_ties"][0]), tmp_path / "cfg.yml")
    code = ("import sys\nfrom dppa_kernels.integrations.mergekit_cli import main\n"
            f"main([{path!r}, {str(tmp_path / 'out')!r}, '--quiet'])\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('mergekit', 'transformers', 'peft'))\n"
            "print('IMPORTED', bad)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=str(ROOT))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "IMPORTED []" in res.stdout, res.stdout
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_density_renormalize_fast_path_matches_fallback(fam, tmp_path):
    """density_renormalize is one of dppa's mergekit parameters (the registry's), so the fast path
    takes it and agrees with the fallback's pre-pass; and it changes the merge (units are clamped)."""
    params = [{"weight": 1.0, "densities": [0.05, 0.1], "alphas": [1.8, 1.0]}, {"weight": 0.7, "density": 0.1}]
    glob = {"offset_lambda": 0.3, "tie_mode": "gt"}
    (tmp_path / "on").mkdir()
    fast, slow = both(config("dppa", fam, params, {**glob, "density_renormalize": True}), tmp_path / "on", *SEED)
    assert_same(fast, slow)
    off = tmp_path / "off"
    assert cli_mod.try_fast([_write(config("dppa", fam, params, glob), tmp_path / "off.yml"), str(off), "--quiet"])
    on, plain = load(fast), load(off)
    assert any(not torch.equal(on[k], plain[k]) for k in on)


def test_alphas_preset_names_on_both_paths(fam, tmp_path, capsys):
    """``alphas: NAME`` (per model or global) merges like the preset's factors, on the fast path
    and the fallback; an unknown name is one error line naming the key, the value and the presets."""
    named = [{"weight": 1.0, "densities": [0.1, 0.2], "alphas": "amplified"}, {"weight": 0.7, "densities": [0.15, 0.3]}]
    glob = {"offset_lambda": 0.05, "alphas": "top_only"}
    (tmp_path / "named").mkdir()
    fast, slow = both(config("dppa", fam, named, glob), tmp_path / "named", *SEED)
    assert_same(fast, slow)
    explicit = [dict(named[0], alphas=[1.8, 1.0]), dict(named[1], alphas=[1.0, 0.0])]
    out = tmp_path / "explicit"
    assert cli_mod.try_fast([_write(config("dppa", fam, explicit, {"offset_lambda": 0.05}), tmp_path / "e.yml"),
                             str(out), "--quiet"])
    a, b = load(fast), load(out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    bad = _write(config("dppa", fam, [dict(named[0], alphas="amplfied"), named[1]], glob), tmp_path / "bad.yml")
    for flags in ([], ["--no-fast-path"]):
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            cli_mod.main([bad, str(tmp_path / "bad"), "--quiet", *flags])
        err = capsys.readouterr().err.strip()
        assert exc.value.code == 1 and len(err.splitlines()) == 1, err
        assert err.startswith("error: ") and "alphas: unknown preset 'amplfied'; valid: plain, top_only, " \
            "official_start, amplified" in err, err
        assert not (tmp_path / "bad").exists()
