"""A host library's own test suite with our drop-in installed: the machinery the run_*_suite.py share.

Each host (mergekit, PEFT, FusionBench) is described by a :class:`Host`: its source distribution on
PyPI, pinned by version and sha256 (downloaded once with pip into ``.venv/cache/``), the tests to
run and the helper files its tests import but the sdist lacks. The tests are unpacked into a
temporary folder with ``host_conftest.py`` as its ``conftest.py``, which installs our drop-in for
the whole session and records every test's outcome.

The rule: every test passes with ``install()`` wherever it passes without it. After the run with
``install()``, every selected test that did not pass (failed, skipped, or excluded while running)
is rerun without ``install()`` (the control run); the check fails for each one that passes there.
``--control-all`` runs the whole selection in the control run instead, for the counts of both.

Tests that need a download (the runs are offline: ``HF_HUB_OFFLINE=1``) are excluded by rule, never
silently: a test parametrised with a model hub id missing from the local cache is deselected at
collection, and a test that fails because the hub refused an offline look-up is reported as
excluded. A runner may also list tests that cannot run here, each with its reason. All are counted
in the summary line.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE.parents[1] / ".venv" / "cache"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
NOT_PASSED = ("failed", "skipped", "excluded")  # the outcomes a control run rechecks


@dataclass(frozen=True)
class Host:
    name: str  # the key host_conftest.py installs by
    dist: str  # its name on PyPI and in the installed metadata
    version: str
    sha256: str  # of the sdist
    sdist: str  # the sdist's file name
    args: tuple  # pytest arguments of the default selection (paths relative to the unpacked root)
    package: bool = False  # the tests import each other relatively: give tests/ an __init__.py
    helpers: dict = field(default_factory=dict)  # tests/<name> -> file in tests/compat
    excluded: dict = field(default_factory=dict)  # pytest node id -> why it cannot run here


def fetch(host: Host) -> Path:
    """The pinned sdist, downloaded with pip on first use and checked against its sha256."""
    path = CACHE / host.sdist
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "--no-build-isolation", f"{host.dist}=={host.version}", "-d", str(CACHE)], check=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != host.sha256:
        path.unlink()
        raise SystemExit(f"error: {path} has sha256 {digest}, expected {host.sha256}; deleted, rerun to download again")
    return path


def unpack(host: Host, sdist: Path, into: Path) -> Path:
    """<into>/tests: the sdist's test files plus the helpers; <into>/conftest.py and pytest.ini."""
    tests = into / "tests"
    tests.mkdir()
    with tarfile.open(sdist) as tar:
        top = tar.getmembers()[0].name.split("/")[0]
        prefix = f"{top}/tests/"
        for m in tar.getmembers():
            rest = m.name[len(prefix):]
            if m.isfile() and m.name.startswith(prefix) and rest and "/" not in rest:
                (tests / rest).write_bytes(tar.extractfile(m).read())
    if host.package:
        (tests / "__init__.py").write_text("")
    for name, source in host.helpers.items():
        shutil.copy(HERE / source, tests / name)
    shutil.copy(HERE / "host_conftest.py", into / "conftest.py")
    # an empty ini file here stops pytest from taking its options from one in a folder above
    (into / "pytest.ini").write_text("[pytest]\n")
    return tests


def run(host: Host, root: Path, args: list, install: bool) -> dict:
    """One pytest run in ``root``: the outcome of each test that ran (``outcomes``), the tests
    excluded at collection (``unrunnable``) and how many the selection left out (``deselected``)."""
    report = root / ("report.jsonl" if install else "report_control.jsonl")
    report.unlink(missing_ok=True)
    env = dict(os.environ, **OFFLINE, DPPA_COMPAT_HOST=host.name, DPPA_COMPAT_INSTALL="1" if install else "0",
               DPPA_COMPAT_REPORT=str(report), DPPA_COMPAT_EXCLUDED=json.dumps(host.excluded))
    rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(root),
                         *args], cwd=root, env=env).returncode
    outcomes, unrunnable, deselected = {}, {}, 0
    if report.exists():
        for line in report.read_text().splitlines():
            rec = json.loads(line)
            if "deselected" in rec:
                deselected += rec["deselected"]
            elif rec.get("at") == "collection":
                unrunnable[rec["id"]] = rec["reason"]
            else:
                outcomes[rec["id"]] = rec["outcome"]
    # 0: all passed, 1: some failed, 5: nothing collected; anything else (an interrupted or broken
    # session) leaves no results to compare
    if rc not in (0, 1, 5) or (rc == 1 and "failed" not in outcomes.values()):
        raise SystemExit(f"error: pytest exited with {rc} for {host.name} ({'with' if install else 'without'} install())")
    return {"outcomes": outcomes, "unrunnable": unrunnable, "deselected": deselected - len(unrunnable)}


def summary(host: Host, result: dict, install: bool) -> str:
    """One line: how many tests ran and their outcomes, how many were excluded, how many not selected."""
    counts = collections.Counter(result["outcomes"].values())
    ran = sum(counts.values()) - counts["excluded"]
    parts = [f"{v} {k}" for k, v in sorted(counts.items(), key=lambda kv: (kv[0] != "passed", kv[0]))
             if k != "excluded"]
    listed = sum(1 for n in result["unrunnable"] if n in host.excluded)
    return (f"{host.name} {host.version} {'with' if install else 'without'} install(): {ran} ran "
            f"({', '.join(parts) or 'none'}); excluded: {len(result['unrunnable']) - listed} needing a download "
            f"at collection, {counts['excluded']} while running, {listed} listed in the runner; "
            f"{result['deselected']} not selected")


def check(host: Host, argv: list) -> int:
    """Run the suite (or ``argv``'s pytest arguments) with install(), then the control run."""
    parser = argparse.ArgumentParser(prog=f"run_{host.name}_suite.py", add_help=False)
    parser.add_argument("--fetch-only", action="store_true")
    parser.add_argument("--control-all", action="store_true")
    opts, args = parser.parse_known_args(argv)
    sdist = fetch(host)
    if opts.fetch_only:
        return 0
    installed = importlib.metadata.version(host.dist)
    if installed != host.version:
        print(f"error: {host.dist} {installed} is installed; this suite is pinned to {host.version}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix=f"{host.name}-tests-") as tmp:
        root = Path(tmp)
        unpack(host, sdist, root)
        print(f"{host.name} {host.version} test suite with dppa_kernels installed", flush=True)
        ours = run(host, root, args or list(host.args), install=True)
        print(summary(host, ours, True), flush=True)
        recheck = [n for n, o in ours["outcomes"].items() if o in NOT_PASSED]
        if opts.control_all:
            print("control run without install() of the whole selection", flush=True)
            control = run(host, root, args or list(host.args), install=False)
            print(summary(host, control, False), flush=True)
        elif recheck:
            print(f"control run without install() of the {len(recheck)} test(s) that did not pass", flush=True)
            control = run(host, root, recheck, install=False)
        else:
            return 0
    broken = sorted(n for n, o in control["outcomes"].items() if o == "passed" and ours["outcomes"].get(n) != "passed")
    for n in recheck:
        if n not in broken and ours["outcomes"][n] == "failed":
            print(f"note: {n} fails without install() too (upstream or environment)")
    for n in broken:
        print(f"error: {n} is {ours['outcomes'].get(n, 'not run')} with install() but passes without it",
              file=sys.stderr)
    return 1 if broken else 0
