"""``compat="official"`` against a plain, sort-based transcription of the official DPPA pruning
(dynamic pruning per unit, then the two-band element-wise max), on small heavy-tailed bf16 deltas
with many ties: identical densities, masks and outputs; and what the default does differently."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dppa_kernels.dppa import DPPA
from engine_util import cli, family, load_dir, write_config

PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
HIDDEN, INTER = 24, 40


def _shape(proj: str) -> tuple:
    return {"mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
            "mlp.down_proj": (HIDDEN, INTER)}.get(proj, (HIDDEN, HIDDEN))


def _models(seed: int, n_layers: int = 4, n_ft: int = 2):
    """bf16 base and fine-tuned state dicts whose deltas are Student-t (heavy tails; bf16 rounding
    leaves many equal magnitudes), with a scale and tail weight that vary per unit."""
    g = torch.Generator().manual_seed(seed)
    base = {"model.embed_tokens.weight": torch.randn(50, HIDDEN, generator=g),
            "model.norm.weight": torch.ones(HIDDEN)}
    for i in range(n_layers):
        for proj in PROJ:
            base[f"model.layers.{i}.{proj}.weight"] = torch.randn(*_shape(proj), generator=g) * 0.05
    base = {k: v.to(torch.bfloat16) for k, v in base.items()}
    fts = []
    for _ in range(n_ft):
        ft = {}
        for k, b in base.items():
            dof = int(torch.randint(1, 5, (), generator=g))  # Student-t: z / sqrt(chi2(dof) / dof)
            chi2 = (torch.randn(dof, *b.shape, generator=g) ** 2).mean(0)
            t = torch.randn(b.shape, generator=g) / chi2.sqrt()
            scale = 1e-3 * (0.5 + float(torch.rand((), generator=g)))
            ft[k] = (b.float() + t * scale).to(torch.bfloat16)
        fts.append(ft)
    return base, fts


# -- the official procedure, written out plainly (per-element, sort-based, no histograms) ------


def _official_densities(deltas: dict, sparsity: float, lam: float, hyper_m: float) -> dict:
    """Per-unit density of the official dynamic pruning at ``sparsity`` (Llama units in block
    order). Layer ratio: share of the layer's |Δ| (all units concatenated, bf16) whose ratio to
    their bf16 mean exceeds 3; unit ratio: share of the unit's |Δ| above bf16(mean · hyper_m).
    Both in percent as Python floats. Layer offsets: centred, scaled to ±λ, plus 1 − s; unit
    offsets: divided by their mean, centred by the size-weighted mean, scaled to ±λ; added."""
    layers = sorted({int(n.split(".")[2]) for n in deltas})
    order = [f"model.layers.{i}.{p}.weight" for i in layers for p in PROJ]
    layer_ratio = []
    for i in layers:
        a = torch.cat([deltas[n].abs().flatten() for n in order if n.startswith(f"model.layers.{i}.")])
        count = ((a / torch.mean(a)) > 3).sum().item()
        layer_ratio.append(float(count) / a.numel() * 100)
    layer_ratio = np.array(layer_ratio)
    layer_ratio -= layer_ratio.mean()
    layer_ratio *= lam / np.absolute(layer_ratio).max()
    layer_ratio = layer_ratio + (1 - sparsity)
    unit_ratio, sizes, layer_part = [], [], []
    for n in order:
        a = deltas[n].abs().flatten()
        cut = torch.mean(a) * hyper_m
        unit_ratio.append(float((a > cut).sum().item()) / a.numel() * 100)
        sizes.append(a.numel())
        layer_part.append(layer_ratio[layers.index(int(n.split(".")[2]))])
    unit_ratio, sizes = np.array(unit_ratio), np.array(sizes)
    unit_ratio /= unit_ratio.mean()
    unit_ratio -= (unit_ratio * sizes).sum() / sizes.sum()
    unit_ratio *= lam / np.absolute(unit_ratio).max()
    dens = unit_ratio + layer_part
    return {n: float(d) for n, d in zip(order, dens)}


def _official_prune(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Sort |Δ| ascending, take the value at position int(N · (1 − d)) as the threshold, and zero
    every element whose magnitude is at most that threshold."""
    a = delta.abs()
    thresh = torch.sort(a.flatten())[0][int(delta.numel() * (1 - density))]
    out = delta.clone()
    out[a <= thresh] = 0
    return out


