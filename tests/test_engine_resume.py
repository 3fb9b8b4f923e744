"""--resume after killing a merge mid-way gives output bytes identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from dppa_kernels.engine.outdir import tmp_path as partial_dir
from dppa_kernels.engine.shards import Journal
from engine_util import ROOT, cli, cli_subprocess, dir_digest, family, leftovers, tree_state, write_config


@pytest.mark.parametrize("method", ["dppa", "dare_ties"])
def test_kill_then_resume_is_byte_identical(tmp_path, method):
    base, fts = family(tmp_path / "fam", layers=3)
    cfg = write_config(tmp_path / "c.yaml", method, base, fts, model_params=[{"weight": 1.0, "density": 0.3}] * 3
                       if method == "dare_ties" else None)
    args = ["--out-shard-size", "12K", "--seed", "3", "--no-progress", "--backend", "torch"]
    clean = tmp_path / "clean"
    assert cli("merge", cfg, "--out", clean, *args).exit_code == 0
    out = tmp_path / "out"
    journal = os.path.join(partial_dir(str(out)), "journal.json")
    env = dict(os.environ, DPPA_KERNELS_SHARD_DELAY_S="0.4")
    proc = subprocess.Popen([sys.executable, "-m", "dppa_kernels", "merge", cfg, "--out", str(out), *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(journal):
            try:
                done = len(json.load(open(journal))["done"])
            except (ValueError, KeyError):
                done = 0
            if done >= 2:
                break
        time.sleep(0.02)
    assert proc.poll() is None, "merge finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_total = len(json.load(open(os.path.join(clean, "model.safetensors.index.json")))["weight_map"])
    assert not out.exists() and 2 <= done < n_total
    # Damage one completed shard and leave a half-written one: both must be redone.
    tmp = partial_dir(str(out))
    shard = sorted(f for f in os.listdir(tmp) if f.endswith(".safetensors"))[0]
    with open(os.path.join(tmp, shard), "r+b") as f:
        f.seek(-3, 2)
        f.write(b"xyz")
    open(os.path.join(tmp, "model-00099-of-00099.safetensors.partial"), "wb").write(b"junk")
    r = cli("merge", cfg, "--out", out, *args)
    assert r.exit_code != 0 and "--resume" in r.output  # an interrupted merge is never silently restarted
    r = cli("merge", cfg, "--out", out, "--resume", *args)
    assert r.exit_code == 0, r.output
    assert dir_digest(out) == dir_digest(clean)
    assert not leftovers(out)
    rep = json.load(open(out / "merge_report.json"))
    assert rep["resumed"] and rep["shards_redone_on_resume"] == [shard]


def test_resume_refuses_other_config(tmp_path):
    base, fts = family(tmp_path / "fam")
    cfg = write_config(tmp_path / "c.yaml", "ties", base, fts)
    out = tmp_path / "out"
    os.makedirs(partial_dir(str(out)))
    with open(os.path.join(partial_dir(str(out)), "journal.json"), "w") as f:
        json.dump({"fingerprint": "other", "done": {}}, f)
    before = tree_state(partial_dir(str(out)))
    r = cli("merge", cfg, "--out", out, "--resume", "--no-progress")
    assert r.exit_code != 0 and "different config" in r.output and "--force" in r.output
    assert tree_state(partial_dir(str(out))) == before, "a refused --resume deleted the partial merge"


ARGS = ["--out-shard-size", "12K", "--no-progress", "--backend", "torch"]


def _interrupted(tmp_path, monkeypatch, after: int = 2):
    """(config, output, clean digest): a merge stopped (Ctrl-C) after ``after`` committed shards,
    and the digest of the same merge run uninterrupted."""
    base, fts = family(tmp_path / "fam", layers=3)
    cfg = write_config(tmp_path / "c.yaml", "ties", base, fts)
    assert cli("merge", cfg, "--out", tmp_path / "clean", *ARGS).exit_code == 0
    real = Journal.record

    def stop_after(self, result):
        real(self, result)
        if len(self.done) == after:
            raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Journal, "record", stop_after)
        r = cli("merge", cfg, "--out", tmp_path / "out", *ARGS)
    assert r.exit_code == 130 and "--resume" in r.output
    assert len(json.load(open(os.path.join(partial_dir(str(tmp_path / "out")), "journal.json")))["done"]) == after
    return cfg, base, fts, tmp_path / "out", dir_digest(tmp_path / "clean")


def test_touching_the_inputs_does_not_invalidate_a_resume(tmp_path, monkeypatch):
    cfg, base, fts, out, clean = _interrupted(tmp_path, monkeypatch)
    later = time.time() + 3600
    for d in [base] + fts:
        for fn in os.listdir(d):
            os.utime(os.path.join(d, fn), (later, later))
    r = cli("merge", cfg, "--out", out, "--resume", *ARGS)
    assert r.exit_code == 0, r.output
    assert dir_digest(out) == clean and not leftovers(out)
    assert json.load(open(out / "merge_report.json"))["resumed"]


def test_changed_input_bytes_refuse_a_resume_and_keep_the_partial(tmp_path, monkeypatch):
    cfg, base, fts, out, _ = _interrupted(tmp_path, monkeypatch)
    _, other = family(tmp_path / "other", layers=3, seed=5)  # same names and shapes, other values
    for fn in os.listdir(other[0]):
        if fn.endswith(".safetensors"):
            shutil.copyfile(os.path.join(other[0], fn), os.path.join(fts[0], fn))
    before = tree_state(partial_dir(str(out)))
    r = cli("merge", cfg, "--out", out, "--resume", *ARGS)
    assert r.exit_code != 0 and "different config, inputs or options" in r.output
    assert tree_state(partial_dir(str(out))) == before and not out.exists()


def test_resume_never_replaces_files_it_did_not_write(tmp_path, monkeypatch):
    cfg, _, _, out, clean = _interrupted(tmp_path, monkeypatch)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = tree_state(partial_dir(str(out)))
    r = cli("merge", cfg, "--out", out, "--resume", *ARGS)
    assert r.exit_code != 0 and "not empty" in r.output and "never replaces files" in r.output
    assert (out / "notes.txt").read_text() == "mine" and os.listdir(out) == ["notes.txt"]
    assert tree_state(partial_dir(str(out))) == before
    (out / "notes.txt").unlink()  # an empty folder may be resumed into
    assert cli("merge", cfg, "--out", out, "--resume", *ARGS).exit_code == 0
    assert dir_digest(out) == clean


def test_resume_refuses_a_finished_output_and_keeps_user_files(tmp_path):
    """--resume on a finished output (with a user's file added) neither deletes nor re-merges."""
    base, fts = family(tmp_path / "fam")
    cfg = write_config(tmp_path / "c.yaml", "ties", base, fts)
    out = tmp_path / "out"
    assert cli("merge", cfg, "--out", out, "--no-progress").exit_code == 0
    (out / "notes.txt").write_text("mine")
    first = tree_state(out)
    other = write_config(tmp_path / "c2.yaml", "dare_ties", base, fts,
                         model_params=[{"weight": 1.0, "density": 0.5}] * 3)
    for c in (cfg, other):
        r = cli_subprocess("merge", c, "--out", out, "--resume", "--no-progress")
        assert r.returncode != 0 and "finished merge" in r.stderr and "--force" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ")
        assert tree_state(out) == first and not leftovers(out)
