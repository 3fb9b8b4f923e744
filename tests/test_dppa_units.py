"""DPPA units beyond Llama: Mixtral experts (w1/w2/w3), Qwen-MoE experts, fused qkv_proj /
gate_up_proj; 2-D block weights that no rule matches are warned about and reported."""

from __future__ import annotations

import json
import logging

import torch

from dppa_kernels.dppa import DPPA
from dppa_kernels.dppa.units import unmatched_linears
from dppa_kernels.engine.synth import write_model
from dppa_kernels.reference.naming import group_units
from engine_util import cli, write_config


def _moe_names(layers=2):
    out = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.qkv_proj.weight"] = (48, 16)
        out[p + "self_attn.o_proj.weight"] = (16, 16)
        for e in range(2):
            for w, sh in (("w1", (24, 16)), ("w2", (16, 24)), ("w3", (24, 16))):
                out[p + f"block_sparse_moe.experts.{e}.{w}.weight"] = sh
            out[p + f"mlp.experts.{e}.gate_proj.weight"] = (24, 16)  # Qwen-MoE naming
        out[p + "mlp.shared_expert.gate_up_proj.weight"] = (48, 16)
        out[p + "block_sparse_moe.gate.weight"] = (2, 16)  # the router: no unit rule
        out[p + "mlp.custom_adapter.weight"] = (16, 16)  # unknown projection
        out[p + "input_layernorm.weight"] = (16,)
    out["model.embed_tokens.weight"] = (40, 16)
    return out


def test_moe_and_fused_units_are_found():
    shapes = _moe_names()
    units = group_units(shapes)
    assert all(n in units for n in shapes if ".w1." in n or ".w2." in n or ".w3." in n or "qkv_proj" in n
               or "gate_up_proj" in n or "experts.0.gate_proj" in n)
    assert unmatched_linears(shapes, units) == [f"model.layers.{i}.{n}" for i in range(2)
                                                for n in ("block_sparse_moe.gate.weight", "mlp.custom_adapter.weight")]


def _sds(seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {n: (0.02 * torch.randn(sh, generator=g)).bfloat16() for n, sh in _moe_names().items()}
    ft = {n: (b.float() + 1e-3 * torch.randn(b.shape, generator=g)).bfloat16() for n, b in base.items()}
    return base, ft


def test_api_warns_about_unmatched_block_weights(caplog):
    base, ft = _sds()
    with caplog.at_level(logging.WARNING, logger="dppa_kernels.dppa.units"):
        d = DPPA.from_models(base, [ft])
    assert "match no unit rule" in caplog.text and "custom_adapter" in caplog.text
    assert len(d.unmatched) == 4 and not set(d.unmatched) & set(d.units)


def test_engine_reports_unmatched_block_weights(tmp_path):
    base, ft = _sds()
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    write_model(str(tmp_path / "base"), base, cfg)
    write_model(str(tmp_path / "ft"), ft, cfg)
    path = write_config(tmp_path / "c.yaml", "dppa", str(tmp_path / "base"), [str(tmp_path / "ft")])
    r = cli("merge", path, "--out", tmp_path / "out", "--no-progress")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert rep["dppa"]["unmatched_linear"] == unmatched_linears(_moe_names(), group_units(_moe_names()))
    assert any(".w2." in n for n in rep["tensors"] if "thresholds" in rep["tensors"][n])