def _keep_larger(acc: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """Element-wise: take ``cand`` where its magnitude is larger, or where only it is non-zero."""
    if not bool((cand != 0).any()):
        return acc
    take = (cand.abs() > acc.abs()) | ((cand != 0) & (acc == 0))
    acc = acc.clone()
    acc[take] = cand[take]
    return acc


def _official_dppa(deltas: dict, units: list, alpha_hi: float, alpha_lo: float, lam=0.08, hyper_m=5.0) -> dict:
    """Dynamic pruning at s = 0.9 and 0.8, then, per key of the model (units and non-units, fp32),
    start from zero and keep the larger of α_lo·Δ^(0.8) and α_hi·Δ^(0.9)."""
    out = {}
    d09 = _official_densities({n: deltas[n] for n in units}, 0.9, lam, hyper_m)
    d08 = _official_densities({n: deltas[n] for n in units}, 0.8, lam, hyper_m)
    for n, d in deltas.items():
        nine = _official_prune(d, d09[n]) if n in units else d
        eight = _official_prune(d, d08[n]) if n in units else d
        acc = torch.zeros(d.shape)
        acc = _keep_larger(acc, eight.float() * alpha_lo)
        acc = _keep_larger(acc, nine.float() * alpha_hi)
        out[n] = acc
    return out, d09, d08


# -- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("alphas", [(1.8, 0.0), (1.8, 1.0), (1.3, 2.0)])
def test_official_compat_matches_the_official_procedure(seed, alphas):
    base, fts = _models(seed)
    # λ = 0.04 keeps every density in (0, 1): the official code crashes on d <= 0 (we clamp)
    d = DPPA.from_models(base, fts, compat="official", offset_lambda=0.04, backend="cpu")
    assert d.tie_mode == "gt" and d.nonunit_mode == "official"
    got = d.apply(alphas)
    units = sorted(d.units)
    for i, ft in enumerate(fts):
        deltas = {n: ft[n] - base[n] for n in base}  # bf16, as the official pipeline stores them
        want, d09, d08 = _official_dppa(deltas, units, *alphas, lam=0.04)
        for n in units:  # the allocation: bit for bit
            assert d.allocations[i].densities[n] == [d09[n], d08[n]], n
        for n in deltas:
            assert torch.equal(got[i][n] != 0, want[n] != 0), (seed, i, n)
            assert torch.equal(got[i][n], want[n].to(torch.bfloat16)), (seed, i, n)


def test_fast_backends_and_reference_agree_under_official():
    base, fts = _models(3)
    outs = [DPPA.from_models(base, fts, compat="official", backend=be).apply((1.8, 1.0)) for be in ("cpu", "torch")]
    for a, b in zip(*outs):
        for n in a:
            assert torch.equal(a[n], b[n]), n


def test_official_ties_undershoot_and_exact_k_does_not():
    """gt prunes every tie at τ (official); the default exact_k keeps each level's count."""
    base, fts = _models(4)
    off = DPPA.from_models(base, fts, compat="official")
    dflt = DPPA.from_models(base, fts, nonunit_mode="official")
    assert dflt.tie_mode == "exact_k"
    assert all(r < 0.2 for r in off.realised_density((1.0, 1.0)))
    assert all(abs(r - 0.2) < 2e-3 for r in dflt.realised_density((1.0, 1.0)))


def test_density_one_prunes_the_minima_only_under_official():
    base, fts = _models(5)
    base = {k: torch.zeros_like(v) for k, v in base.items()}  # deltas without zeros: the minima are real
    fts = [{k: torch.where(v == 0, torch.full_like(v, 1e-4), v) for k, v in ft.items()} for ft in fts]
    kw = dict(densities=(1.0,), offset_lambda=0.0)
    off = DPPA.from_models(base, fts, compat="official", **kw).apply((1.0,))
    gt = DPPA.from_models(base, fts, tie_mode="gt", **kw).apply((1.0,))
    for i, ft in enumerate(fts):
        for n in off[i]:
            if ".layers." not in n:
                continue
            delta = ft[n] - base[n]
            assert torch.equal(off[i][n], _official_prune(delta, 1.0)), n
            assert bool((off[i][n] == 0).sum() > (delta == 0).sum()), n  # the minima went
            assert torch.equal(gt[i][n], delta), n  # density 1 is the identity


def test_official_changes_the_allocation_arithmetic():
    """Official ratios are plain count ratios (never rounded to bf16); the bit-exact match of the
    official densities is checked above."""
    base, fts = _models(6, n_layers=6)
    off = DPPA.from_models(base, fts, compat="official").allocations[0]
    dflt = DPPA.from_models(base, fts).allocations[0]
    assert off.layer_ratio.keys() == dflt.layer_ratio.keys()
    assert all(isinstance(v, float) for v in off.layer_ratio.values())
    # the official ratio is a count ratio, not rounded to bf16: an exact multiple of 100 / N
    n_layer = HIDDEN * HIDDEN * 4 + HIDDEN * INTER * 3
    for v in off.layer_ratio.values():
        assert round(v * n_layer / 100) == pytest.approx(v * n_layer / 100, abs=1e-6)


def test_official_refuses_contradicting_settings():
    base, fts = _models(7, n_layers=2, n_ft=1)
    for kw in ({"tie_mode": "exact_k"}, {"nonunit_mode": "dense"}, {"stats_dtype": "float16"},
               {"band_combine": "direct"}):
        with pytest.raises(ValueError, match="compat official needs " + next(iter(kw))):
            DPPA.from_models(base, fts, compat="official", **kw)
    DPPA.from_models(base, fts, compat="official", tie_mode="gt", stats_dtype="bf16")  # agreeing: fine
    with pytest.raises(ValueError, match="compat must be"):
        DPPA.from_models(base, fts, compat="offical")


def test_engine_official_writes_what_the_api_does(tmp_path):
    base, fts = family(tmp_path / "fam", n_ft=2, hidden=48, inter=96)
    params = [{"weight": 1.0, "alphas": [1.8, 1.0]}, {"weight": 1.0, "alphas": [1.5, 0.0]}]
    cfg = write_config(tmp_path / "off.yaml", "dppa", base, fts, params={"compat": "official"}, model_params=params)
    r = cli("merge", cfg, "--out", tmp_path / "out", "--no-progress")
    assert r.exit_code == 0, r.output
    merged = load_dir(tmp_path / "out")
    want = DPPA.from_folders(base, fts, compat="official").merge([p["alphas"] for p in params])
    for k in want:
        assert torch.equal(merged[k], want[k]), k
    rep = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert all(v < 0.2 for v in rep["realised_density"].values())  # gt: every tie at τ pruned
    bad = write_config(tmp_path / "bad.yaml", "dppa", base, fts, params={"compat": "official", "tie_mode": "exact_k"})
    r = cli("merge", bad, "--out", tmp_path / "bad", "--no-progress")
    assert r.exit_code != 0 and "compat official needs tie_mode" in r.output


# -- Δ is the models' bf16 difference under compat official, whatever the working dtype --------


def _bf16_family(tmp_path, base: dict, fts: list) -> tuple:
    """``base`` and ``fts`` (bf16 state dicts) written as Llama folders."""
    from dppa_kernels.engine.synth import llama_config, write_model

    cfg = llama_config(HIDDEN, 1 + max(int(n.split(".")[2]) for n in base if ".layers." in n), INTER, 50)
    dirs = [write_model(str(tmp_path / f"m{i}"), sd, cfg) for i, sd in enumerate([base, *fts])]
    return dirs[0], dirs[1:]


def test_official_rounds_the_delta_to_bf16_in_a_wider_working_dtype():
    """bf16 models merged in fp32: compat official prunes and scales the bf16 difference (the
    transcription's fp32 outputs exactly); the default keeps the fp32 difference unrounded."""
    base, fts = _models(8)
    alphas = (1.8, 1.0)
    off = DPPA.from_models(base, fts, compat="official", offset_lambda=0.04, dtype=torch.float32, backend="cpu")
    dflt = DPPA.from_models(base, fts, offset_lambda=0.04, dtype=torch.float32, backend="cpu")
    got = off.apply(alphas)
    for i, ft in enumerate(fts):
        official = {n: ft[n] - base[n] for n in base}  # bf16, as the official pipeline forms it
        exact = {n: ft[n].float() - base[n].float() for n in base}
        for n in base:
            assert off.deltas[i][n].dtype == torch.float32 and torch.equal(off.deltas[i][n], official[n].float()), n
            assert torch.equal(dflt.deltas[i][n], exact[n]), n
        want, _, _ = _official_dppa(official, sorted(off.units), *alphas, lam=0.04)
        for n in base:
            assert torch.equal(got[i][n], want[n]), (i, n)
        # the rounding matters: the heavy-tailed survivors lose low bits (a few % of all elements)
        kept_rounded = sum(int(((want[n] != 0) & (official[n].float() != exact[n])).sum()) for n in base)
        assert kept_rounded > 100, kept_rounded


@pytest.mark.parametrize("compat", ["official", "none"])
def test_engine_rounds_the_delta_like_the_official_code_only_under_official(tmp_path, compat):
    """``dppa merge`` of bf16 folders with ``dtype: float32``: under compat official the merge is
    base + the transcription's pruned bf16 Δ (one model, exact in fp32); the default merges the
    unrounded difference (the API's merge with the same settings, byte for byte)."""
    base, fts = _models(9, n_ft=1)
    base_dir, ft_dirs = _bf16_family(tmp_path, base, fts)
    params = {"offset_lambda": 0.04, "compat": compat}
    cfg = write_config(tmp_path / "c.yaml", "dppa", base_dir, ft_dirs, params=params,
                       model_params=[{"weight": 1.0, "alphas": [1.8, 1.0]}], dtype="float32")
    r = cli("merge", cfg, "--out", tmp_path / "out", "--no-progress")
    assert r.exit_code == 0, r.output
    merged = load_dir(tmp_path / "out")
    api = DPPA.from_models(base, fts, offset_lambda=0.04, compat=None if compat == "none" else compat,
                           dtype=torch.float32).merge((1.8, 1.0))
    for n in base:
        assert merged[n].dtype == torch.float32, n
        assert torch.equal(merged[n].view(torch.int32), api[n].view(torch.int32)), n
    if compat == "official":
        units = sorted(DPPA.from_models(base, fts).units)
        want, _, _ = _official_dppa({n: fts[0][n] - base[n] for n in base}, units, 1.8, 1.0, lam=0.04)
        for n in base:
            assert torch.equal(merged[n], base[n].float() + want[n]), n
