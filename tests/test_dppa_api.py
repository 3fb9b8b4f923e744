"""The whole-model DPPA API: statistics once, apply/merge equal to the public ops, the counts, the
allocation summary, and bad input."""

from __future__ import annotations

import warnings

import pytest
import torch

import dppa_kernels as dk
from dppa_kernels import reference as R
from dppa_kernels.backends import registry
from dppa_kernels.dppa import DPPA, PRESETS, default_alphas, stats
from dppa_kernels.engine.synth import llama_shapes
from dppa_kernels.methods import DPPA_DEFAULTS
from engine_util import family, load_dir

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _family(dtype=torch.bfloat16, m=2, seed=0, device="cpu", layers=3):
    """Base + m fine-tuned state dicts with heavy-tailed deltas, odd shapes, one int buffer."""
    g = torch.Generator().manual_seed(seed)
    base, fts = {}, [{} for _ in range(m)]
    for n, sh in llama_shapes(40, layers, 72, 50):
        b = (0.02 * torch.randn(sh, generator=g)).to(dtype)
        base[n] = b.to(device)
        for j, ft in enumerate(fts):
            scale = 1e-3 * (1 + j) * float(torch.rand((), generator=g) + 0.5)
            d = scale * torch.randn(sh, generator=g) * torch.randn(sh, generator=g).mul(0.8).exp()
            ft[n] = (b.float() + d).to(dtype).to(device)
    base["model.buffer_ids"] = torch.arange(5, device=device)
    for ft in fts:
        ft["model.buffer_ids"] = torch.arange(5, device=device)
    return base, fts


def _quiet():
    c = warnings.catch_warnings()
    c.__enter__()
    warnings.simplefilter("ignore")
    return c


COMBINES = {"sum": ("dppa", {}), "ties": ("dppa_ties", {}), "mean": ("dppa", {"normalize": True})}


