"""dppa-mergekit-yaml falls back to mergekit's pipeline only when the fast path does not reproduce
a run; a refusal (an output overlapping an input, a NaN/Inf delta, a pickle without
--allow-pickle, a corrupt input, a link out of a model folder, mixed architectures, a locked
output, a full disk) is one error line and exit code 1 on whichever path would run."""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from engine_util import tree_state
from integration_common import config, load, write_family

from dppa_kernels.engine import MergeError
from dppa_kernels.engine.outdir import output_lock
from dppa_kernels.integrations import mergekit_cli as cli_mod
from dppa_kernels.integrations import mergekit_layout
from dppa_kernels.integrations.mergekit_fast import Unsupported

TIES = [{"weight": 0.6, "density": 0.4}, {"weight": 0.5, "density": 0.5}]
PATHS = [pytest.param([], id="fast"), pytest.param(["--no-fast-path"], id="fallback")]


@pytest.fixture()
def fam(tmp_path):
    dirs = write_family(tmp_path / "fam", n=2, dtype=torch.bfloat16, hidden=16, vocab=32, seed=3)
    for fn, text in {"tokenizer_config.json": "{}", "tokenizer.json": '{"fake": true}'}.items():
        (Path(dirs[0]) / fn).write_text(text)
    return dirs


def _cfg(tmp: Path, cfg: dict) -> str:
    p = tmp / "cfg.yml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(p)


def _sliced(fam) -> dict:
    """A config the fast path does not reproduce (it always takes mergekit's pipeline)."""
    return {"merge_method": "ties", "base_model": fam[0], "parameters": {"density": 0.5, "weight": 0.5},
            "slices": [{"sources": [{"model": d, "layer_range": [0, 2]} for d in fam]}]}


def run(capsys, *args) -> tuple[int, str]:
    try:
        cli_mod.main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    return code, capsys.readouterr().err


