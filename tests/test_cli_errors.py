"""Bad input: a clear error naming the model, file, tensor or key, a non-zero exit, and nothing
written (no output folder, no temporary folder left), inputs untouched."""

from __future__ import annotations

import errno
import os
import shutil

import pytest
import torch
from safetensors.torch import save_file

from dppa_kernels.engine import shards as shards_mod
from dppa_kernels.engine.synth import write_model
from dppa_kernels import merge_deltas
from engine_util import cli, deltas_of, family, leftovers, load_dir, tree_state, write_config


@pytest.fixture()
def fam(tmp_path):
    base, fts = family(tmp_path / "fam", shard_bytes=1 << 40)
    return base, fts


def _edit(path, fn):
    """Rewrite a single-file model after fn(state_dict) edits it."""
    sd = load_dir(path)
    fn(sd)
    os.remove(os.path.join(path, "model.safetensors"))
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def _fails(tmp_path, cfg, *needles, extra=()):
    out = tmp_path / "out"
    before = tree_state(tmp_path / "fam") if (tmp_path / "fam").exists() else None
    r = cli("merge", cfg, "--out", out, "--no-progress", *extra)
    assert r.exit_code != 0
    for n in needles:
        assert n in r.output, f"{n!r} not in {r.output!r}"
    assert not out.exists() and not leftovers(out), "something was written"
    if before is not None:
        assert tree_state(tmp_path / "fam") == before
    return r.output


def test_shape_mismatch(fam, tmp_path):
    base, fts = fam
    _edit(fts[1], lambda sd: sd.__setitem__("model.layers.0.mlp.up_proj.weight", torch.zeros(64, 31).bfloat16()))
    _fails(tmp_path, write_config(tmp_path / "c.yaml", "ties", base, fts), "model.layers.0.mlp.up_proj.weight",
           fts[1], "[64, 31]")


def test_missing_key(fam, tmp_path):
    base, fts = fam
    _edit(fts[2], lambda sd: sd.pop("model.norm.weight"))
    _fails(tmp_path, write_config(tmp_path / "c.yaml", "ties", base, fts), "model.norm.weight", fts[2], "missing")


def test_vocab_mismatch_error_then_truncate(fam, tmp_path):
    base, fts = fam

    def grow(sd):
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            sd[k] = torch.cat([sd[k], torch.ones(4, sd[k].shape[1], dtype=sd[k].dtype)])
    _edit(fts[0], grow)
    cfg = write_config(tmp_path / "c.yaml", "task_arithmetic", base, fts)
    _fails(tmp_path, cfg, "vocabulary size mismatch", "104", "100", "--truncate-vocab")
    r = cli("merge", cfg, "--out", tmp_path / "out", "--truncate-vocab", "--no-progress")
    assert r.exit_code == 0, r.output
    got = load_dir(tmp_path / "out")["lm_head.weight"]
    b, f = load_dir(base), [load_dir(p) for p in fts]
    for x in f:
        x["lm_head.weight"] = x["lm_head.weight"][:100]
    bb, ds = deltas_of(b, f, "lm_head.weight")
    want = merge_deltas(ds, bb, method="task_arithmetic")
    assert got.shape == (100, 32) and torch.equal(got, want)


def test_truncated_shard(fam, tmp_path):
    base, fts = fam
    p = os.path.join(fts[0], "model.safetensors")
    with open(p, "r+b") as f:
        f.truncate(os.path.getsize(p) - 100)
    _fails(tmp_path, write_config(tmp_path / "c.yaml", "ties", base, fts), "truncated", p)


def test_corrupt_shard_header(fam, tmp_path):
    base, fts = fam
    p = os.path.join(fts[1], "model.safetensors")
    with open(p, "r+b") as f:
        f.seek(8)
        f.write(b"\x00garbage{{{")
    _fails(tmp_path, write_config(tmp_path / "c.yaml", "ties", base, fts), "corrupt", p)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_in_delta(fam, tmp_path, bad):
    base, fts = fam

    def poison(sd):
        t = sd["model.layers.1.self_attn.v_proj.weight"].clone()
        t[3, 4] = bad
        sd["model.layers.1.self_attn.v_proj.weight"] = t
    _edit(fts[2], poison)
    _fails(tmp_path, write_config(tmp_path / "c.yaml", "ties", base, fts), "model.layers.1.self_attn.v_proj.weight",
           fts[2], "NaN/Inf")


@pytest.mark.parametrize("density", [1.5, -0.1])
def test_density_out_of_range(fam, tmp_path, density):
    base, fts = fam
    cfg = write_config(tmp_path / "c.yaml", "ties", base, fts, model_params=[{"weight": 1, "density": density}] * 3)
    _fails(tmp_path, cfg, "density", str(density), "[0, 1]", fts[0])


