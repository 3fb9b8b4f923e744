"""FusionBench's algorithm classes and program entry point, with and without ``install()``, on model
pools of tiny randomly initialised Llama models built here (nothing is downloaded).

Covered: ``TiesMergingAlgorithm`` (BaseModelPool of instantiated models), ``TiesMergingForCausalLM``
and ``TaskArithmeticForCausalLM`` (CausalLMPool of local Hugging Face folders, eager and lazy
loading), ``TaskArithmeticAlgorithm``, ``DareTiesMerging`` (FusionBench's draws: identical) and
``DareTaskArithmetic`` (our draws: statistics), and the ``fusion_bench`` command through
``FabricModelFusionProgram`` with the dummy task pool. Not covered: evaluation task pools (CLIP,
GLUE, lm-eval), which need model hub and dataset downloads.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("fusion_bench.method", reason="fusion-bench is not installed (pip install 'dppa-kernels[fusion-bench]')")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")

from fusion_bench.method import TaskArithmeticAlgorithm, TiesMergingAlgorithm  # noqa: E402
from fusion_bench.method.dare import DareTaskArithmetic, DareTiesMerging  # noqa: E402
from fusion_bench.method.linear import TaskArithmeticForCausalLM, TiesMergingForCausalLM  # noqa: E402
from fusion_bench.modelpool import BaseModelPool, CausalLMPool  # noqa: E402
from helpers import realistic_delta  # noqa: E402

from dppa_kernels.integrations import fusion_bench as fb  # noqa: E402
from dppa_kernels.integrations import fusion_bench_ties as fb_ties  # noqa: E402
from dppa_kernels.integrations.fusion_bench_dare import keep_probability  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N_MODELS = 3


@pytest.fixture(autouse=True)
def _clean():
    yield
    fb.uninstall()
    fb.set_options(rng="hash", backend="auto")


def tiny_config():
    return transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=96, tie_word_embeddings=False)


@functools.lru_cache(maxsize=None)
def family_for(dtype):
    """State dicts: a random base and N_MODELS fine-tunes (base + realistic low-precision deltas)."""
    torch.manual_seed(0)
    base = {k: v.to(dtype) for k, v in transformers.LlamaForCausalLM(tiny_config()).state_dict().items()}
    fts = []
    for i in range(N_MODELS):
        fts.append({k: (v.float() + realistic_delta(v.shape, dtype, sigma=2e-3, seed=100 * i + j).float()).to(dtype)
                    for j, (k, v) in enumerate(base.items())})
    return dtype, base, fts


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def family(request):
    return family_for(request.param)


def model(sd, dtype):
    m = transformers.LlamaForCausalLM(tiny_config()).to(dtype)
    m.load_state_dict(sd)
    return m


def instance_pool(family):
    """A fresh BaseModelPool of instantiated models (FusionBench's algorithms modify them in place)."""
    dtype, base, fts = family
    models = {"_pretrained_": model(base, dtype)}
    models.update({f"task{i}": model(sd, dtype) for i, sd in enumerate(fts)})
    return BaseModelPool(models)


def write_pool(family, root: Path) -> dict:
    """The family as Hugging Face folders: {pool name: path}."""
    dtype, base, fts = family
    paths = {}
    for name, sd in [("_pretrained_", base)] + [(f"task{i}", sd) for i, sd in enumerate(fts)]:
        model(sd, dtype).save_pretrained(root / name.strip("_"))
        paths[name] = str(root / name.strip("_"))
    return paths


@pytest.fixture(scope="module")
def hf_dirs(family, tmp_path_factory):
    return family[0], write_pool(family, tmp_path_factory.mktemp(f"pool_{str(family[0])[6:]}"))


def causal_lm_pool(paths: dict, dtype, lazy: bool = False) -> CausalLMPool:
    return CausalLMPool(models=dict(paths), tokenizer=None, enable_lazy_loading=lazy,
                        model_kwargs={"torch_dtype": str(dtype)[6:]})


def run_quiet(algorithm, pool):
    with contextlib.redirect_stdout(io.StringIO()):
        return algorithm.run(pool)


def assert_same_models(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.fixture
def kernel_runs(monkeypatch):
    """Counts the TIES merges our kernels computed (a fallback to FusionBench's code returns None)."""
    runs = []
    real = fb_ties.ties_merge

    def spy(*args):
        out = real(*args)
        runs.append(out is not None)
        return out

    monkeypatch.setattr(fb_ties, "ties_merge", spy)
    return runs


def host_and_ours(make_algorithm, make_pool, seed=0):
    """FusionBench's own run, then the same run with install(); same global seed for both."""
    torch.manual_seed(seed)
    host = run_quiet(make_algorithm(), make_pool())
    fb.install()
    torch.manual_seed(seed)
    ours = run_quiet(make_algorithm(), make_pool())
    fb.uninstall()
    return host, ours


# ---------------------------------------------------------------- TIES / task arithmetic

@pytest.mark.parametrize("merge_func,threshold", [("sum", 20), ("mean", 0.7), ("max", 10)])
def test_ties_merging_algorithm_equals_fusion_bench(family, merge_func, threshold, kernel_runs):
    make = lambda: TiesMergingAlgorithm(scaling_factor=0.3, threshold=threshold, remove_keys=[],  # noqa: E731
                                        merge_func=merge_func)
    host, ours = host_and_ours(make, lambda: instance_pool(family))
    assert_same_models(host, ours)
    assert kernel_runs == [True], "the merge did not run on our kernels"


def test_task_arithmetic_algorithm_unchanged_by_install(family):
    host, ours = host_and_ours(lambda: TaskArithmeticAlgorithm(scaling_factor=0.3), lambda: instance_pool(family))
    assert_same_models(host, ours)


@pytest.mark.parametrize("lazy", [False, True], ids=["eager", "lazy"])
def test_causal_lm_variants_equal_fusion_bench(hf_dirs, lazy, kernel_runs):
    dtype, paths = hf_dirs
    make_pool = lambda: causal_lm_pool(paths, dtype, lazy)  # noqa: E731
    ties = lambda: TiesMergingForCausalLM(scaling_factor=0.3, threshold=20, merge_func="sum", remove_keys=[])  # noqa: E731
    host, ours = host_and_ours(ties, make_pool)
    assert_same_models(host, ours)
    assert kernel_runs == [True]
    if not lazy:
        host, ours = host_and_ours(lambda: TaskArithmeticForCausalLM(scaling_factor=0.3), make_pool)
        assert_same_models(host, ours)


# ---------------------------------------------------------------- DARE

@pytest.mark.parametrize("only_linear", [False, True])
def test_dare_ties_with_fusion_bench_draws_is_identical(family, only_linear, kernel_runs):
    """rng="torch": FusionBench's own masks, our TIES: the whole merge is FusionBench's, bit for bit."""
    fb.set_options(rng="torch")
    make = lambda: DareTiesMerging(sparsity_ratio=0.5, only_on_linear_weights=only_linear, rescale=True,  # noqa: E731
                                   scaling_factor=0.5, threshold=20, remove_keys=[], merge_func="sum")
    with contextlib.redirect_stdout(io.StringIO()):
        host, ours = host_and_ours(make, lambda: instance_pool(family), seed=3)
    assert_same_models(host, ours)
    assert kernel_runs == [True]


def test_dare_task_arithmetic_with_our_draws(family):
    """rng="hash": each Linear delta element is dropped or kept ÷ (1 − p) with FusionBench's keep
    probability; everything else is task arithmetic as before."""
    dtype, base, fts = family
    p = 0.7
    fb.install()
    torch.manual_seed(1)
    pool = BaseModelPool({"_pretrained_": model(base, dtype), "task0": model(fts[0], dtype)})
    with contextlib.redirect_stdout(io.StringIO()):
        merged = DareTaskArithmetic(scaling_factor=1.0, sparsity_ratio=p, only_on_linear_weights=True,
                                    rescale=True).run(pool).state_dict()
    q = keep_probability(dtype, p)
    linear = {f"{n}.weight" for n, m in model(base, dtype).named_modules() if isinstance(m, torch.nn.Linear)}
    assert "lm_head.weight" in linear and "model.embed_tokens.weight" not in linear
    kept = total = 0
    for k, b in base.items():
        delta = (fts[0][k] - b)  # FusionBench's module_sub_, in the model dtype
        got = merged[k]
        if k not in linear:  # no drop: plain task arithmetic
            assert torch.equal(got, b + delta), k
            continue
        dropped = got == b
        want = b + delta / (1 - p)
        assert torch.equal(got[~dropped & (delta != 0)], want[~dropped & (delta != 0)]), k
        nz = delta != 0
        kept += int((~dropped & nz).sum())
        total += int(nz.sum())
    assert abs(kept / total - q) <= 5 * math.sqrt(q * (1 - q) / total), (kept / total, q)


# ---------------------------------------------------------------- the fusion_bench command

def test_program_entry_point_with_our_kernels(tmp_path):
    """Our ``fusion_bench`` wrapper (FabricModelFusionProgram, a CausalLMPool config, the dummy task
    pool) saves the model FusionBench's own TiesMergingAlgorithm computes on the same pool."""
    from safetensors.torch import load_file

    dtype = torch.bfloat16
    paths = write_pool(family_for(dtype), tmp_path / "pool")
    cfg = tmp_path / "cfg" / "modelpool"
    cfg.mkdir(parents=True)
    models = "\n".join(f"  {name}: {path}" for name, path in paths.items())
    (cfg / "tiny.yaml").write_text(f"_target_: fusion_bench.modelpool.CausalLMPool\n_recursive_: false\n"
                                   f"models:\n{models}\nmodel_kwargs:\n  torch_dtype: bfloat16\n"
                                   f"tokenizer: null\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", FUSION_BENCH_PROJECT_ROOT=str(tmp_path / "run"), PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "dppa_kernels.integrations.fusion_bench_cli", "--config-dir", str(tmp_path / "cfg"),
           "method=ties_merging", "method.merge_func=mean", "modelpool=tiny", "taskpool=dummy",
           "fabric.accelerator=cpu", "print_config=false", f"merged_model_save_path={tmp_path / 'merged'}"]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "TIES and DARE utilities run on dppa_kernels" in res.stderr
    saved = load_file(str(tmp_path / "merged" / "model.safetensors"))
    # the method config's defaults (method/ties_merging.yaml) with merge_func=mean
    host = run_quiet(TiesMergingAlgorithm(scaling_factor=0.3, threshold=20, remove_keys=[], merge_func="mean"),
                     causal_lm_pool(paths, dtype)).state_dict()
    assert saved.keys() <= host.keys() and "lm_head.weight" in saved
    for k in saved:
        assert saved[k].dtype == host[k].dtype and torch.equal(saved[k], host[k]), k
