"""mergekit integration: the same config through plain mergekit and through our backend.

task_arithmetic: identical tensors; magnitude methods (ties, breadcrumbs*): differences only at
elements tied at a threshold; DARE/DELLA: same keep-rate and rescale statistics within sampling
error. Plus the console script, install/uninstall hygiene, and the optional-dependency error.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from integration_common import DEVICES, config, load, run, run_cli, write_family

from dppa_kernels.integrations import mergekit as dk

UNITS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    """fp32 family whose Δ sit on a coarse grid: many exact ties, exact fp32 sums."""
    return write_family(tmp_path_factory.mktemp("famq"), n=2, quantised=True)


@pytest.fixture(scope="module")
def fam_smooth(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("fams"), n=2, seed=1)


@pytest.fixture(scope="module")
def fam_bf16(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("famb"), n=2, dtype=torch.bfloat16, seed=2)


@pytest.fixture(autouse=True)
def _clean():
    yield
    dk.uninstall()


def _deltas(dirs, name):
    base = load(dirs[0])[name]
    return base, [load(d)[name] - base for d in dirs[1:]]


def _tied(delta: torch.Tensor, ranks) -> torch.Tensor:
    """Elements whose |Δ| equals the value at one of the given (0-based, descending) ranks."""
    a = delta.abs().reshape(-1)
    srt = torch.sort(a, descending=True).values
    hit = torch.zeros_like(a, dtype=torch.bool)
    for r in ranks:
        if 0 <= r < a.numel():
            hit |= a == srt[r]
    return hit.reshape(delta.shape)


@pytest.mark.parametrize("device", DEVICES)
def test_task_arithmetic_identical(fam_smooth, tmp_path, device):
    cfg = config("task_arithmetic", fam_smooth, [{"weight": 0.7}, {"weight": 0.45}], {"lambda": 0.9})
    opts = {"cuda": device == "cuda"}
    mk, ours = run(cfg, tmp_path / "mk", ours=False, **opts), run(cfg, tmp_path / "dk", ours=True, **opts)
    assert mk.keys() == ours.keys()
    for k in mk:
        assert torch.equal(mk[k], ours[k]), k


def test_task_arithmetic_bf16_single_rounding(fam_bf16, tmp_path):
    """bf16: we round once; mergekit rounds ΣΔ and then base + ΣΔ. So the two differ by at most
    half an ulp of ΣΔ plus one ulp of the output, and agree almost everywhere."""
    cfg = config("task_arithmetic", fam_bf16, [{"weight": 1.0}, {"weight": 1.0}])
    mk, ours = run(cfg, tmp_path / "mk", ours=False), run(cfg, tmp_path / "dk", ours=True)
    base = load(fam_bf16[0])
    equal = total = 0
    for k in mk:
        assert ours[k].dtype == mk[k].dtype == torch.bfloat16
        a, b = mk[k].float(), ours[k].float()
        bound = (torch.maximum(a.abs(), b.abs()) + (b - base[k].float()).abs()) * 2.0 ** -7
        assert bool(((a - b).abs() <= bound).all()), k
        equal += int((a == b).sum())
        total += a.numel()
    assert equal / total > 0.95


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method,params", [
    ("ties", [{"weight": 0.6, "density": 0.3}, {"weight": 0.4, "density": 0.55}]),
    ("breadcrumbs", [{"weight": 0.5, "density": 0.4, "gamma": 0.02}, {"weight": 0.5, "density": 0.3}]),
    ("breadcrumbs_ties", [{"weight": 1.0, "density": 0.4}, {"weight": 0.8, "density": 0.5, "gamma": 0.05}]),
])
def test_magnitude_methods_differ_only_at_ties(fam, tmp_path, method, params, device):
    cfg = config(method, fam, params)
    opts = {"cuda": device == "cuda"}
    mk, ours = run(cfg, tmp_path / "mk", ours=False, **opts), run(cfg, tmp_path / "dk", ours=True, **opts)
    n_tied_cuts = 0
    for name in mk:
        base, deltas = _deltas(fam, name)
        allowed = torch.zeros_like(base, dtype=torch.bool)
        for p, d in zip(params, deltas):
            n, dens = d.numel(), p["density"]
            if method == "ties":
                ranks = [max(1, int(dens * n)) - 1]
            else:
                target, n_top = int(dens * n), int(p.get("gamma", 0.01) * n)
                n_top = min(n_top, n - target)
                ranks = [n_top - 1, n_top + target - 1]
            tied = _tied(d, ranks)
            n_tied_cuts += int(tied.sum()) > len(ranks)
            allowed |= tied
        diff = mk[name] != ours[name]
        assert not bool((diff & ~allowed).any()), f"{name}: {int((diff & ~allowed).sum())} differences off the ties"
    assert n_tied_cuts > 10  # the family really has ties at the cuts


def _keep_stats(dirs, out, units_only=True):
    """(kept fraction, Σ|out − base| / Σ|Δ|) over the unit tensors of a single-model merge."""
    base, ft = load(dirs[0]), load(dirs[1])
    kept = n = 0
    ratios = []
    for k, b in base.items():
        if units_only and not any(u in k for u in UNITS):
            continue
        d, o = ft[k] - b, out[k] - b
        kept += int((o != 0).sum())
        n += d.numel()
        ratios.append(float(o.abs().sum() / d.abs().sum()))
    return kept / n, ratios, n


@pytest.mark.parametrize("method,params", [
    ("dare_linear", {"density": 0.3}),
    ("della_linear", {"density": 0.4, "epsilon": 0.15}),
])
def test_random_methods_keep_rate_and_rescale(fam_smooth, tmp_path, method, params):
    dirs = fam_smooth[:2]
    cfg = config(method, dirs, [{"weight": 1.0, **params}])
    mk = run(cfg, tmp_path / "mk", ours=False, random_seed=1)
    ours = run(cfg, tmp_path / "dk", ours=True, random_seed=1)
    rate_mk, ratios_mk, n = _keep_stats(dirs, mk)
    rate_dk, ratios_dk, _ = _keep_stats(dirs, ours)
    sd = math.sqrt(params["density"] * (1 - params["density"]) / n)
    assert abs(rate_dk - params["density"]) < 5 * sd
    assert abs(rate_dk - rate_mk) < 7 * sd
    # L1-norm rescale: the kept values carry the whole Σ|Δ| of each tensor, in both
    assert max(abs(r - 1) for r in ratios_dk) < 1e-4
    assert max(abs(r - 1) for r in ratios_mk) < 1e-3
    assert mk.keys() == ours.keys()
    if method == "della_linear":  # keep probability grows with the magnitude rank, in both
        for out in (mk, ours):
            name = "model.layers.0.mlp.up_proj.weight"
            d = load(dirs[1])[name] - load(dirs[0])[name]
            kept = out[name] != load(dirs[0])[name]
            order = d.abs().argsort(dim=1)
            low = kept.gather(1, order[:, : d.shape[1] // 4]).float().mean()
            high = kept.gather(1, order[:, -d.shape[1] // 4:]).float().mean()
            assert float(high - low) > 0.15


@pytest.mark.parametrize("method,params", [
    ("dare_ties", [{"weight": 0.6, "density": 0.2}, {"weight": 0.5, "density": 0.3}]),
    ("della", [{"weight": 1.0, "density": 0.3}, {"weight": 0.7, "density": 0.4, "epsilon": 0.1}]),
])
def test_random_ties_methods_statistics(fam_smooth, tmp_path, method, params):
    cfg = config(method, fam_smooth, params)
    mk = run(cfg, tmp_path / "mk", ours=False, random_seed=3)
    ours = run(cfg, tmp_path / "dk", ours=True, random_seed=3)
    base = load(fam_smooth[0])
    stats = []
    for out in (mk, ours):
        changed = l1 = n = 0
        for k, b in base.items():
            diff = out[k] - b
            changed += int((diff != 0).sum())
            l1 += float(diff.abs().sum())
            n += b.numel()
        stats.append((changed / n, l1))
    (c_mk, l1_mk), (c_dk, l1_dk) = stats
    assert abs(c_mk - c_dk) < 0.01
    assert abs(l1_mk - l1_dk) / l1_mk < 0.03


def test_console_script_same_layout_and_tensors(fam, tmp_path):
    """mergekit-yaml vs dppa-mergekit-yaml (as ``python -m``) on the same YAML file."""
    import yaml

    cfg = config("ties", fam, [{"weight": 0.6, "density": 0.3}, {"weight": 0.4, "density": 0.5}],
                 dtype="float32")
    path = tmp_path / "ties.yml"
    path.write_text(yaml.safe_dump(cfg))
    flags = ["--no-copy-tokenizer", "--quiet"]
    run_cli(["-m", "mergekit.scripts.run_yaml", str(path), str(tmp_path / "mk"), *flags])
    run_cli(["-m", "dppa_kernels.integrations.mergekit_cli", str(path), str(tmp_path / "dk"), *flags])
    files = lambda p: sorted(f.name for f in p.iterdir())  # noqa: E731
    assert files(tmp_path / "mk") == files(tmp_path / "dk")
    mk, ours = load(tmp_path / "mk"), load(tmp_path / "dk")
    assert mk.keys() == ours.keys()
    assert (tmp_path / "mk" / "config.json").read_text() == (tmp_path / "dk" / "config.json").read_text()
    for name in mk:
        _, deltas = _deltas(fam, name)
        allowed = _tied(deltas[0], [max(1, int(0.3 * deltas[0].numel())) - 1])
        allowed |= _tied(deltas[1], [max(1, int(0.5 * deltas[1].numel())) - 1])
        assert not bool(((mk[name] != ours[name]) & ~allowed).any()), name


def _snapshot():
    from mergekit.merge_methods import generalized_task_arithmetic as gta
    from mergekit.merge_methods import registry

    return (id(registry._METHODS), [(k, id(v)) for k, v in registry._METHODS.items()],
            id(gta.sparsify), id(gta.get_mask), id(gta.GeneralizedTaskArithmeticMerge.merge_group),
            registry.register, registry.get)


def test_install_uninstall_restore_mergekit_exactly():
    from mergekit import merge_methods as mm

    before = _snapshot()
    dk.install()
    dk.install()  # idempotent
    assert type(mm.get("ties")).__name__ == "FastGeneralizedTaskArithmeticMerge"
    assert {"dppa", "dppa_ties"} <= {m.spec.name for m in mm.registered_methods()}
    dk.uninstall()
    dk.uninstall()  # no-op
    assert _snapshot() == before
    dk.install(override=False)
    assert type(mm.get("ties")).__name__ == "GeneralizedTaskArithmeticMerge"
    assert type(mm.get("ties_fast")).__name__ == "FastGeneralizedTaskArithmeticMerge"
    dk.install(override=True)  # switching mode replaces the twins by the override
    with pytest.raises(RuntimeError):
        mm.get("ties_fast")
    with dk.installed(override=False):
        assert mm.get("della_fast")
    assert type(mm.get("della")).__name__ == "FastGeneralizedTaskArithmeticMerge"  # previous state back
    dk.uninstall()
    assert _snapshot() == before


def test_overridden_methods_keep_mergekit_specs():
    from mergekit import merge_methods as mm

    orig = {name: mm.get(name).spec for name in dk.gta_names()}
    with dk.installed():
        for name in dk.gta_names():
            assert mm.get(name).spec == orig[name], name


def test_missing_optional_dependencies_raise_clear_import_errors():
    code = (
        "import sys; sys.modules['mergekit'] = None; sys.modules['peft'] = None\n"
        "import dppa_kernels.integrations.mergekit as m, dppa_kernels.integrations.peft as p\n"
        "for f in (m.install, p.install):\n"
        "    try:\n        f()\n    except ImportError as e:\n        print('ERR', e)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("ERR")]
    assert len(lines) == 2
    assert "dppa-kernels[mergekit]" in lines[0] and "dppa-kernels[peft]" in lines[1]


GTA_PARAMS = {"task_arithmetic": {}, "ties": {"density": 0.5}, "dare_ties": {"density": 0.5},
              "dare_linear": {"density": 0.5}, "breadcrumbs": {"density": 0.5, "gamma": 0.1},
              "breadcrumbs_ties": {"density": 0.5, "gamma": 0.1}, "della": {"density": 0.5, "epsilon": 0.1},
              "della_linear": {"density": 0.5, "epsilon": 0.1}}


def _module_merge_grads(method: str):
    """mergekit's module-input scenario (test_module_inputs_preserve_parameter_gradients) for
    ``method``: the merged tensors and the gradients of their sum w.r.t. every input parameter."""
    from mergekit.merge_methods import merge_state_dicts

    gen = torch.Generator().manual_seed(3)
    models = [torch.nn.Sequential(torch.nn.Linear(6, 5, bias=False), torch.nn.Linear(5, 4, bias=False))
              for _ in range(3)]
    with torch.no_grad():
        for m in models:
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
    torch.manual_seed(11)  # the same DARE/DELLA draws in both runs
    out = merge_state_dicts(models, method, base=0, parameters={"weight": [0.75, 0.5], **GTA_PARAMS[method]})
    sum(t.sum() for t in out.values()).backward()
    return {k: v.detach() for k, v in out.items()}, [p.grad.clone() for m in models for p in m.parameters()]


@pytest.mark.parametrize("method", dk.gta_names())
def test_gta_methods_keep_autograd_through_module_inputs(method):
    """Grad on and inputs requiring grad: mergekit's own code runs (same values, same gradients);
    under no_grad our kernels run and nothing requires grad."""
    from mergekit.merge_methods import merge_state_dicts

    want = _module_merge_grads(method)
    with dk.installed():
        got = _module_merge_grads(method)
        x = [{"w": torch.randn(8, 6, requires_grad=True)} for _ in range(3)]
        with torch.no_grad():
            out = merge_state_dicts(x, method, base=0, parameters={"weight": 1.0, **GTA_PARAMS[method]})
        assert not out["w"].requires_grad
    for k in want[0]:
        assert torch.equal(got[0][k], want[0][k]), (method, k)
    assert all(g.abs().sum() > 0 for g in want[1][3:]), "the scenario must have non-zero gradients"
    for g_ours, g_mk in zip(got[1], want[1]):
        assert torch.equal(g_ours, g_mk), method


def test_gta_merge_group_runs_our_kernel_without_grad(monkeypatch):
    """The autograd fallback is taken only when autograd records: plain tensors reach our kernels."""
    from mergekit.merge_methods import merge_state_dicts

    calls = []
    real = dk.merge_prepared
    monkeypatch.setattr(dk, "merge_prepared", lambda *a, **k: calls.append(k["backend"]) or real(*a, **k))
    x = [{"w": torch.randn(8, 6, requires_grad=True)} for _ in range(3)]
    with dk.installed():
        with torch.no_grad():
            merge_state_dicts(x, "ties", base=0, parameters={"weight": 1.0, "density": 0.5})
        assert calls == ["auto"]
        merge_state_dicts(x, "ties", base=0, parameters={"weight": 1.0, "density": 0.5})
        assert calls == ["auto"]  # grad recorded: mergekit's code, not ours