def test_dppa_density_out_of_range(fam, tmp_path):
    base, fts = fam
    cfg = write_config(tmp_path / "c.yaml", "dppa", base, fts, model_params=[{"densities": [0.1, 1.2]}] * 3)
    _fails(tmp_path, cfg, "densities", "1.2")


def test_unknown_method(fam, tmp_path):
    base, fts = fam
    _fails(tmp_path, write_config(tmp_path / "c.yaml", "tiez", base, fts), "tiez", "did you mean 'ties'",
           "dare_ties", "dppa")


def test_typo_and_unsupported_keys(fam, tmp_path):
    base, fts = fam
    cfg = write_config(tmp_path / "c.yaml", "ties", base, fts, model_params=[{"weight": 1, "desnity": 0.2}] * 3)
    _fails(tmp_path, cfg, "'desnity'", "did you mean 'density'", "weight, density")
    cfg = write_config(tmp_path / "c2.yaml", "ties", base, fts, merge_methd="x")
    _fails(tmp_path, cfg, "'merge_methd'", "valid keys", "merge_method")
    cfg = write_config(tmp_path / "c3.yaml", "ties", base, fts, slices=[])
    _fails(tmp_path, cfg, "'slices'", "not supported")
    cfg = write_config(tmp_path / "c4.yaml", "ties", base, fts, params={"gamma": 0.1})
    _fails(tmp_path, cfg, "'gamma'", "ties", "valid")
    cfg = write_config(tmp_path / "c5.yaml", "ties", base, fts, model_params=[{"normalize": True}] * 3)
    _fails(tmp_path, cfg, "'normalize'", "global")


def test_missing_paths(fam, tmp_path):
    base, fts = fam
    _fails(tmp_path, write_config(tmp_path / "c.yaml", "ties", base, fts[:2] + ["/nonexistent/m"]),
           "/nonexistent/m", "does not exist")
    _fails(tmp_path, tmp_path / "missing.yaml", "missing.yaml", "cannot read")


def test_failed_write_leaves_nothing(fam, tmp_path, monkeypatch):
    base, fts = fam
    real_open = open

    class Full:
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 5000:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(b)

        def __getattr__(self, k):
            return getattr(self.f, k)

    monkeypatch.setattr(shards_mod, "open", lambda p, m="r", *a, **k: Full(real_open(p, m, *a, **k)) if "w" in m
                        and p.endswith(".partial") else real_open(p, m, *a, **k), raising=False)
    _fails(tmp_path, write_config(tmp_path / "c.yaml", "ties", base, fts), "No space left on device", ".partial")


def test_pickle_refused_unless_allowed(fam, tmp_path):
    base, fts = fam
    pk = str(tmp_path / "fam" / "pickled")
    shutil.copytree(fts[0], pk)
    sd = load_dir(pk)
    os.remove(os.path.join(pk, "model.safetensors"))
    torch.save(sd, os.path.join(pk, "pytorch_model.bin"))
    cfg = write_config(tmp_path / "c.yaml", "ties", base, [pk] + fts[1:])
    _fails(tmp_path, cfg, pk, "pickle", "--allow-pickle")
    assert cli("merge", cfg, "--out", tmp_path / "a", "--allow-pickle", "--no-progress").exit_code == 0
    ref = write_config(tmp_path / "r.yaml", "ties", base, fts)
    assert cli("merge", ref, "--out", tmp_path / "b", "--no-progress").exit_code == 0
    a, b = load_dir(tmp_path / "a"), load_dir(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_output_safety(fam, tmp_path):
    base, fts = fam
    cfg = write_config(tmp_path / "c.yaml", "ties", base, fts)
    for bad in (base, os.path.join(fts[0], "sub"), os.path.dirname(base)):
        r = cli("merge", cfg, "--out", bad, "--no-progress")
        assert r.exit_code != 0 and "overlaps input model" in r.output
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    r = cli("merge", cfg, "--out", out, "--no-progress")
    assert r.exit_code != 0 and "not empty" in r.output and (out / "keep.txt").exists()
    bad_cfg = write_config(tmp_path / "bad.yaml", "ties", base, fts, model_params=[{"density": 3}] * 3)
    r = cli("merge", bad_cfg, "--out", out, "--force", "--no-progress")
    assert r.exit_code != 0 and (out / "keep.txt").exists(), "a failed --force merge destroyed the old output"
    r = cli("merge", cfg, "--out", out, "--force", "--no-progress")
    assert r.exit_code == 0 and not (out / "keep.txt").exists() and not leftovers(out)


def test_write_model_helper_roundtrip(tmp_path):
    """The helper used to craft inputs writes loadable sharded folders."""
    sd = {f"w{i}": torch.full((10, 10), float(i)) for i in range(5)}
    write_model(str(tmp_path / "m"), sd, {"vocab_size": 10}, shard_bytes=900)
    assert os.path.exists(tmp_path / "m" / "model.safetensors.index.json")
    got = load_dir(tmp_path / "m")
    assert all(torch.equal(got[k], sd[k]) for k in sd)
