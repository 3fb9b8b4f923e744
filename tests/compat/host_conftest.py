"""conftest.py of an unpacked host test suite (copied there by host_suite.py).

DPPA_COMPAT_HOST names the host; unless DPPA_COMPAT_INSTALL=0 (the control run) our drop-in for it
is installed for the whole session and checked to be in place. Every test's outcome goes to the
JSON-lines file named by DPPA_COMPAT_REPORT.

Exclusions (the rule of host_suite.py): a test listed in DPPA_COMPAT_EXCLUDED (JSON: node id ->
reason) or parametrised with a model hub id that is not in the local cache is deselected at
collection; a test that fails because the hub refused an offline look-up is reported as skipped
with the reason "excluded: ..." and recorded as excluded.
"""

import json
import os
import re

import pytest

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
NEEDS_DOWNLOAD = "excluded: needs a download from the model hub (the run is offline)"
_outcomes: dict = {}


def _install_mergekit():
    from mergekit import merge_methods

    from dppa_kernels.integrations import mergekit as dk

    dk.install()
    assert type(merge_methods.get("ties")).__name__ == "FastGeneralizedTaskArithmeticMerge"


def _install_peft():
    import peft.tuners.lora.model as lora_model
    import peft.utils.merge_utils as merge_utils

    from dppa_kernels.integrations import peft as dk

    dk.install()
    for module in (lora_model, merge_utils):
        assert module.ties.__module__ == dk.__name__ and module.dare_ties.__module__ == dk.__name__


def _install_fusion_bench():
    from fusion_bench.method.dare import utils as dare_utils
    from fusion_bench.method.ties_merging import ties_merging_utils

    from dppa_kernels.integrations import fusion_bench as dk

    dk.install()
    assert ties_merging_utils.ties_merging is dk.ties_merging and dare_utils.param_random_drop_ is dk.param_random_drop_


def _install_madeup():
    """The made-up host of tests/compat/test_host_suite.py: its tests see that install() ran."""
    os.environ["DPPA_COMPAT_MADEUP_INSTALLED"] = "1"


INSTALL = {"mergekit": _install_mergekit, "peft": _install_peft, "fusion_bench": _install_fusion_bench,
           "madeup": _install_madeup}


def _record(rec: dict) -> None:
    path = os.environ.get("DPPA_COMPAT_REPORT")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")


def pytest_configure(config):
    if os.environ.get("DPPA_COMPAT_INSTALL", "1") == "1":
        # a run that silently tested the plain host would prove nothing
        INSTALL[os.environ["DPPA_COMPAT_HOST"]]()


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import constants

    folder = repo_id.replace("/", "--")
    return any(os.path.isdir(os.path.join(constants.HF_HUB_CACHE, f"{kind}--{folder}"))
               for kind in ("models", "datasets", "spaces"))


def _missing_hub_ids(item) -> list:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return [v for v in params.values() if isinstance(v, str) and HUB_ID.fullmatch(v) and not _hub_cached(v)]


def _why_unrunnable(item, listed: dict):
    if item.nodeid in listed:
        return listed[item.nodeid]
    missing = _missing_hub_ids(item)
    return f"needs {', '.join(missing)} from the model hub" if missing else None


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    listed = json.loads(os.environ.get("DPPA_COMPAT_EXCLUDED") or "{}")
    keep, unrunnable = [], []
    for item in items:
        why = _why_unrunnable(item, listed)
        (keep if why is None else unrunnable).append(item)
        if why is not None:
            _record({"id": item.nodeid, "outcome": "excluded", "at": "collection", "reason": why})
    if unrunnable:
        items[:] = keep
        config.hook.pytest_deselected(items=unrunnable)


def pytest_deselected(items):
    _record({"deselected": len(items)})


def _hub_refused(exc) -> bool:
    """Whether the hub's offline refusal is in the exception's chain."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and call.excinfo is not None and _hub_refused(call.excinfo.value):
        rep.outcome = "skipped"
        rep.longrepr = (str(item.path), item.location[1] or 0, NEEDS_DOWNLOAD)
        rep.user_properties.append(("dppa_compat", "excluded"))


def pytest_runtest_logreport(report):
    nodeid, before = report.nodeid, _outcomes.get(report.nodeid)
    if before == "failed":
        return
    if report.failed:
        now = "failed"
    elif ("dppa_compat", "excluded") in report.user_properties:
        now = "excluded"
    elif report.skipped:
        # not an assertion: the host's own outcome, recorded; an expected failure (xfail) is
        # what the host marked, a skip is rechecked without install() by the control run
        now = "xfailed" if hasattr(report, "wasxfail") else (before or "skipped")
    elif report.when == "call":
        # an unexpected pass of a host xfail counts as passing, as pytest reports it
        now = "xpassed" if hasattr(report, "wasxfail") else "passed"
    else:
        return
    _outcomes[nodeid] = now


def pytest_sessionfinish(session):
    for nodeid, outcome in _outcomes.items():
        _record({"id": nodeid, "outcome": outcome})
