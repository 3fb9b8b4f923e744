"""Offline quality harness: pruning retention and merging of small synthetic-task experts.

``python -m bench.quality [--quick]`` (or ``python bench/quality/run.py``) trains a small
Llama-shaped base and one expert per synthetic task (cached on disk), then measures, on the test
split with every hyperparameter chosen on the validation split, how much of each expert's
accuracy survives delta pruning and how well merges of all experts do. Methods are entries of
``methods.PRUNE_METHODS`` and ``methods.MERGE_METHODS``.
"""
