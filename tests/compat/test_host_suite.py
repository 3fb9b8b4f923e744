"""The host-suite rule on a made-up host sdist: a test that only passes without ``install()`` fails
the check, upstream failures are notes, hub-bound tests are excluded and counted, and a digest
mismatch deletes the download."""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import sys
import tarfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import host_suite  # noqa: E402

HOST_TESTS = '''
import os

import pytest
from huggingface_hub.errors import LocalEntryNotFoundError


def test_fine():
    assert 1 + 1 == 2


def test_upstream_failure():
    assert False, "fails with or without install()"


def test_broken_by_install():
    assert os.environ.get("DPPA_COMPAT_MADEUP_INSTALLED") != "1"


@pytest.mark.parametrize("model_id", ["no-such-org/no-such-model"])
def test_hub_model(model_id):
    assert False, "never runs: excluded at collection"


def test_hub_refused():
    try:
        raise LocalEntryNotFoundError("offline")
    except LocalEntryNotFoundError as exc:
        raise OSError("could not load the model") from exc


def test_listed():
    assert False, "never runs: listed as excluded"
'''


def _host(tmp_path: Path, monkeypatch, tests: str) -> host_suite.Host:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        data = tests.encode()
        info = tarfile.TarInfo("madeup-1.0/tests/test_madeup.py")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    (tmp_path / "madeup-1.0.tar.gz").write_bytes(buf.getvalue())
    monkeypatch.setattr(host_suite, "CACHE", tmp_path)
    return host_suite.Host(name="madeup", dist="pytest", version=importlib.metadata.version("pytest"),
                           sha256=hashlib.sha256(buf.getvalue()).hexdigest(), sdist="madeup-1.0.tar.gz",
                           args=("tests",), excluded={"tests/test_madeup.py::test_listed": "listed here"})


def test_rule_catches_a_test_broken_by_install(tmp_path, monkeypatch, capfd):
    host = _host(tmp_path, monkeypatch, HOST_TESTS)
    assert host_suite.check(host, ["--control-all"]) == 1
    out, err = capfd.readouterr()
    assert "error: tests/test_madeup.py::test_broken_by_install is failed with install() but passes without it" in err
    assert "note: tests/test_madeup.py::test_upstream_failure fails without install() too" in out
    assert ("with install(): 3 ran (1 passed, 2 failed); excluded: 1 needing a download at collection, "
            "1 while running, 1 listed in the runner; 0 not selected") in out
    assert "without install(): 3 ran (2 passed, 1 failed)" in out


def test_rule_passes_when_only_upstream_fails(tmp_path, monkeypatch, capfd):
    host = _host(tmp_path, monkeypatch, HOST_TESTS.replace('os.environ.get("DPPA_COMPAT_MADEUP_INSTALLED") != "1"', "True"))
    assert host_suite.check(host, ["-k", "not fine"]) == 0
    out, err = capfd.readouterr()
    assert "error:" not in err and "1 not selected" in out
    assert "control run without install() of the 2 test(s) that did not pass" in out  # the failure, the refusal


def test_digest_mismatch_deletes_the_download(tmp_path, monkeypatch):
    host = _host(tmp_path, monkeypatch, HOST_TESTS)
    bad = host_suite.Host(**{**vars(host), "sha256": "0" * 64})
    with pytest.raises(SystemExit, match="sha256"):
        host_suite.fetch(bad)
    assert not (tmp_path / host.sdist).exists()
