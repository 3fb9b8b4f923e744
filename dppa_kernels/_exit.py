"""Leaving a console script once its work is committed, without the interpreter's teardown."""

from __future__ import annotations

import logging
import os
import sys


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
