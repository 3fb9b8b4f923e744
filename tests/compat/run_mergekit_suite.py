"""mergekit's own test suite with our backend installed: the drop-in compatibility check of CI.

Runs the tests of mergekit 0.1.5's source distribution (pinned by version and sha256 below; the
installed mergekit is the same 0.1.5, from .ci/setup) with
``dppa_kernels.integrations.mergekit.install()`` active for the whole session. The rule: every test
passes wherever it passes without ``install()``. A test that fails is rerun without ``install()``
(the control run); the check fails only for tests that pass there, and reports the others as
failing upstream or in this environment.

The source distribution lacks ``tests/__init__.py`` and ``tests/common.py``; ``mergekit_common.py``
provides the helpers the tests import, ``mergekit_conftest.py`` installs the backend.

Excluded tests: none. No test of 0.1.5 needs the network; on a machine without CUDA (or MPS) 82
test cases skip themselves, as they do without ``install()`` (520 run; about 1 minute on 2 cores).

Usage: ``python tests/compat/run_mergekit_suite.py [--fetch-only] [pytest args]``. The sdist is
downloaded once into ``.venv/cache/`` (``--fetch-only`` does just that; .ci/setup calls it).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VERSION = "0.1.5"
SHA256 = "caa51dbbfa493bcd62218d17f2bc7bb1c7a2a2e4baf4e2f34a29d73c66c594aa"
SDIST = f"mergekit-{VERSION}.tar.gz"
EXCLUDED: dict = {}  # pytest node id -> why it cannot run here (none today)

HERE = Path(__file__).resolve().parent
CACHE = HERE.parents[1] / ".venv" / "cache"


def fetch() -> Path:
    """The pinned sdist, downloaded with pip on first use and checked against its sha256."""
    path = CACHE / SDIST
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        "--no-build-isolation", f"mergekit=={VERSION}", "-d", str(CACHE)], check=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256:
        path.unlink()
        raise SystemExit(f"error: {path} has sha256 {digest}, expected {SHA256}; deleted, rerun to download again")
    return path


def unpack(sdist: Path, into: Path) -> Path:
    """<into>/tests: the sdist's tests plus the missing package files; <into>/conftest.py."""
    tests = into / "tests"
    tests.mkdir()
    prefix = f"mergekit-{VERSION}/tests/"
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            if m.isfile() and m.name.startswith(prefix) and "/" not in m.name[len(prefix):]:
                (tests / m.name[len(prefix):]).write_bytes(tar.extractfile(m).read())
    (tests / "__init__.py").write_text("")
    shutil.copy(HERE / "mergekit_common.py", tests / "common.py")
    shutil.copy(HERE / "mergekit_conftest.py", into / "conftest.py")
    return tests


def run(root: Path, args: list, install: bool) -> tuple[int, list]:
    """(pytest exit code, failed node ids) of one run in ``root``."""
    failed = root / ("failed.txt" if install else "failed_control.txt")
    failed.unlink(missing_ok=True)
    env = dict(os.environ, DPPA_COMPAT_INSTALL="1" if install else "0", DPPA_COMPAT_FAILED=str(failed))
    deselect = [f"--deselect={n}" for n in EXCLUDED]
    rc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(root),
                         *deselect, *args], cwd=root, env=env).returncode
    return rc, (sorted(set(failed.read_text().split())) if failed.exists() else [])


def main(argv: list) -> int:
    sdist = fetch()
    if argv[:1] == ["--fetch-only"]:
        return 0
    with tempfile.TemporaryDirectory(prefix="mergekit-tests-") as tmp:
        root = Path(tmp)
        unpack(sdist, root)
        print(f"mergekit {VERSION} test suite with dppa_kernels installed", flush=True)
        rc, failed = run(root, argv or ["tests"], install=True)
        if rc not in (0, 1) or (rc == 1 and not failed):
            print(f"error: pytest exited with {rc} (no test results to compare)", file=sys.stderr)
            return rc or 1
        if not failed:
            return 0
        print(f"control run without install() of the {len(failed)} failed test(s)", flush=True)
        _, control = run(root, failed, install=False)
        ours = [n for n in failed if n not in control]
        for n in failed:
            if n in control:
                print(f"note: {n} fails without install() too (upstream or environment)")
        for n in ours:
            print(f"error: {n} fails with install() but not without it", file=sys.stderr)
        return 1 if ours else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
