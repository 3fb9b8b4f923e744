"""``python -m dppa_kernels info``: versions, build switches and which backends are available."""

from __future__ import annotations

import platform
import sys


def info_text() -> str:
    import torch

    from . import __version__
    from ._C import build_info
    from .backends.registry import availability

    lines = [f"dppa_kernels {__version__}", f"python {sys.version.split()[0]} ({platform.machine()})",
             f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}; "
             f"GPU visible: {torch.cuda.is_available()})"]
    try:
        import triton

        lines.append(f"triton {triton.__version__}")
    except Exception as exc:
        lines.append(f"triton: not importable ({exc.__class__.__name__})")
    for pkg in ("mergekit", "peft", "transformers"):
        try:
            from importlib.metadata import version

            lines.append(f"{pkg} {version(pkg)}")
        except Exception:
            lines.append(f"{pkg}: not installed")
    b = build_info()
    if b:
        lines.append(f"build: cpu extension {b.get('cpu')}; cuda extension {b.get('cuda')}")
    lines.append("backends:")
    for name, (ok, why) in availability().items():
        lines.append(f"  {name:<10} {'available' if ok else 'unavailable: ' + why}")
    return "\n".join(lines)


def main() -> None:
    print(info_text())


if __name__ == "__main__":
    main()
