"""CLI surface: info, help, option parsing."""

from __future__ import annotations

import pytest
import typer

from dppa_kernels.cli import parse_size
from engine_util import cli, cli_subprocess


def test_info_matches_info_text():
    from dppa_kernels.info import info_text

    r = cli("info")
    assert r.exit_code == 0 and "backends:" in r.output
    assert r.output.strip().splitlines()[0] == info_text().splitlines()[0]


def test_module_entry_point_info():
    r = cli_subprocess("info", timeout=120)
    assert r.returncode == 0 and "reference" in r.stdout


def test_merge_help_lists_options():
    r = cli("merge", "--help")
    for opt in ("--out", "--device", "--backend", "--dtype", "--out-shard-size", "--resume", "--force", "--seed",
                "--no-progress", "--allow-pickle", "--truncate-vocab", "--resident"):
        assert opt in r.output, opt


@pytest.mark.parametrize("text,value", [("5B", 5_000_000_000), ("500M", 500_000_000), ("2GiB", 2 * 2**30),
                                        ("12K", 12_000), ("1000", 1000), ("1e9", 1_000_000_000), ("64MB", 64_000_000)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["abc", "5X", "-3", "0"])
def test_parse_size_rejects(text):
    with pytest.raises(typer.BadParameter):
        parse_size(text)


def test_bad_device_and_backend(tmp_path):
    from engine_util import family, write_config

    base, fts = family(tmp_path / "f")
    cfg = write_config(tmp_path / "c.yaml", "ties", base, fts)
    r = cli("merge", cfg, "--out", tmp_path / "o", "--device", "cuda:99")
    assert r.exit_code != 0 and ("cuda" in r.output.lower())
    r = cli("merge", cfg, "--out", tmp_path / "o", "--backend", "nope")
    assert r.exit_code != 0 and "nope" in r.output
    assert not (tmp_path / "o").exists()