def refused(code: int, err: str, *needles) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert code == 1 and len(lines) == 1, (code, err[-3000:])
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def no_output(out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_unsupported_is_not_a_refusal():
    assert not issubclass(Unsupported, MergeError) and not issubclass(MergeError, Unsupported)


@pytest.mark.parametrize("kind", ["fast", "fallback", "sliced"])
def test_output_overlapping_an_input_is_refused(fam, tmp_path, capsys, kind):
    before = tree_state(fam[0])
    cfg = _sliced(fam) if kind == "sliced" else config("ties", fam, TIES)
    flags = ["--no-fast-path"] if kind == "fallback" else []
    out = Path(fam[0]) / "merged"
    refused(*run(capsys, _cfg(tmp_path, cfg), out, "--quiet", *flags), "overlaps input model")
    assert tree_state(fam[0]) == before and not out.exists()


def _poison(model_dir: str, bad: float) -> None:
    from safetensors.torch import load_file, save_file

    p = os.path.join(model_dir, "model.safetensors")
    sd = load_file(p)
    sd["model.layers.1.mlp.up_proj.weight"][3, 4] = bad
    save_file(sd, p, metadata={"format": "pt"})


@pytest.mark.parametrize("flags", PATHS)
def test_nan_delta_is_refused(fam, tmp_path, capsys, flags):
    _poison(fam[2], float("nan"))
    out = tmp_path / "out"
    cfg = _cfg(tmp_path, config("task_arithmetic", fam, [{"weight": 1.0}, {"weight": 1.0}]))
    refused(*run(capsys, cfg, out, "--quiet", *flags), "NaN/Inf", "model.layers.1.mlp.up_proj.weight")
    no_output(out)


def _to_pickle(model_dir: str) -> None:
    from safetensors.torch import load_file

    p = os.path.join(model_dir, "model.safetensors")
    torch.save(load_file(p), os.path.join(model_dir, "pytorch_model.bin"))
    os.remove(p)


@pytest.mark.parametrize("flags", PATHS)
def test_pickle_needs_allow_pickle(fam, tmp_path, capsys, flags):
    cfg = _cfg(tmp_path, config("ties", fam, TIES))
    ref = tmp_path / "ref"
    assert run(capsys, cfg, ref, "--quiet")[0] == 0
    _to_pickle(fam[1])
    out = tmp_path / "out"
    refused(*run(capsys, cfg, out, "--quiet", *flags), fam[1], "pickle", "--allow-pickle")
    no_output(out)
    code, err = run(capsys, cfg, out, "--quiet", "-v", "--allow-pickle", *flags)
    assert code == 0, err
    if not flags:
        assert "fast path off (model" in err and "pickle weights" in err
    a, b = load(out), load(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flags", PATHS)
def test_allowed_pickles_need_a_torch_that_loads_them_safely(fam, tmp_path, capsys, monkeypatch, flags):
    _to_pickle(fam[1])
    cfg = _cfg(tmp_path, config("ties", fam, TIES))
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(torch, "__version__", "2.5.1+cpu")
        refused(*run(capsys, cfg, out, "--quiet", "--allow-pickle", *flags), "torch >= 2.6", "CVE-2025-32434")
    with monkeypatch.context() as m:
        m.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
        refused(*run(capsys, cfg, out, "--quiet", "--allow-pickle", *flags), "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    no_output(out)


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


@pytest.mark.parametrize("flags", PATHS)
def test_a_malicious_pickle_is_never_loaded(fam, tmp_path, capsys, monkeypatch, flags):
    """With TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 any torch.load without weights_only runs the
    payload; without --allow-pickle nothing may load it at all."""
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "pwned"
    os.remove(os.path.join(fam[1], "model.safetensors"))
    with open(os.path.join(fam[1], "pytorch_model.bin"), "wb") as f:
        pickle.dump(_Payload(str(marker)), f)
    out = tmp_path / "out"
    refused(*run(capsys, _cfg(tmp_path, config("ties", fam, TIES)), out, "--quiet", *flags), "--allow-pickle")
    assert not marker.exists(), "the pickle was loaded"
    no_output(out)


@pytest.mark.parametrize("flags", PATHS)
def test_truncated_input_is_a_refusal(fam, tmp_path, capsys, flags):
    p = os.path.join(fam[1], "model.safetensors")
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 64)
    out = tmp_path / "out"
    refused(*run(capsys, _cfg(tmp_path, config("ties", fam, TIES)), out, "--quiet", *flags), p)
    no_output(out)


@pytest.mark.parametrize("flags", PATHS)
def test_tokenizer_link_out_of_the_model_is_refused(fam, tmp_path, capsys, flags):
    secret = tmp_path / "secret.txt"
    secret.write_text("root:$6$not-a-real-hash:::")
    link = os.path.join(fam[0], "tokenizer.json")
    os.remove(link)
    os.symlink(secret, link)
    out = tmp_path / "out"
    refused(*run(capsys, _cfg(tmp_path, config("ties", fam, TIES)), out, "--quiet", *flags), link, "symbolic link")
    no_output(out)


@pytest.mark.parametrize("flags", PATHS)
def test_index_shard_path_out_of_the_model_is_refused(fam, tmp_path, capsys, flags):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.move(os.path.join(fam[1], "model.safetensors"), elsewhere / "model.safetensors")
    from safetensors import safe_open

    with safe_open(str(elsewhere / "model.safetensors"), "pt") as f:
        wm = {k: "../../elsewhere/model.safetensors" for k in f.keys()}
    with open(os.path.join(fam[1], "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": wm}, f)
    out = tmp_path / "out"
    refused(*run(capsys, _cfg(tmp_path, config("ties", fam, TIES)), out, "--quiet", *flags), "names shard",
            "relative paths inside the model folder")
    no_output(out)


@pytest.mark.parametrize("flags", PATHS)
def test_a_locked_output_is_refused_at_once(fam, tmp_path, capsys, flags):
    out = tmp_path / "out"
    with output_lock(str(out)):
        refused(*run(capsys, _cfg(tmp_path, config("ties", fam, TIES)), out, "--quiet", *flags), "another merge into")
    no_output(out)


def test_mixed_architectures_need_allow_crimes(fam, tmp_path, capsys):
    p = os.path.join(fam[2], "config.json")
    c = json.load(open(p))
    c["model_type"] = "mistral"
    json.dump(c, open(p, "w"))
    cfg = _cfg(tmp_path, config("ties", fam, TIES))
    out = tmp_path / "out"
    refused(*run(capsys, cfg, out, "--quiet"), fam[2], "--allow-crimes")
    no_output(out)
    code, err = run(capsys, cfg, out, "--quiet", "--allow-crimes")
    assert code == 0, err
    assert load(out).keys() == load(fam[0]).keys()


def test_disk_full_while_laying_out_the_fast_output(fam, tmp_path, capsys, monkeypatch):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", a[-1] if a else None)

    monkeypatch.setattr(mergekit_layout.shutil, "copyfile", full)  # the tokenizer copy
    out = tmp_path / "out"
    refused(*run(capsys, _cfg(tmp_path, config("ties", fam, TIES)), out, "--quiet"), "No space left on device")
    no_output(out)


@pytest.mark.parametrize("flags", PATHS)
def test_unreadable_config_is_one_line(tmp_path, capsys, flags):
    cfg = tmp_path / "cfg.yml"
    cfg.write_bytes(b"\xff\xfe\x00binary\x00")
    out = tmp_path / "out"
    refused(*run(capsys, cfg, out, *flags), str(cfg), "not a text file")
    no_output(out)
