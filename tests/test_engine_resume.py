"""--resume after killing a merge mid-way gives output bytes identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from dppa_kernels.engine.outdir import tmp_path as partial_dir
from test_engine_util import ROOT, cli, cli_subprocess, dir_digest, family, leftovers, write_config


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
    r = cli("merge", cfg, "--out", out, "--resume", "--no-progress")
    assert r.exit_code != 0 and "different config" in r.output


def test_resume_of_complete_output_redoes_nothing_wrong(tmp_path):
    base, fts = family(tmp_path / "fam")
    cfg = write_config(tmp_path / "c.yaml", "ties", base, fts)
    out = tmp_path / "out"
    assert cli("merge", cfg, "--out", out, "--no-progress").exit_code == 0
    first = dir_digest(out)
    r = cli_subprocess("merge", cfg, "--out", out, "--resume", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert dir_digest(out) == first
