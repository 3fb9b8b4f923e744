"""``dppa merge`` never copies files from outside a model folder, never lets two runs race on one
output, follows a symlinked output instead of replacing it, and never deletes an input or the
config file: symlinked side files, index shard paths, the output lock, --out symlinks, overlap."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from dppa_kernels.engine.outdir import output_lock, tmp_path as partial_dir
from engine_util import ROOT, cli, dir_digest, family, leftovers, load_dir, tree_state, write_config

SECRET = "root:$6$not-a-real-hash:19000:0:99999:7:::\n"


@pytest.fixture()
def fam(tmp_path):
    return family(tmp_path / "fam", shard_bytes=1 << 40)


def _refused(r, out, *needles):
    assert r.exit_code != 0 and r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1, r.output
    for n in needles:
        assert n in r.output, (n, r.output)
    assert not os.path.exists(out) and not leftovers(out)


@pytest.mark.parametrize("fn", ["tokenizer.model", "config.json", "generation_config.json"])
def test_side_file_linking_out_of_the_model_is_refused(fam, tmp_path, fn):
    base, fts = fam
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    link = os.path.join(base, fn)
    if os.path.exists(link):
        os.remove(link)
    os.symlink(secret, link)
    cfg = write_config(tmp_path / "c.yaml", "ties", base, fts)
    _refused(cli("merge", cfg, "--out", tmp_path / "out", "--no-progress"), tmp_path / "out", link,
             "symbolic link", "outside the model folder")


def test_tokenizer_source_link_out_is_refused(fam, tmp_path):
    base, fts = fam
    tok = tmp_path / "tok"
    tok.mkdir()
    (tmp_path / "secret.txt").write_text(SECRET)
    os.symlink(tmp_path / "secret.txt", tok / "tokenizer.json")
    cfg = write_config(tmp_path / "c.yaml", "ties", base, fts, tokenizer_source=str(tok))
    _refused(cli("merge", cfg, "--out", tmp_path / "out", "--no-progress"), tmp_path / "out", "symbolic link")


def test_links_inside_the_model_and_hf_cache_snapshots_are_copied_as_files(fam, tmp_path):
    """A link to a file inside the model folder is fine, and so is a Hugging Face cache snapshot
    (``<repo>/snapshots/<rev>/*`` link to ``<repo>/blobs/*``)."""
    base, fts = fam
    os.rename(os.path.join(base, "tokenizer_config.json"), os.path.join(base, "tok_real.json"))
    os.symlink("tok_real.json", os.path.join(base, "tokenizer_config.json"))
    repo = tmp_path / "hub" / "models--org--base"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for fn in os.listdir(base):
        real = os.path.realpath(os.path.join(base, fn))
        shutil.copyfile(real, blobs / fn)
        os.symlink(os.path.join("..", "..", "blobs", fn), snap / fn)
    cfg = write_config(tmp_path / "c.yaml", "ties", str(snap), fts)
    out = tmp_path / "out"
    r = cli("merge", cfg, "--out", out, "--no-progress")
    assert r.exit_code == 0, r.output
    got = out / "tokenizer_config.json"
    assert not got.is_symlink() and got.read_text() == (blobs / "tokenizer_config.json").read_text()


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_index_shard_paths_must_stay_inside_the_model(tmp_path, kind):
    """The shard named by the index exists where the path points (outside the model folder):
    it must not be read."""
    base, fts = family(tmp_path / "fam")  # sharded: every model has an index
    victim = fts[0]
    index = os.path.join(victim, "model.safetensors.index.json")
    data = json.load(open(index))
    first = sorted(set(data["weight_map"].values()))[0]
    bad = "../elsewhere/" + first if kind == "relative" else str(tmp_path / "elsewhere" / first)
    target = os.path.normpath(os.path.join(victim, bad))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(os.path.join(victim, first), target)
    data["weight_map"] = {k: (bad if v == first else v) for k, v in data["weight_map"].items()}
    json.dump(data, open(index, "w"))
    cfg = write_config(tmp_path / "c.yaml", "ties", base, fts)
    _refused(cli("merge", cfg, "--out", tmp_path / "out", "--no-progress"), tmp_path / "out", "names shard",
             "relative paths inside the model folder", bad)


def test_a_second_run_into_a_locked_output_fails_at_once(fam, tmp_path):
    base, fts = fam
    cfg = write_config(tmp_path / "c.yaml", "ties", base, fts)
    out = tmp_path / "out"
    with output_lock(str(out)) as lock:
        r = cli("merge", cfg, "--out", out, "--force", "--no-progress")
        assert os.path.exists(lock)  # still held by us: the failed run did not remove it
    assert r.exit_code != 0 and "another merge into" in r.output and "is running" in r.output
    assert not out.exists() and not leftovers(out)


def test_two_concurrent_force_runs(tmp_path):
    """The issue's race: while one --force run merges, a second --force run into the same folder
    fails at once; the first completes with the full output (and the previous one is replaced)."""
    base, fts = family(tmp_path / "fam", layers=3)
    cfg = write_config(tmp_path / "c.yaml", "ties", base, fts)
    out = tmp_path / "out"
    args = ["--out-shard-size", "12K", "--no-progress", "--force"]
    assert cli("merge", cfg, "--out", out, *args).exit_code == 0
    clean = dir_digest(out)
    (out / "old.txt").write_text("previous output")
    env = dict(os.environ, DPPA_KERNELS_SHARD_DELAY_S="0.3")
    first = subprocess.Popen([sys.executable, "-m", "dppa_kernels", "merge", cfg, "--out", str(out), *args],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    journal = os.path.join(partial_dir(str(out)), "journal.json")
    deadline = time.time() + 120
    while not os.path.exists(journal) and first.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert first.poll() is None, "the first run finished before the second could start"
    second = cli("merge", cfg, "--out", out, *args)
    assert second.exit_code != 0 and "another merge into" in second.output
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert dir_digest(out) == clean and not (out / "old.txt").exists() and not leftovers(out)


def test_symlinked_output_with_force_twice(fam, tmp_path):
    base, fts = fam
    cfg = write_config(tmp_path / "c.yaml", "ties", base, fts)
    target = tmp_path / "storage" / "merged"
    target.mkdir(parents=True)
    link = tmp_path / "out"
    os.symlink(target, link)
    for _ in range(2):
        r = cli("merge", cfg, "--out", link, "--force", "--no-progress")
        assert r.exit_code == 0, r.output
        assert link.is_symlink() and os.path.realpath(link) == str(target)
        assert load_dir(target).keys() == load_dir(base).keys()
    assert not leftovers(link) and not leftovers(target)


def test_tokenizer_source_is_part_of_the_overlap_check(fam, tmp_path):
    base, fts = fam
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    cfg = write_config(tmp_path / "c.yaml", "ties", base, fts, tokenizer_source=str(tok))
    before = tree_state(tok)
    for out in (tok / "merged", tok):
        r = cli("merge", cfg, "--out", out, "--force", "--no-progress")
        assert r.exit_code != 0 and "overlaps input model 'tokenizer_source'" in r.output, r.output
        assert tree_state(tok) == before


def test_force_never_deletes_the_config_inside_the_output(fam, tmp_path):
    base, fts = fam
    out = tmp_path / "out"
    out.mkdir()
    cfg = write_config(out / "merge.yaml", "ties", base, fts)
    r = cli("merge", cfg, "--out", out, "--force", "--no-progress")
    assert r.exit_code != 0 and "inside the output folder" in r.output
    assert os.path.exists(cfg) and os.listdir(out) == ["merge.yaml"] and not leftovers(out)
