"""One-launch exact selects of many small tensors (``kernels.select_many``) vs the reference.

Under ``TRITON_INTERPRET=1`` the kernel runs on CPU tensors; with ``TRITON_INTERPRET=0`` on a GPU
machine the same tests run on CUDA tensors.
"""

import pytest
import torch
from backends import record_launches, triton_target
from helpers import DTYPE_IDS, DTYPES, quantised_delta, realistic_delta

from dppa_kernels.backends.base import NonFiniteInput
from dppa_kernels.reference.threshold import magnitude_threshold_ref

INTERPRET, DEVICE = triton_target()

from dppa_kernels.backends.triton import TritonBackend  # noqa: E402
from dppa_kernels.kernels import select_many as kmany  # noqa: E402

BE = TritonBackend()


def _tensors(dtype):
    """Odd sizes (empty and one element included), heavy ties, an all-zero tensor, realistic deltas."""
    xs = [realistic_delta((n,), dtype, sigma=1e-3) for n in (1, 2, 7, 129, 4097)]
    xs += [torch.zeros(0, dtype=dtype), torch.zeros(300, dtype=dtype), quantised_delta((33, 9), dtype, levels=3),
           realistic_delta((17, 5, 3), dtype, sigma=2e-2), torch.full((64,), 0.5, dtype=dtype)]
    return xs


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("key_dtype", [None, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_select_many_matches_reference(dtype, key_dtype):
    xs = _tensors(dtype)
    for densities in ((0.0,) * len(xs), (1e-4,) * len(xs), (1.0,) * len(xs),
                      [0.05 + 0.09 * i for i in range(len(xs))]):
        refs = [magnitude_threshold_ref(x, d, key_dtype=key_dtype) for x, d in zip(xs, densities)]
        ks = [int(r["k"].reshape(-1)[0]) if x.numel() else 0 for r, x in zip(refs, xs)]
        tau, above, eq = BE.select_many([x.to(DEVICE) for x in xs], ks, key_dtype)
        for i, (x, r) in enumerate(zip(xs, refs)):
            if x.numel() == 0:
                nbits = 31 if (key_dtype or dtype) == torch.float32 else 15
                assert (int(tau[i]), int(above[i]), int(eq[i])) == (1 << nbits, 0, 0)
                continue
            want = tuple(int(r[k].reshape(-1)[0]) for k in ("tau_key", "c_above", "c_eq"))
            assert (int(tau[i]), int(above[i]), int(eq[i])) == want, (i, densities[i])


def test_select_many_is_one_launch_for_many_tensors(monkeypatch):
    launches = record_launches(monkeypatch, kmany, "_select_many_kernel")
    g = torch.Generator().manual_seed(3)
    xs = [realistic_delta((int(n),), torch.bfloat16, sigma=1e-3, seed=int(n))
          for n in torch.randint(1, 200, (300,), generator=g)]
    ks = [x.numel() // 3 for x in xs]
    tau, above, eq = BE.select_many([x.to(DEVICE) for x in xs], ks, None)
    assert launches == [(300,)]
    for i in (0, 17, 150, 299):
        one = BE.select(xs[i].to(DEVICE), torch.tensor([ks[i]]), "tensor", None, None)
        assert (int(tau[i]), int(above[i]), int(eq[i])) == tuple(int(v[0]) for v in one)


def test_select_many_reports_nonfinite_tensors():
    xs = [realistic_delta((50,), torch.float32, sigma=1e-3) for _ in range(4)]
    xs[1][3] = float("nan")
    xs[3][0] = float("-inf")
    with pytest.raises(NonFiniteInput) as exc:
        BE.select_many([x.to(DEVICE) for x in xs], [0, 5, 5, 50], None, check_finite=True)
    assert exc.value.inputs == (1, 3)
    BE.select_many([x.to(DEVICE) for x in xs], [0, 5, 5, 50], None)  # unchecked: no error


def test_select_many_bad_input():
    x = torch.zeros(8, device=DEVICE)
    with pytest.raises(ValueError, match="ks has 1 counts"):
        kmany.select_many([x, x], [1])
    with pytest.raises(ValueError, match=r"xs\[1\] must be contiguous"):
        kmany.select_many([x, x.to(torch.bfloat16)], [1, 1])
    with pytest.raises(ValueError, match=r"xs\[0\] must be contiguous"):
        kmany.select_many([torch.zeros(4, 4, device=DEVICE).t()], [1])
    assert BE.select_many([], [], None)[0].numel() == 0
