"""DPPA through ``dppa merge``: the default keeps the outer density, the report counts the plans
the merge applied (row partitions included), the allocation summary, and parity with the API."""

from __future__ import annotations

import json

import pytest
import torch

from dppa_kernels import reference as R
from dppa_kernels.dppa import DPPA
from dppa_kernels.spec import SparsifySpec
from engine_util import cli, deltas_of, family, load_dir, write_config


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("dppa_engine")
    base, fts = family(root / "fam", n_ft=2, hidden=48, inter=96)
    return root, base, fts


def _merge(fam, tmp_path, name, params=None, model_params=None):
    root, base, fts = fam
    cfg = write_config(tmp_path / f"{name}.yaml", "dppa", base, fts, params=params, model_params=model_params)
    out = tmp_path / name
    r = cli("merge", cfg, "--out", out, "--no-progress")
    assert r.exit_code == 0, r.output
    return json.loads((out / "merge_report.json").read_text()), load_dir(out)


def test_default_realises_the_outer_density(fam, tmp_path):
    rep, _ = _merge(fam, tmp_path, "default")
    for label, got in rep["realised_density"].items():
        assert abs(got - 0.2) < 0.01 * 0.2, (label, got)
    for m in rep["dppa"]["models"]:
        assert m["levels"] == [0.1, 0.2] and len(m["mean_density"]) == 2 and "clamped" in m


def test_row_partition_report_counts_the_written_plans(fam, tmp_path):
    """The report's realised density is what the merge applied, not a tensor-level estimate."""
    root, base, fts = fam
    rep, _ = _merge(fam, tmp_path, "row", params={"partition": "row", "tie_mode": "gt"},
                    model_params=[{"weight": 1.0, "alphas": [1.8, 1.0]}] * 2)
    base_sd, ft_sds = load_dir(base), [load_dir(f) for f in fts]
    units = [n for n, row in rep["tensors"].items() if "thresholds" in row]
    assert units
    num, den = [0, 0], 0
    for name in units:
        row = rep["tensors"][name]
        _, ds = deltas_of(base_sd, ft_sds, name)
        for i, d in enumerate(ds):
            spec = SparsifySpec("bands", densities=tuple(row["target"][i]), alphas=(1.8, 1.0), partition="row",
                                tie_mode="gt", count_rule="dppa", key_dtype=torch.bfloat16)
            kept = int((R.sparsify_factor(d, spec) != 0).sum())
            assert row["realised"][i] == pytest.approx(kept / d.numel(), abs=0), (name, i)
            num[i] += kept
        den += ds[0].numel()
    for i, label in enumerate(rep["realised_density"]):
        assert rep["realised_density"][label] == pytest.approx(num[i] / den, rel=1e-12)


def test_engine_and_api_write_the_same_merge(fam, tmp_path):
    root, base, fts = fam
    params = [{"weight": 1.0, "alphas": [2.0, 0.5]}, {"weight": 0.6, "alphas": [1.5, 1.0]}]
    _, merged = _merge(fam, tmp_path, "api", params={"lambda": 0.8}, model_params=params)
    d = DPPA.from_folders(base, fts)
    want = d.merge([p["alphas"] for p in params], weights=[1.0, 0.6], lam=0.8)
    assert merged.keys() == want.keys()
    for k in want:
        assert torch.equal(merged[k], want[k]), k


def test_renormalize_in_the_config(fam, tmp_path):
    args = dict(params={"offset_lambda": 0.3, "density_renormalize": True},
                model_params=[{"weight": 1.0, "densities": [0.05, 0.1]}] * 2)
    rep, _ = _merge(fam, tmp_path, "renorm", **args)
    for m in rep["dppa"]["models"]:
        assert m["clamped"] > 0 and m["mean_density"] == pytest.approx([0.05, 0.1], abs=1e-9)


def test_alphas_preset_names_in_the_config(fam, tmp_path):
    """``alphas: NAME`` (per model over global) merges like the preset's factors; an unknown name
    is one error line naming the key, the value and the presets, and nothing is written."""
    root, base, fts = fam
    rep, named = _merge(fam, tmp_path, "named", params={"alphas": "top_only"},
                        model_params=[{"weight": 1.0, "alphas": "amplified"}, {"weight": 0.6}])
    _, explicit = _merge(fam, tmp_path, "explicit", model_params=[{"weight": 1.0, "alphas": [1.8, 1.0]},
                                                                  {"weight": 0.6, "alphas": [1.0, 0.0]}])
    assert named.keys() == explicit.keys() and all(torch.equal(named[k], explicit[k]) for k in named)
    realised = list(rep["realised_density"].values())
    # amplified keeps the outer level, top_only the inner one (raised a little by the clamped units)
    assert realised[0] == pytest.approx(0.2, rel=0.01) and realised[1] == pytest.approx(0.1, abs=0.01)
    for where in ({"params": {"alphas": "amplfied"}}, {"model_params": [{"alphas": "amplfied"}, {}]}):
        cfg = write_config(tmp_path / "bad.yaml", "dppa", base, fts, **where)
        r = cli("merge", cfg, "--out", tmp_path / "bad", "--no-progress")
        lines = r.output.strip().splitlines()
        assert r.exit_code != 0 and len(lines) == 1 and lines[0].startswith("error: "), r.output
        assert "alphas: unknown preset 'amplfied'; valid: plain, top_only, official_start, amplified" in lines[0]
        assert not (tmp_path / "bad").exists()
