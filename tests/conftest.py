"""Shared test setup.

TRITON_INTERPRET must be set before triton is imported anywhere, so it is set here, at the very
top, for the whole session: on a machine without a GPU the Triton kernels then run on CPU tensors
under the interpreter (a GPU run sets TRITON_INTERPRET=0 explicitly; see README).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import realistic_delta  # noqa: E402,F401  (re-exported for tests)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
