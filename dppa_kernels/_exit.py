"""Leaving a console script: once its work is committed, without the interpreter's teardown;
after a failure nobody diagnosed, with one line (the traceback only on request)."""

from __future__ import annotations

import logging
import os
import sys
import traceback

TRACEBACK_ENV = "DPPA_TRACEBACK"


def unexpected(exc: BaseException) -> str:
    """The one-line message for an exception that is not a diagnosed input problem; with
    ``DPPA_TRACEBACK=1`` its traceback is printed to stderr first."""
    if os.environ.get(TRACEBACK_ENV, "0") == "1":
        traceback.print_exception(exc, file=sys.stderr)
    return f"unexpected {type(exc).__name__}: {exc} ({TRACEBACK_ENV}=1 shows where)"


def exit_now(code) -> None:
    """``sys.exit(code)`` minus the interpreter's teardown.

    A command returns only once everything it wrote is closed, synced and renamed into place;
    what normal exit adds is unloading torch's modules, about 0.5 s (a tenth of a 270M-parameter
    merge). ``DPPA_FULL_EXIT=1`` keeps the normal exit (for coverage tools and profilers).
    """
    if os.environ.get("DPPA_FULL_EXIT", "0") == "1":
        sys.exit(code)
    if code is None:
        code = 0
    elif not isinstance(code, int):  # sys.exit("message") semantics
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
