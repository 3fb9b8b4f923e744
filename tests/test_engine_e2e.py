"""End to end: ``dppa merge`` on a tiny synthetic family equals the in-memory reference merge,
tensor by tensor, for every method; byte-identical across backends; layout, side files, report."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dppa_kernels import dp_densities, merge_deltas
from dppa_kernels.backends.registry import availability
from dppa_kernels.reference.naming import group_units
from engine_util import cli, deltas_of, dir_digest, family, load_dir, tree_state, write_config

W = [1.0, 0.5, 0.75]
CASES = {
    "task_arithmetic": ({"lambda": 0.9}, {}),
    "ties": ({}, {"density": 0.3}),
    "dare_ties": ({}, {"density": 0.4}),
    "dare_linear": ({}, {"density": 0.5}),
    "breadcrumbs": ({}, {"density": 0.5, "gamma": 0.05}),
    "breadcrumbs_ties": ({}, {"density": 0.5, "gamma": 0.05}),
    "della": ({}, {"density": 0.4, "epsilon": 0.1}),
    "della_linear": ({}, {"density": 0.4, "epsilon": 0.1}),
    "dppa": ({"offset_lambda": 0.05}, {"densities": [0.1, 0.2], "alphas": [1.8, 1.0]}),
    "dppa_ties": ({"nonunit_mode": "dense"}, {"densities": [0.3], "alphas": [1.5]}),
}
BACKENDS = [b for b in ("reference", "torch", "cpu") if availability()[b][0]]


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("fam")
    base, fts = family(root)
    return base, fts, load_dir(base), [load_dir(f) for f in fts]


def expected_merge(method, glob, per, base_sd, ft_sds, seed, backend="reference"):
    """The in-memory reference merge of every tensor (no engine code involved)."""
    n = len(ft_sds)
    lists = {k: [v] * n for k, v in per.items()}
    lists["weight"] = W
    out = {}
    if method.startswith("dppa"):
        units = group_units({k: tuple(v.shape) for k, v in base_sd.items()})
        levels = per["densities"]
        allocs = []
        for i in range(n):
            stats = {u: deltas_of(base_sd, [ft_sds[i]], u)[1][0] for u in units}
            allocs.append(dp_densities(stats, densities=levels, offset_lambda=glob.get("offset_lambda", 0.08),
                                       backend=backend))
    for name in base_sd:
        b, ds = deltas_of(base_sd, ft_sds, name)
        if method.startswith("dppa"):
            if name in units:
                out[name] = merge_deltas(ds, b, method=method, weight=W, alphas=[per["alphas"]] * n,
                                         densities=[allocs[i].densities[name] for i in range(n)], backend=backend)
            else:  # nonunit_mode dense: the unpruned deltas through the same combiner
                out[name] = merge_deltas(ds, b, method="task_arithmetic" if method == "dppa" else "ties",
                                         weight=W, density=1.0, backend=backend)
        else:
            kw = {k: v for k, v in glob.items()}
            kw.update(lists)
            out[name] = merge_deltas(ds, b, method=method, seed=seed, name=name, backend=backend, **kw)
    return out


@pytest.mark.parametrize("method", list(CASES))
def test_cli_equals_reference_on_every_backend(fam, tmp_path, method):
    base, fts, base_sd, ft_sds = fam
    glob, per = CASES[method]
    cfg = write_config(tmp_path / "c.yaml", method, base, fts, params=glob,
                       model_params=[dict(per, weight=w) for w in W])
    before = tree_state(os.path.dirname(base))
    digests = {}
    for be in BACKENDS:
        out = tmp_path / f"out-{be}"
        r = cli("merge", cfg, "--out", out, "--backend", be, "--seed", 7, "--no-progress")
        assert r.exit_code == 0, r.output
        digests[be] = dir_digest(out)
    assert tree_state(os.path.dirname(base)) == before, "inputs were modified"
    fast = [b for b in BACKENDS if b != "reference"]
    assert all(digests[b] == digests[fast[0]] for b in fast), f"fast backends differ: {digests}"
    outs = {be: load_dir(tmp_path / f"out-{be}") for be in BACKENDS}
    for be in BACKENDS:  # the engine adds nothing: equal to the in-memory merge on the same backend
        want = expected_merge(method, glob, per, base_sd, ft_sds, seed=7, backend=be)
        got = outs[be]
        assert set(got) == set(want)
        for name in want:
            assert got[name].dtype == want[name].dtype, name
            assert torch.equal(got[name], want[name]), f"{method} [{be}]: tensor {name} differs from merge_deltas"
    # The float64 reference rounds once; the fast backends accumulate in float32, so a value within
    # float32 error of a bf16 rounding midpoint may land one ulp apart (rare; counted here).
    ref, other = outs["reference"], outs[fast[0]]
    n_diff = sum(int((ref[k] != other[k]).sum()) for k in ref)
    n_all = sum(v.numel() for v in ref.values())
    for k in ref:
        d = (ref[k].float() - other[k].float()).abs()
        ulp = (torch.nextafter(ref[k], torch.full_like(ref[k], float("inf"))).float() - ref[k].float()).abs()
        assert bool((d <= ulp * 1.01 + 1e-30).all()), f"{method}: {k} differs by more than one ulp"
    assert n_diff <= max(2, n_all // 1000), f"{method}: {n_diff} of {n_all} elements differ reference vs fast"
    print(f"{method}: reference vs {fast[0]}: {n_diff} of {n_all} elements one ulp apart")


def test_layout_side_files_and_report(fam, tmp_path):
    base, fts, base_sd, _ = fam
    cfg = write_config(tmp_path / "c.yaml", "dppa", base, fts)
    out = tmp_path / "out"
    r = cli("merge", cfg, "--out", out, "--out-shard-size", "20K", "--dtype", "float32", "--no-progress")
    assert r.exit_code == 0, r.output
    files = set(os.listdir(out))
    index = json.load(open(out / "model.safetensors.index.json"))
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n > 1 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"]) == set(base_sd)
    assert {"config.json", "generation_config.json", "tokenizer_config.json", "mergekit_config.yml",
            "merge_report.json"} <= files
    assert not any(f.endswith((".partial", ".tmp")) or f.startswith("journal") for f in files)
    assert json.load(open(out / "config.json"))["torch_dtype"] == "float32"
    got = load_dir(out)
    assert all(t.dtype == torch.float32 for t in got.values())
    rep = json.load(open(out / "merge_report.json"))
    assert rep["method"] == "dppa" and rep["backend"] and rep["device"] == "cpu"
    assert {"plan_s", "phase1_s", "allocation_s", "merge_s", "total_s"} <= set(rep["timings"])
    unit = "model.layers.1.mlp.down_proj.weight"
    row = rep["tensors"][unit]
    assert len(row["target"]) == 3 and len(row["target"][0]) == 2 and len(row["thresholds"][0]) == 2
    assert row["thresholds"][0][0] >= row["thresholds"][0][1] > 0  # nested bands: τ(0.1) ≥ τ(0.2)
    assert all(0.0 <= r_ < 0.3 for r_ in row["realised"]) and 0.0 < sum(rep["realised_density"].values()) / 3 < 0.3
    for m in rep["dppa"]["models"]:
        assert m["levels"] == [0.1, 0.2] and m["layer_offset"]
    assert rep["realised_density_scope"] == "units"


def test_gradients_filters_and_precedence(fam, tmp_path):
    """weight gradient over depth, a filtered density, per-model over global."""
    base, fts, base_sd, ft_sds = fam
    params = {"density": [{"filter": "mlp", "value": 0.2}, {"value": 0.6}], "weight": [0.5, 1.0]}
    cfg = write_config(tmp_path / "c.yaml", "ties", base, fts, params=params,
                       model_params=[{}, {}, {"weight": 2.0}])
    out = tmp_path / "out"
    assert cli("merge", cfg, "--out", out, "--backend", "torch", "--no-progress").exit_code == 0
    got = load_dir(out)
    for name, layer in (("model.layers.0.mlp.up_proj.weight", 0), ("model.layers.1.self_attn.q_proj.weight", 1),
                        ("model.embed_tokens.weight", None)):
        t = 0.0 if layer is None else layer / 1  # 2 layers: t = layer / (L - 1)
        w = 0.5 + 0.5 * t
        d = 0.2 if "mlp" in name else 0.6
        b, ds = deltas_of(base_sd, ft_sds, name)
        want = merge_deltas(ds, b, method="ties", weight=[w, w, 2.0], density=[d] * 3, backend="reference")
        assert torch.equal(got[name], want), name


def test_dppa_resident_equals_streamed_and_nonunit_modes(fam, tmp_path):
    base, fts, base_sd, ft_sds = fam
    digests = {}
    for resident in ("on", "off"):
        cfg = write_config(tmp_path / "c.yaml", "dppa", base, fts)
        out = tmp_path / f"out-{resident}"
        assert cli("merge", cfg, "--out", out, "--resident", resident, "--no-progress").exit_code == 0
        digests[resident] = dir_digest(out)
        assert json.load(open(out / "merge_report.json"))["dppa"]["resident"] == (resident == "on")
    assert digests["on"] == digests["off"]
    emb = "model.embed_tokens.weight"
    b, ds = deltas_of(base_sd, ft_sds, emb)
    res = {}
    for mode in ("base", "official", "prune"):
        cfg = write_config(tmp_path / f"{mode}.yaml", "dppa", base, fts, params={"nonunit_mode": mode, "alphas": [1.8, 0.0]})
        out = tmp_path / f"nu-{mode}"
        assert cli("merge", cfg, "--out", out, "--no-progress").exit_code == 0
        res[mode] = load_dir(out)[emb]
    assert torch.equal(res["base"], b)
    official = (b.double() + 1.8 * sum(d.double() for d in ds)).to(b.dtype)
    assert torch.equal(res["official"], official)
    want = merge_deltas(ds, b, method="dppa", densities=[[0.1, 0.2]] * 3, alphas=[[1.8, 0.0]] * 3, backend="reference")
    assert torch.equal(res["prune"], want)


def test_demo_runs_from_module(tmp_path):
    from engine_util import cli_subprocess

    r = cli_subprocess("demo", timeout=180)
    assert r.returncode == 0, r.stderr
    lines = [ln.split() for ln in r.stdout.splitlines()]
    rows = {ln[0]: ln for ln in lines if ln and ln[0] in ("dppa", "ties", "dare_ties")}
    assert set(rows) == {"dppa", "ties", "dare_ties"}
    assert abs(float(rows["ties"][1]) - 0.2) < 1e-3
    assert abs(float(rows["dppa"][1]) - 0.2) < 0.01 * 0.2  # default alphas: the outer level, within 1 %
