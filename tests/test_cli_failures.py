"""Every failure of ``dppa merge`` is one ``error: ...`` line with a non-zero exit and nothing
half-written, however odd the input: binary YAML, a bad --dtype, a shard cut short during the
merge, a full disk while the side files are written, an alias bomb, mixed architectures."""

from __future__ import annotations

import errno
import json
import os

import pytest

from dppa_kernels.engine import outdir, run as run_mod
from dppa_kernels.engine.errors import LINE_LIMIT, brief
from engine_util import cli, cli_subprocess, family, leftovers, load_dir, write_config


@pytest.fixture()
def fam(tmp_path):
    return family(tmp_path / "fam", shard_bytes=1 << 40)


def one_error_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), text[-3000:]
    return lines[0]


def _nothing_written(out) -> None:
    assert not os.path.exists(out) and not leftovers(out)


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", b"merge_method: ties\n\x00\x01\x02",
                                     b"merge_method: [ties\nmodels: {", b"seed: " + b"9" * 5000,
                                     b"when: 2001-13-45", b"[" * 20000])
def test_binary_or_unparseable_yaml(tmp_path, content):
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(content)
    r = cli_subprocess("merge", cfg, "--out", tmp_path / "out", "--no-progress")
    line = one_error_line(r.stderr)
    assert r.returncode == 1 and str(cfg) in line and r.stdout == ""
    _nothing_written(tmp_path / "out")


@pytest.mark.parametrize("dtype", ["int8", "float8", "x" * 5000])
def test_bad_dtype_on_the_command_line(fam, tmp_path, dtype):
    base, fts = fam
    cfg = write_config(tmp_path / "c.yaml", "ties", base, fts)
    r = cli_subprocess("merge", cfg, "--out", tmp_path / "out", "--dtype", dtype, "--no-progress")
    line = one_error_line(r.stderr)
    assert r.returncode == 1 and "--dtype" in line and "bfloat16" in line and len(line) < 400
    _nothing_written(tmp_path / "out")


def test_bad_shard_size_is_one_line(fam, tmp_path):
    base, fts = fam
    cfg = write_config(tmp_path / "c.yaml", "ties", base, fts)
    r = cli("merge", cfg, "--out", tmp_path / "out", "--out-shard-size", "lots")
    assert r.exit_code == 2 and "--out-shard-size" in one_error_line(r.output)


