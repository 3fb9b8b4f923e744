"""The ray executor's options without a cluster: ray missing, or its options misused, is one
clear error before anything is written (these run whether or not ray is installed)."""

from __future__ import annotations

import os
import sys

import pytest

import engine_golden as G
from dppa_kernels.engine import MergeError, MergeOptions, run_merge


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return G.shared_family(tmp_path_factory, "ray-options")


_config = G.config_of


def test_missing_ray_is_one_clear_error(family, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from dppa_kernels.cli import app

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(MergeError, match=r"needs the ray package.*pip install 'dppa-kernels\[ray\]'"):
        run_merge(_config(family, "ties"), MergeOptions(out=str(tmp_path / "out"), executor="ray"))
    res = CliRunner().invoke(app, ["merge", _config(family, "ties"), "--out", str(tmp_path / "o2"), "--executor", "ray"])
    assert res.exit_code == 1 and res.output.count("\n") == 1 and "error: " in res.output, res.output
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "o2")


@pytest.mark.parametrize("opts, msg", [
    (dict(workers=2), "--workers apply to --executor ray only"),
    (dict(executor="ray", workers=0), "--workers must be a positive integer, got 0"),
    (dict(executor="ray", gpus_per_worker=-1.0), "--gpus-per-worker must be positive, got -1.0"),
    (dict(executor="rey"), "executor 'rey' is not one of local, serial, ray"),
])
def test_bad_executor_options(family, tmp_path, opts, msg):
    with pytest.raises(MergeError, match=msg.replace(".", r"\.")):
        run_merge(_config(family, "ties"), MergeOptions(out=str(tmp_path / "out"), **opts))
    assert not os.path.exists(tmp_path / "out")
