"""Streaming merge engine: mergekit YAML in, sharded safetensors out (``dppa merge``).

``run_merge(config_path, MergeOptions(out=...))`` validates the config and every input before
writing anything, runs DPPA's statistics phase when the method needs it, then streams each
tensor of all models through the chosen backend and writes the output shard by shard.
"""

from .config import MergeConfig, load_config, parse_config
from .errors import MergeError
from .run import DEFAULT_SHARD_SIZE, MergeOptions, run_merge

__all__ = ["DEFAULT_SHARD_SIZE", "MergeConfig", "MergeError", "MergeOptions", "load_config", "parse_config",
           "run_merge"]