def test_shard_truncated_while_the_merge_runs(fam, tmp_path, monkeypatch):
    """The headers were read and checked, then another process cuts an input shard short."""
    base, fts = fam
    victim = os.path.join(fts[1], "model.safetensors")
    real = run_mod.build_plan

    def plan_then_truncate(*a, **k):
        plan = real(*a, **k)
        with open(victim, "r+b") as f:
            f.truncate(os.path.getsize(victim) // 2)
        return plan

    monkeypatch.setattr(run_mod, "build_plan", plan_then_truncate)
    cfg = write_config(tmp_path / "c.yaml", "ties", base, fts)
    r = cli("merge", cfg, "--out", tmp_path / "out", "--no-progress")
    line = one_error_line(r.output)
    assert r.exit_code == 1 and victim in line and "changed during the merge" in line
    _nothing_written(tmp_path / "out")


class _Full:
    """A file whose writes fail with ENOSPC."""

    def __init__(self, f):
        self.f = f

    def write(self, b):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def __getattr__(self, k):
        return getattr(self.f, k)


@pytest.mark.parametrize("target", ["copy", "config.json", "mergekit_config.yml", "report", "rename"])
def test_disk_full_while_writing_the_side_files(fam, tmp_path, monkeypatch, target):
    base, fts = fam
    real_open = open

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if target == "copy":
        monkeypatch.setattr(outdir.shutil, "copyfile", full)
    elif target == "rename":  # the final rename of the finished merge into place
        real_replace = os.replace
        monkeypatch.setattr(outdir.os, "replace", lambda a, b: full() if os.path.basename(b) == "out"
                            else real_replace(a, b))
    elif target == "report":
        monkeypatch.setattr(run_mod, "write_json_atomic", lambda p, o: full() if p.endswith("report.json") else None)
    else:
        monkeypatch.setattr(outdir, "open", lambda p, m="r", *a, **k: _Full(real_open(p, m, *a, **k))
                            if "w" in m and p.endswith(target) else real_open(p, m, *a, **k), raising=False)
    cfg = write_config(tmp_path / "c.yaml", "ties", base, fts)
    r = cli("merge", cfg, "--out", tmp_path / "out", "--no-progress")
    line = one_error_line(r.output)
    assert r.exit_code == 1 and "No space left on device" in line
    _nothing_written(tmp_path / "out")


def test_an_unexpected_failure_is_still_one_line(fam, tmp_path, monkeypatch):
    base, fts = fam

    def bug(*a, **k):
        raise RuntimeError("simulated bug\nwith a second line")

    monkeypatch.setattr(run_mod, "copy_side_files", bug)
    cfg = write_config(tmp_path / "c.yaml", "ties", base, fts)
    r = cli("merge", cfg, "--out", tmp_path / "out", "--no-progress")
    line = one_error_line(r.output)
    assert r.exit_code == 1 and "unexpected RuntimeError: simulated bug" in line and "DPPA_TRACEBACK=1" in line
    _nothing_written(tmp_path / "out")


def _alias_bomb(levels: int) -> str:
    """A flow list of 10^levels numbers written in a few hundred bytes: each level is anchored
    where first used (``&a1 [&a0 [1.0, ...], *a0, ...]``) and referenced nine more times."""
    text = "&a0 [" + ", ".join(["1.0"] * 10) + "]"
    for i in range(1, levels):
        text = f"&a{i} [{text}, " + ", ".join([f"*a{i - 1}"] * 9) + "]"
    return text


@pytest.mark.parametrize("levels,needle", [(5, "weight must be a finite number"), (8, "expands to more than")])
def test_echoed_values_are_length_limited(fam, tmp_path, levels, needle):
    """A config of under 1 KB whose weight expands (YAML aliases) to 10^levels numbers: the message
    stays short instead of printing the whole structure (tens of KB at 10^5, gigabytes at 10^8)."""
    base, fts = fam
    weights = [_alias_bomb(levels)] + [f"*a{levels - 1}"] * (len(fts) - 1)
    models = "".join(f"  - model: {m}\n    parameters: {{weight: {w}}}\n" for m, w in zip(fts, weights))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n{models}")
    assert cfg.stat().st_size < 1024
    r = cli_subprocess("merge", cfg, "--out", tmp_path / "out", "--no-progress", timeout=120)
    line = one_error_line(r.stderr)
    assert r.returncode == 1 and needle in line and len(line) <= LINE_LIMIT + 10, len(line)
    _nothing_written(tmp_path / "out")


def test_brief_limits_every_kind_of_value():
    nested = [1.0] * 10
    for _ in range(9):
        nested = [nested] * 10
    for value in (nested, "x" * 10**6, 10**5000, {str(i): i for i in range(10**4)}, b"\x00" * 10**5):
        assert len(brief(value)) <= 160
    assert brief("ties") == "'ties'" and brief([0.1, 0.2]) == "[0.1, 0.2]"


def _set_config(folder, **changes):
    p = os.path.join(folder, "config.json")
    data = json.load(open(p))
    data.update(changes)
    json.dump(data, open(p, "w"))


@pytest.mark.parametrize("change", [{"model_type": "mistral"}, {"architectures": ["MistralForCausalLM"]}])
def test_mixed_architectures_need_allow_crimes(fam, tmp_path, change):
    base, fts = fam
    _set_config(fts[1], **change)
    cfg = write_config(tmp_path / "c.yaml", "ties", base, fts)
    r = cli("merge", cfg, "--out", tmp_path / "out", "--no-progress")
    line = one_error_line(r.output)
    assert r.exit_code == 1 and fts[1] in line and "--allow-crimes" in line and "mistral" in line.lower()
    _nothing_written(tmp_path / "out")
    r = cli("merge", cfg, "--out", tmp_path / "out", "--no-progress", "--allow-crimes")
    assert r.exit_code == 0, r.output
    assert load_dir(tmp_path / "out").keys() == load_dir(base).keys()