def _public_merge(d, base, alphas, combine, weights, lam) -> dict:
    """What ``d.merge`` must return, tensor by tensor from the public ``merge_deltas`` (floating
    tensors only; units at their allocated densities, non-units dense)."""
    method, extra = COMBINES[combine]
    al = d.alphas_of(alphas)
    out = {}
    for name, b in base.items():
        if not b.is_floating_point():
            continue
        ds = [d.deltas[i][name] for i in range(d.m)]
        if name in d.units:
            dens = [tuple(d.allocations[i].densities[name]) for i in range(d.m)]
            out[name] = dk.merge_deltas(ds, b, method=method, weight=weights, densities=dens, alphas=al,
                                        **{"lambda": lam}, **extra)
        else:  # nonunit_mode dense: Δ × 1
            out[name] = dk.merge_deltas(ds, b, method="ties" if combine == "ties" else "task_arithmetic",
                                        weight=weights, density=1.0, **{"lambda": lam}, normalize=combine != "sum")
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (so that -0.0 and 0.0, and NaN payloads, count as different)."""
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype]) \
        if t.is_floating_point() else t


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_apply_and_merge_equal_the_public_ops(dtype, device):
    base, fts = _family(dtype, device=device)
    before = [{k: v.clone() for k, v in sd.items()} for sd in [base, *fts]]
    d = DPPA.from_models(base, fts, densities=[(0.1, 0.2), (0.15, 0.3)], offset_lambda=0.05)
    alphas = [(1.8, 1.0), (2.0, 0.5)]
    pruned = d.apply(alphas)
    c = _quiet()
    try:
        for name in d.units:
            for i in range(2):
                want = dk.prune(d.deltas[i][name], "bands", densities=tuple(d.allocations[i].densities[name]),
                                alphas=alphas[i], key_dtype=torch.bfloat16, tie_mode=d.tie_mode)
                assert torch.equal(pruned[i][name], want), (name, i)
        for combine in COMBINES:
            merged = d.merge(alphas, combine=combine, weights=[1.0, 0.7], lam=0.9)
            want = _public_merge(d, base, alphas, combine, [1.0, 0.7], 0.9)
            for name, b in base.items():
                if not b.is_floating_point():
                    assert merged[name] is base[name]
                    continue
                assert torch.equal(merged[name], want[name]), (combine, name)
    finally:
        c.__exit__(None, None, None)
    for sd, old in zip([base, *fts], before):  # inputs untouched
        assert all(torch.equal(sd[k], old[k]) for k in old)


def test_only_the_apply_pass_runs_per_call(monkeypatch):
    base, fts = _family()
    calls = {"hist": 0, "select": 0}
    real_hist = stats.unit_histogram

    def counted_hist(*a, **k):
        calls["hist"] += 1
        return real_hist(*a, **k)
    monkeypatch.setattr(stats, "unit_histogram", counted_hist)
    d = DPPA.from_models(base, fts)
    assert calls["hist"] == len(d.units) * 2 and d.stats_passes == 1
    be = registry.get_backend(d.backend)
    for prim in ("select", "histogram"):
        real = getattr(be, prim)

        def counted(*a, _real=real, **k):
            calls["select"] += 1
            return _real(*a, **k)
        monkeypatch.setattr(be, prim, counted)
    calls["hist"] = 0
    for a in ((1.8, 0.0), (1.5, 1.2), "amplified", None):
        d.apply(a)
        d.merge(a, combine="ties")
    d.search(lambda sd: float(sd["model.layers.0.mlp.up_proj.weight"].float().sum()), max_evals=5)
    assert calls == {"hist": 0, "select": 0} and d.stats_passes == 1


def test_realised_density_is_what_apply_keeps():
    base, fts = _family()
    d = DPPA.from_models(base, fts)
    for a in (None, "official_start", "amplified", (0.0, 1.0)):
        pruned = d.apply(a)
        for i, got in enumerate(d.realised_density(a)):
            kept = sum(int(torch.count_nonzero(pruned[i][n])) for n in d.units)
            nonzero = sum(int(torch.count_nonzero(d.deltas[i][n])) for n in d.units)
            total = sum(d.deltas[i][n].numel() for n in d.units)
            assert kept == pytest.approx(got * total, abs=total - nonzero)  # zero deltas stay zero


def test_default_keeps_the_outer_density_at_factor_one():
    base, fts = _family()
    d = DPPA.from_models(base, fts)
    assert default_alphas(2) == (1.0, 1.0) == tuple(DPPA_DEFAULTS["alphas"])
    for name in d.units:
        delta, out = d.deltas[0][name], d.apply()[0][name]
        kept = out != 0
        assert torch.equal(out[kept], delta[kept])  # factor 1: kept values unchanged
    total = sum(d.deltas[0][n].numel() for n in d.units)
    for s, r in zip(d.summary, d.realised_density()):
        assert s["mean_density"][1] == pytest.approx(0.2, abs=1e-12)  # the outer level is not clamped here
        assert r == pytest.approx(0.2, abs=len(d.units) / total)  # exact_k: each unit keeps its count
    gt = DPPA.from_models(base, fts, tie_mode="gt")  # the official rule prunes every tie at τ
    assert all(g < r for g, r in zip(gt.realised_density(), d.realised_density()))
    assert set(PRESETS) >= {"plain", "top_only", "official_start", "amplified"}
    assert d.alphas_of("official_start") == [(1.8, 0.0)] * 2


def test_renormalize_makes_the_mean_exact_after_clamping():
    base, fts = _family(layers=4)
    plain = DPPA.from_models(base, fts, densities=(0.05, 0.1), offset_lambda=0.3)
    renorm = DPPA.from_models(base, fts, densities=(0.05, 0.1), offset_lambda=0.3, renormalize=True)
    assert all(s["clamped"] for s in plain.summary)
    assert any(abs(m - lv) > 1e-4 for s in plain.summary for m, lv in zip(s["mean_density"], s["levels"]))
    for s in renorm.summary:
        assert s["mean_density"] == pytest.approx(s["levels"], abs=1e-9)
    for a in renorm.allocations:  # still nested and inside the clamp
        assert all(0.0 <= lo <= hi <= 1.0 for lo, hi in a.densities.values())


def test_from_folders_equals_from_models(tmp_path):
    base_dir, ft_dirs = family(tmp_path / "fam", n_ft=2)
    a = DPPA.from_folders(base_dir, ft_dirs)
    b = DPPA.from_models(load_dir(base_dir), [load_dir(p) for p in ft_dirs])
    ma, mb = a.merge("amplified"), b.merge("amplified")
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert a.labels == [str(p) for p in ft_dirs]


def test_from_hf_modules():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, vocab_size=40)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    ft = transformers.LlamaForCausalLM(cfg)
    ft.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    d = DPPA.from_hf(base, [ft])
    assert d.module is base and len(d.units) == 14
    merged = d.merge()
    assert set(merged) == set(base.state_dict())


def test_bad_input():
    base, fts = _family()
    with pytest.raises(ValueError, match="model 1: tensor 'model.layers.0"):
        DPPA.from_models(base, [fts[0], {k: v for k, v in fts[1].items() if "layers.0.self_attn.q" not in k}])
    with pytest.raises(ValueError, match="shape"):
        DPPA.from_models(base, [{**fts[0], "model.norm.weight": torch.ones(3)}])
    bad = dict(fts[0])
    bad["model.layers.1.mlp.up_proj.weight"] = bad["model.layers.1.mlp.up_proj.weight"].clone()
    bad["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        DPPA.from_models(base, [bad])
    with pytest.raises(TypeError, match="float64"):
        DPPA.from_models({k: v.double() if v.is_floating_point() else v for k, v in base.items()}, [fts[0]])
    with pytest.raises(ValueError, match="nonunit_mode"):
        DPPA.from_models(base, fts, nonunit_mode="weird")
    d = DPPA.from_models(base, fts)
    with pytest.raises(ValueError, match="unknown preset"):
        d.apply("nope")
    with pytest.raises(ValueError, match=">= 0"):
        d.apply((1.0, -0.5))
    with pytest.raises(ValueError, match="one factor per density level"):
        d.apply((1.0,))
    with pytest.raises(ValueError, match="combine"):
        d.merge(combine="max")
    with pytest.raises(ValueError, match="weights"):
        d.merge(weights=[1.0])


def test_merge_deltas_dppa_warns_once_that_its_bands_are_uniform():
    import dppa_kernels.ops as ops

    ops._warn_uniform_bands.cache_clear()
    x = [torch.randn(64, 64) for _ in range(2)]
    with pytest.warns(UserWarning, match="uniform bands"):
        dk.merge_deltas(x, method="dppa")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dk.merge_deltas(x, method="dppa")  # once per process
    assert "uniform" in dk.merge_deltas.__doc__ and "DPPA" in dk.merge_deltas.__doc__


def test_band_thresholds_match_the_reference_sort():
    """The cached thresholds are the k-th largest keys of the sort-based reference."""
    base, fts = _family()
    d = DPPA.from_models(base, fts, tie_mode="exact_k")
    for name in list(d.units)[:5]:
        b = d.bands[0][name]
        keys = R.magnitude_keys(d.deltas[0][name], torch.bfloat16).reshape(-1).sort(descending=True).values
        for k, tau in zip(b.k, b.tau_key):
            assert k == 0 or int(keys[k - 1]) == tau


@pytest.mark.parametrize("combine", ["sum", "ties"])
@pytest.mark.parametrize("dtype, work", [(torch.bfloat16, None), (torch.float16, None), (torch.float32, None),
                                         (torch.float32, torch.bfloat16)])
def test_search_candidates_are_bit_identical_to_plain_merges(dtype, work, combine):
    """The candidate path of a search (merged into the evaluated model's tensors, with the unit plans,
    the base in the working dtype and the alpha-free tensors kept from earlier candidates) gives, bit
    for bit, the public ops' merge of the same factors, candidate after candidate; ``apply`` too."""
    base, fts = _family(dtype, m=3, seed=5)
    d = DPPA.from_models(base, fts, densities=[(0.1, 0.2), (0.05, 0.3), (0.2, 0.2)], dtype=work)
    into = {k: torch.full_like(v, 7) for k, v in base.items()}
    weights, lam = [1.0, 0.6, 0.8], 0.9
    fresh_apply = d.apply((1.8, 1.0))  # before any plan is cached
    for a in [(1.8, 0.0), (1.9, 0.0), (1.7, 0.0), (1.8, 1.0), (1.8, 1.1), (1.8, 0.0), (2.5, 0.3),
              [(1.2, 0.4), (2.0, 1.0), (1.0, 0.0)], (1.8, 1.0)]:
        got = d.merge(a, into=into, combine=combine, weights=weights, lam=lam)
        work_base = {k: v.to(work) if work and v.is_floating_point() else v for k, v in base.items()}
        want = _public_merge(d, work_base, a, combine, weights, lam)  # in the working dtype, cast once into ``into``
        for name, t in want.items():
            assert got[name] is into[name] and torch.equal(_bits(into[name]), _bits(t.to(dtype))), (a, name)
        assert torch.equal(into["model.buffer_ids"], base["model.buffer_ids"])
    for i, sd in enumerate(d.apply((1.8, 1.0))):
        assert all(torch.equal(_bits(t), _bits(fresh_apply[i][n])) for n, t in sd.items())


