"""FusionBench's own tests with our drop-ins installed (CI's compatibility check).

Runs the tests of FusionBench 0.2.33's source distribution (``fusion-bench`` on PyPI, pinned by
version and sha256 below; the installed FusionBench is the same 0.2.33, from .ci/setup) with
``dppa_kernels.integrations.fusion_bench.install()`` active for the whole session, under the rule of
``host_suite.py``: every test passes wherever it passes without ``install()``.

Selection: the whole suite, which is small: the sdist ships 4 test files (depth upscaling, MagMax,
simple average, weighted ensemble; 23 tests) and one test is listed as excluded below (it builds a
full-size Mistral 7B in float32, 28 GB of memory and minutes of CPU, then fails in FusionBench's
own code with or without ``install()``). ``test_run_valid_modelpool`` also fails without
``install()`` (a NameError in FusionBench's ``DepthUpscalingAlgorithm``), so the control run
reports it as failing upstream. None of them calls what ``install()`` replaces (the TIES
utilities and the DARE drop): FusionBench 0.2.33 has no tests of task arithmetic, TIES or DARE.
Those are checked against FusionBench's own functions and algorithm classes, with and without
``install()``, in tests/test_integration_fusion_bench*.py. What this run shows is that installing
the drop-ins (which patches every loaded FusionBench module that imported them) leaves the rest of
FusionBench working.

Usage: ``python tests/compat/run_fusion_bench_suite.py [--fetch-only] [--control-all] [pytest args]``.
"""

import sys

from host_suite import Host, check

FUSION_BENCH = Host(name="fusion_bench", dist="fusion-bench", version="0.2.33",
                    sha256="2dd939c7389c36098364faae5dd3e721b8ce85978cdc81653ea49e4492ddb7f1",
                    sdist="fusion_bench-0.2.33.tar.gz", args=("tests",),
                    excluded={"tests/test_depth_upscaling.py::TestDepthUpscalingAlgorithm::test_run_solar_model":
                              "builds a 7B-parameter model in float32 (28 GB); fails upstream"})

if __name__ == "__main__":
    sys.exit(check(FUSION_BENCH, sys.argv[1:]))
