"""Streaming merge engine: mergekit YAML in, sharded safetensors out (``dppa merge``).

``run_merge(config_path, MergeOptions(out=...))`` runs the stages ``open_inputs`` → ``plan`` →
``execute`` → ``commit``: every input is checked before anything is written, DPPA's statistics
pass runs when the method needs it, then each output shard is merged and written by an
:class:`Executor` (default: one process streaming tensor by tensor) and the finished folder is
renamed into place. See ``docs/engine.md``.
"""

from .config import MergeConfig, load_config, parse_config
from .errors import MergeError
from .executor import Executor, MergeJob, SerialExecutor, execute_shard
from .run import DEFAULT_SHARD_SIZE, MergeOptions, run_merge
from .shards import ShardResult

__all__ = ["DEFAULT_SHARD_SIZE", "Executor", "MergeConfig", "MergeError", "MergeJob", "MergeOptions",
           "SerialExecutor", "ShardResult", "execute_shard", "load_config", "parse_config", "run_merge"]
