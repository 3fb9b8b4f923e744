"""The helpers mergekit's tests import as ``tests.common`` (absent from its source distribution).

Installed as ``tests/common.py`` next to the unpacked upstream tests by ``run_mergekit_suite.py``.
Tiny random models saved as safetensors, and ``run_and_check_merge``: run a merge into a temporary
folder, then check that a model and its config were written, that no output tensor is NaN and that
every required weight of the architecture is present.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable, Optional

from transformers import (AutoConfig, CLIPVisionConfig, GPT2Config, GPT2LMHeadModel, GraniteConfig,
                          GraniteForCausalLM, LlamaConfig, LlamaForCausalLM, LlavaConfig,
                          LlavaForConditionalGeneration)

from mergekit.architecture import arch_info_for_config, get_architecture_info
from mergekit.config import MergeConfiguration
from mergekit.io.lazy_tensor_loader import LazyTensorLoader, ShardedTensorIndex
from mergekit.merge import MergeOptions, run_merge


def _save(model, path) -> str:
    model.save_pretrained(path, safe_serialization=True)
    return str(path)


def _pico_llama_config(vocab_size: int = 64) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_attention_heads=16,
                       num_hidden_layers=2)


def make_picollama(path, vocab_size: int = 64) -> str:
    """A 2-layer Llama of width 32."""
    return _save(LlamaForCausalLM(_pico_llama_config(vocab_size)), path)


def make_picogranite(path) -> str:
    """A 2-layer Granite of width 32."""
    cfg = GraniteConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=16,
                        num_key_value_heads=16, num_hidden_layers=2)
    return _save(GraniteForCausalLM(cfg), path)


def make_gpt2size(path) -> str:
    """GPT-2's layer count (12, which the stacking test relies on) at a tiny width: the layout of
    GPT-2 without its 500 MB of weights."""
    cfg = GPT2Config(n_ctx=64, n_positions=64, n_embd=32, n_head=4, n_layer=12, vocab_size=128)
    return _save(GPT2LMHeadModel(cfg), path)


def make_picoLlaVa(path) -> str:  # noqa: N802 (the name mergekit's tests import)
    """A LLaVA with a 2-layer CLIP vision tower and a 2-layer Llama text model."""
    vision = CLIPVisionConfig(image_size=32, patch_size=4, num_hidden_layers=2, num_attention_heads=2,
                              hidden_size=64, intermediate_size=128)
    cfg = LlavaConfig(vision_config=vision, text_config=_pico_llama_config(), image_seq_length=16)
    return _save(LlavaForConditionalGeneration(cfg), path)


def run_and_check_merge(config: MergeConfiguration, check_nan: bool = True, check_tensors: bool = True,
                        validate: Optional[Callable[[str], None]] = None,
                        index_json_name: Optional[str] = None, auto_arch: bool = False) -> None:
    index_json_name = index_json_name or "model.safetensors.index.json"
    with tempfile.TemporaryDirectory() as out:
        run_merge(config, out_path=out, options=MergeOptions())
        index_path = os.path.join(out, index_json_name)
        assert os.path.exists(index_path) or os.path.exists(index_path.replace(".index.json", "")), \
            "the merge wrote no model"
        assert os.path.exists(os.path.join(out, "config.json")), "the merge wrote no config.json"
        if check_nan:
            loader = LazyTensorLoader.from_disk(out, lazy_unpickle=False)
            for name in loader.index.tensor_paths:
                assert not bool(loader.get_tensor(name).isnan().any()), f"output tensor {name} contains NaN"
        if check_tensors:
            model_config = AutoConfig.from_pretrained(out)
            arch = get_architecture_info(config, MergeOptions()) if auto_arch else arch_info_for_config(model_config)
            present = ShardedTensorIndex.from_disk(out).tensor_paths
            for w in arch.all_weights(model_config):
                if not w.optional and w.name not in present and not any(a in present for a in w.aliases):
                    raise AssertionError(f"the merge output lacks tensor {w.name}")
        if validate:
            validate(out)
