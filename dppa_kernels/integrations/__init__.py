"""Drop-in backends for the libraries people already merge with.

* :mod:`dppa_kernels.integrations.mergekit`: ``install()`` puts our kernels behind mergekit's
  generalized-task-arithmetic names and adds ``dppa`` / ``dppa_ties``; ``run_merge`` is
  ``mergekit.merge.run_merge`` with the backend installed; console script ``dppa-mergekit-yaml``.
* :mod:`dppa_kernels.integrations.peft`: drop-ins for ``peft.utils.merge_utils`` and an
  ``install()`` that patches them where LoRA's ``add_weighted_adapter`` looks them up.
* :mod:`dppa_kernels.integrations.fusion_bench`: ``install()`` puts our kernels behind
  FusionBench's TIES trim, sign election, disjoint merge and DARE drop (its own semantics), so
  that its algorithms (``TiesMergingAlgorithm``, ``DareTiesMerging``, ...) run on them.

mergekit, PEFT and FusionBench are optional: importing this package never imports them; using a submodule
without its library raises an ImportError that says what to install.
"""

__all__ = ["fusion_bench", "mergekit", "peft"]
