"""dppa_kernels: fused kernels for pruning and merging LLM delta parameters, and for PAT."""

__version__ = "0.1.0"
