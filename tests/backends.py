"""The backends a parametrized test runs on, each with the device its tensors live on.

``@pytest.mark.parametrize("backend", BACKENDS)`` then ``device = on(backend)`` runs a property on
every backend: the C++ CPU extension, the torch composition, Triton (on CPU tensors under the
interpreter, on CUDA tensors when a GPU is present) and the CUDA extension. An unavailable
backend skips with its reason (CI names the ones it builds in DPPA_REQUIRE_BACKENDS, and
tests/test_ops.py fails when one of those is missing).
"""

from __future__ import annotations

import os
import subprocess
import sys

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


def triton_target() -> tuple[bool, str]:
    """(interpreted, device of the tensors) for a module that tests the Triton kernels directly.

    Under TRITON_INTERPRET=1 (tests/conftest.py's default; CI's) the kernels run on CPU tensors,
    with TRITON_INTERPRET=0 compiled on CUDA tensors. Skips the calling module where triton is
    not installed, or where compiled Triton is asked for on a machine without a GPU.
    """
    # .ci/setup installs triton, so CI never skips here; a machine without it has no Triton to test
    pytest.importorskip("triton", reason="triton is not installed")
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if not interpret and not torch.cuda.is_available():
        # compiled Triton needs a GPU; CI runs these modules under the interpreter instead
        pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)
    return interpret, "cpu" if interpret else "cuda"


def assert_triton_runs(kernel) -> None:
    """A GPU-less run must exercise the interpreted kernels, not silently a fallback: the Triton
    backend is available, and ``kernel`` (a jitted kernel of the module under test) is the
    interpreter's when TRITON_INTERPRET=1."""
    from dppa_kernels.backends.triton import TritonBackend

    ok, why = TritonBackend().available()
    assert ok, why
    if os.environ.get("TRITON_INTERPRET") == "1":
        from triton.runtime.interpreter import InterpretedFunction

        assert isinstance(kernel, InterpretedFunction)


def record_launches(monkeypatch, module, kernel: str) -> list:
    """Replace the jitted Triton kernel ``module.<kernel>`` with a wrapper that appends the grid of
    each launch to the returned list, then launches the kernel."""
    launches: list = []
    real = getattr(module, kernel)

    class Spy:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    monkeypatch.setattr(module, kernel, Spy())
    return launches


def compile_check(*args: str) -> str:
    """stdout of ``python -m dppa_kernels.kernels.compile_check ARGS`` (the kernels lowered through
    triton's GPU pipeline to cubin, not interpreted; no GPU needed), asserted to succeed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "dppa_kernels.kernels.compile_check", *args], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r.stdout
