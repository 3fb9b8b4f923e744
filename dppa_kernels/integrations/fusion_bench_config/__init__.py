"""FusionBench (Hydra) configs of dppa-kernels' methods: ``method/dppa.yaml``.

Put on Hydra's search path with ``hydra.searchpath=[pkg://dppa_kernels.integrations.fusion_bench_config]``
(``python -m dppa_kernels.integrations.fusion_bench_cli`` adds it).
"""
