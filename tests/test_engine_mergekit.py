"""Parity with real ``mergekit-yaml`` (0.1.5) on a tiny Llama family, same YAML through both.

Inputs are bf16; the configs set ``dtype: float32`` and ``out_dtype: bfloat16`` with dyadic
weights, so both tools' arithmetic is exact until the single final rounding. task_arithmetic
must be identical; ties/breadcrumbs may differ only at elements tied at a magnitude cut (mergekit
breaks such ties by sort order), and the count is reported.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from dppa_kernels.reference.sparsify import breadcrumbs_window
from dppa_kernels.reference.threshold import keep_count
from engine_util import cli, family, load_dir, write_config

MERGEKIT = shutil.which("mergekit-yaml") or "/work/venv/bin/mergekit-yaml"
pytestmark = pytest.mark.skipif(not os.path.exists(MERGEKIT), reason="mergekit-yaml is not installed")
W = [1.0, 0.5]


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk")
    base, fts = family(root, n_ft=2, vocab=128)
    return root, base, fts, load_dir(base), [load_dir(f) for f in fts]


def _both(root, method, per, base, fts, name):
    cfg = write_config(root / f"{name}.yaml", method, base, fts, model_params=[dict(per, weight=w) for w in W],
                       dtype="float32", out_dtype="bfloat16")
    mk = root / f"mk-{name}"
    r = subprocess.run([MERGEKIT, cfg, str(mk), "--random-seed", "0", "--quiet"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ours = root / f"ours-{name}"
    res = cli("merge", cfg, "--out", ours, "--no-progress")
    assert res.exit_code == 0, res.output
    return load_dir(mk), load_dir(ours)


def _tied(delta: torch.Tensor, cuts) -> torch.Tensor:
    """Elements whose |Δ| equals the magnitude at one of the rank cuts (descending ranks)."""
    a = delta.abs().reshape(-1)
    desc = a.sort(descending=True).values
    mask = torch.zeros_like(a, dtype=torch.bool)
    for c in cuts:
        for j in (c - 1, c):
            if 0 <= j < a.numel():
                mask |= a == desc[j]
    return mask.reshape(delta.shape)


def test_task_arithmetic_identical(fam):
    root, base, fts, *_ = fam
    mk, ours = _both(root, "task_arithmetic", {}, base, fts, "ta")
    assert set(mk) == set(ours)
    for k in mk:
        assert mk[k].dtype == ours[k].dtype == torch.bfloat16
        assert torch.equal(mk[k], ours[k]), f"task_arithmetic: {k} differs from mergekit"


@pytest.mark.parametrize("method,per", [("ties", {"density": 0.3}), ("breadcrumbs", {"density": 0.5, "gamma": 0.05}),
                                        ("breadcrumbs_ties", {"density": 0.4, "gamma": 0.1})])
def test_sparsified_methods_differ_only_at_ties(fam, method, per):
    root, base, fts, base_sd, ft_sds = fam
    mk, ours = _both(root, method, per, base, fts, method)
    assert set(mk) == set(ours)
    total_diff, total_tied = 0, 0
    for k in mk:
        diff = mk[k] != ours[k]
        if not bool(diff.any()):
            continue
        b = base_sd[k].float()
        tied = torch.zeros_like(diff)
        for ft in ft_sds:
            d = ft[k].float() - b
            n = d.numel()
            if method == "ties":
                cuts = [keep_count(n, per["density"], "min1")]
            else:
                n_top, target = breadcrumbs_window(n, per["density"], per["gamma"])
                cuts = [n_top, n_top + target]
            tied |= _tied(d, cuts)
        bad = diff & ~tied
        assert not bool(bad.any()), f"{method}: {k} differs at {int(bad.sum())} element(s) not tied at a cut"
        total_diff += int(diff.sum())
        total_tied += int(tied.sum())
    n_all = sum(v.numel() for v in mk.values())
    print(f"{method}: {total_diff} of {n_all} elements differ from mergekit, all at threshold ties "
          f"({total_tied} tied elements in the affected tensors)")