def test_merge_into_a_state_dict_in_place():
    base, fts = _family()
    d = DPPA.from_models(base, fts)
    into = {k: torch.zeros_like(v) for k, v in base.items()}
    for a in ((1.8, 0.0), (1.2, 1.4), "plain"):
        got = d.merge(a, into=into, weights=[1.0, 0.5])
        want = d.merge(a, weights=[1.0, 0.5])
        assert all(got[k] is into[k] and torch.equal(into[k], want[k]) for k in want)
    d.merge("plain", into=into, models=[1])  # other settings: every tensor written again
    want = d.merge("plain", models=[1])
    assert all(torch.equal(into[k], want[k]) for k in want)


def test_search_in_the_base_module_leaves_the_base_unchanged():
    """from_hf keeps the base module for the search; writing candidates into it must not change the
    base that later merges start from (its state dict shares memory with that module)."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=96)
    torch.manual_seed(0)
    base, fts = transformers.LlamaForCausalLM(cfg), []
    for _ in range(2):
        m = transformers.LlamaForCausalLM(cfg)
        m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                p.add_(1e-2 * torch.randn_like(p))
        fts.append(m)
    want = DPPA.from_models({k: v.clone() for k, v in base.state_dict().items()},
                            [m.state_dict() for m in fts]).merge((1.0, 1.0))
    d = DPPA.from_hf(base, fts)
    scores = iter([1.0, 1.2, 1.1, 1.3])
    d.search(lambda model: next(scores), max_evals=3)
    got = d.merge((1.0, 1.0))
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("kw,match", [
    (dict(densities=[]), "densities must hold 1 to 8"), (dict(densities=[0.3, 0.1]), "non-decreasing"),
    (dict(densities=[0.1, 1.5]), r"densities\[1\] must be in \[0, 1\]"),
    (dict(densities=[[0.1, 0.2], [0.2, 0.1]]), "densities of model 1 must be non-decreasing"),
    (dict(densities=[0.1] * 9), "1 to 8"), (dict(offset_lambda="x"), "offset_lambda"),
    (dict(outlier_mult_unit=-2), "outlier_mult_unit"), (dict(density_clamp=[0]), "density_clamp"),
    (dict(density_clamp=[0.5, 0.2]), "density_clamp"), (dict(renormalize="yes"), "renormalize"),
])
def test_bad_settings_name_the_argument(kw, match):
    base, fts = _family()
    with pytest.raises(ValueError, match=match):
        DPPA.from_models(base, fts, **kw)
