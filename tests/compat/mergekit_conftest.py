"""conftest.py of the unpacked mergekit test suite (copied there by run_mergekit_suite.py).

Installs our backend into mergekit for the whole session (unless DPPA_COMPAT_INSTALL=0, the control
run) and appends the id of every failed test to the file named by DPPA_COMPAT_FAILED.
"""

import os


def pytest_configure(config):
    if os.environ.get("DPPA_COMPAT_INSTALL", "1") != "1":
        return
    from mergekit import merge_methods

    from dppa_kernels.integrations import mergekit as dk

    dk.install()
    # a run that silently tested plain mergekit would prove nothing
    assert type(merge_methods.get("ties")).__name__ == "FastGeneralizedTaskArithmeticMerge"


def pytest_runtest_logreport(report):
    path = os.environ.get("DPPA_COMPAT_FAILED")
    if report.failed and path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(report.nodeid + "\n")
