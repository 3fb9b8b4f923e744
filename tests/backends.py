"""The backends a parametrized test runs on, each with the device its tensors live on.

``@pytest.mark.parametrize("backend", BACKENDS)`` then ``device = on(backend)`` runs a property on
every backend: the C++ CPU extension, the torch composition, Triton (on CPU tensors under the
interpreter, on CUDA tensors when a GPU is present) and the CUDA extension. An unavailable
backend skips with its reason (CI names the ones it builds in DPPA_REQUIRE_BACKENDS, and
tests/test_ops.py fails when one of those is missing).
"""

from __future__ import annotations

import pytest
import torch

from dppa_kernels.backends.registry import availability

BACKENDS = ["torch", "cpu", "triton", "cuda"]


def on(name: str) -> torch.device:
    """The device of ``name``'s tensors; skips the test when the backend is unavailable here."""
    ok, why = availability()[name]
    if not ok:
        # A backend this machine cannot run (cuda without a GPU); a backend CI builds is still
        # required: tests/test_ops.py fails when one named in DPPA_REQUIRE_BACKENDS is missing.
        pytest.skip(f"{name} backend not available here: {why}")
    if name == "cuda" or (name == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")
