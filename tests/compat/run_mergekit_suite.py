"""mergekit's own test suite with our backend installed: the drop-in compatibility check of CI.

Runs the tests of mergekit 0.1.5's source distribution (pinned by version and sha256 below; the
installed mergekit is the same 0.1.5, from .ci/setup) with
``dppa_kernels.integrations.mergekit.install()`` active for the whole session, under the rule of
``host_suite.py``: every test passes wherever it passes without ``install()``.

The source distribution lacks ``tests/__init__.py`` and ``tests/common.py``; ``mergekit_common.py``
provides the helpers the tests import.

Selection: the whole suite. No test of 0.1.5 needs the network; on a machine without CUDA (or MPS)
82 test cases skip themselves, as they do without ``install()``. 518 pass without ``install()``
and 521 with it: a test parametrised over mergekit's registry of merge methods also runs the ones
``install()`` registers (``dppa``, ``dppa_ties``, ``consensus``). About 1 minute on 2 cores.

Usage: ``python tests/compat/run_mergekit_suite.py [--fetch-only] [--control-all] [pytest args]``.
The sdist is downloaded once into ``.venv/cache/`` (``--fetch-only`` does just that; .ci/setup calls it).
"""

import sys

from host_suite import Host, check

MERGEKIT = Host(name="mergekit", dist="mergekit", version="0.1.5",
                sha256="caa51dbbfa493bcd62218d17f2bc7bb1c7a2a2e4baf4e2f34a29d73c66c594aa",
                sdist="mergekit-0.1.5.tar.gz", args=("tests",), package=True,
                helpers={"common.py": "mergekit_common.py"})

if __name__ == "__main__":
    sys.exit(check(MERGEKIT, sys.argv[1:]))
