"""Build script of dppa-kernels.

Two optional compiled modules:

* ``dppa_kernels._cpu``: the multithreaded C++ CPU backend (pybind11 + OpenMP). It binds raw data
  pointers, so it includes no torch header and does not depend on the libtorch ABI.
* ``dppa_kernels._cuda``: the CUDA C++ kernels (pybind11 + nvcc), built only when the installed
  torch has CUDA (``torch.version.cuda`` and ``CUDA_HOME`` both set), never from ``which nvcc``.

A failed or skipped build never breaks ``import dppa_kernels``: the package records why a backend
is missing and says so when that backend is requested (``python -m dppa_kernels info``).

Environment switches
--------------------
DPPA_SKIP_CPP_BUILD=1   pure-Python install (no compiled module at all)
DPPA_SKIP_CUDA_BUILD=1  never build the CUDA extension (CPU CI, sdists)
DPPA_FORCE_CUDA=1       build the CUDA extension even without a visible GPU (build machines);
                        a failure is then an error instead of a warning
DPPA_CUDA_ARCHS         semicolon list of SM versions, default "80;90" (+ PTX of the newest)
DPPA_PORTABLE=1         no -march=native for the CPU extension (for wheels moved between CPUs)
MAX_JOBS                parallel compile jobs for ninja (torch's BuildExtension)

Install the CUDA build with ``pip install --no-build-isolation .`` so the installed torch is used.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
VERSION = "0.1.0"


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in {"1", "true", "yes", "on"}


SKIP_CPP = _flag("DPPA_SKIP_CPP_BUILD")
SKIP_CUDA = _flag("DPPA_SKIP_CUDA_BUILD") or SKIP_CPP
FORCE_CUDA = _flag("DPPA_FORCE_CUDA")
CUDA_ARCHS = os.environ.get("DPPA_CUDA_ARCHS", "80;90")


def _torch_cuda() -> tuple[bool, str]:
    """Whether the installed torch can host a CUDA extension, and why not."""
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME
    except Exception as exc:  # torch absent (build isolation) or broken
        return False, f"torch is not importable in the build environment ({exc.__class__.__name__})"
    if not torch.version.cuda:
        return False, f"torch {torch.__version__} is a CPU build"
    if not CUDA_HOME:
        return False, "CUDA_HOME is not set and no CUDA toolkit was found"
    return True, f"torch {torch.__version__} with CUDA {torch.version.cuda}"


def _pybind_include() -> str:
    import pybind11

    return pybind11.get_include()


def _headers(folder: str) -> list:
    """Headers a rebuild depends on: the folder's own and the shared codes (csrc/vocab*.h)."""
    return sorted(str(p.relative_to(ROOT)) for pat in ("*.h", "*.cuh") for d in (ROOT / "csrc", ROOT / "csrc" / folder)
                  for p in d.glob(pat))


def cpu_extension() -> Extension:
    # -ffp-contract=off: no FMA contraction, so double-precision DELLA probabilities are
    # bit-identical to the torch reference.
    cflags = ["-O3", "-std=c++17", "-fopenmp", "-fvisibility=hidden", "-ffp-contract=off"]
    if not _flag("DPPA_PORTABLE") and platform.machine() in {"x86_64", "AMD64", "aarch64"}:
        cflags.append("-march=native")
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    return Extension(
        "dppa_kernels._cpu",
        sources=sources,
        include_dirs=[_pybind_include(), str(ROOT / "csrc" / "cpu")],
        depends=_headers("cpu"),
        extra_compile_args=cflags,
        extra_link_args=["-fopenmp"],
        language="c++",
        optional=True,  # a compiler problem degrades to the reference backend, with a reason
    )


def cuda_extension():
    """The CUDA extension: nvcc-compiled kernels bound with plain pybind11 (pointers + stream)."""
    from torch.utils.cpp_extension import CUDAExtension

    archs = [a.strip() for a in CUDA_ARCHS.split(";") if a.strip()]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    sources = sorted(str(p.relative_to(ROOT)) for ext in ("*.cu", "*.cpp") for p in (ROOT / "csrc" / "cuda").glob(ext))
    return CUDAExtension(
        "dppa_kernels._cuda",
        sources=sources,
        include_dirs=[_pybind_include(), str(ROOT / "csrc" / "cuda")],
        depends=_headers("cuda"),
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17"],
            "nvcc": ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", *gencode],
        },
    )


class BuildExtLoud(build_ext):
    """build_ext that never leaves a stale optional module behind a failed compile.

    setuptools only warns quietly when an ``optional`` extension fails; an older .so from an
    earlier build would then still load. Remove it and record the failure for the loader.
    """

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:
            if not getattr(ext, "optional", False):
                raise
            for path in (Path(self.get_ext_fullpath(ext.name)),
                         ROOT / Path(self.get_ext_filename(ext.name))):
                if path.exists():
                    path.unlink()
            info_path = ROOT / "dppa_kernels" / "_build_info.json"
            info = json.loads(info_path.read_text()) if info_path.exists() else {}
            info["cpu"] = f"compilation failed: {exc.__class__.__name__}: {exc}"
            info_path.write_text(json.dumps(info, indent=1))
            print(f"dppa-kernels: WARNING: building {ext.name} failed ({exc}); the C++ CPU backend "
                  "will be unavailable and the torch backend used instead", file=sys.stderr)
            raise


def _extensions_and_cmdclass():
    info = {
        "version": VERSION,
        "python": sys.version.split()[0],
        "switches": {
            "DPPA_SKIP_CPP_BUILD": SKIP_CPP,
            "DPPA_SKIP_CUDA_BUILD": SKIP_CUDA,
            "DPPA_FORCE_CUDA": FORCE_CUDA,
            "DPPA_CUDA_ARCHS": CUDA_ARCHS,
        },
    }
    exts, cmdclass = [], {"build_ext": BuildExtLoud}
    if SKIP_CPP:
        info["cpu"] = "skipped: DPPA_SKIP_CPP_BUILD=1"
        info["cuda"] = "skipped: DPPA_SKIP_CPP_BUILD=1"
    else:
        exts.append(cpu_extension())
        info["cpu"] = "built"
        ok, why = _torch_cuda()
        has_cuda_sources = any((ROOT / "csrc" / "cuda").glob("*.cu"))
        if SKIP_CUDA:
            info["cuda"] = "skipped: DPPA_SKIP_CUDA_BUILD=1"
        elif not (ok or FORCE_CUDA):
            info["cuda"] = f"skipped: {why}"
        elif not has_cuda_sources:
            info["cuda"] = "skipped: no CUDA sources"
        else:
            from torch.utils.cpp_extension import BuildExtension

            exts.append(cuda_extension())
            cmdclass["build_ext"] = BuildExtension.with_options(use_ninja=True)
            info["cuda"] = f"built for sm_{CUDA_ARCHS} ({why})"
            try:
                import torch

                info["torch"] = torch.__version__
                info["torch_cuda"] = torch.version.cuda
            except Exception:
                pass
    print(f"dppa-kernels: CPU extension: {info['cpu']}; CUDA extension: {info['cuda']}")
    (ROOT / "dppa_kernels" / "_build_info.json").write_text(json.dumps(info, indent=1))
    return exts, cmdclass


EXTENSIONS, CMDCLASS = _extensions_and_cmdclass()

setup(
    name="dppa-kernels",
    version=VERSION,
    description=(
        "Fused kernels for pruning and merging LLM delta parameters (DPPA, TIES, DARE, DELLA, "
        "breadcrumbs) and for pruning-aware tuning (PAT)"
    ),
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=find_packages(include=["dppa_kernels", "dppa_kernels.*"]) + ["dppa_kernels.kernels"],
    package_dir={"dppa_kernels.kernels": "kernels"},
    package_data={"dppa_kernels": ["_build_info.json", "configs/*.yaml", "integrations/fusion_bench_config/method/*.yaml"]},
    ext_modules=EXTENSIONS,
    cmdclass=CMDCLASS,
    install_requires=[
        # Any torch >= 2.1: an installed CPU build satisfies it, so nothing CUDA is pulled.
        "torch>=2.1",
        "numpy",
        "safetensors>=0.4",
        "pydantic>=2",
        "pyyaml",
        "tqdm",
        "typer>=0.9",
        "psutil",
    ],
    extras_require={
        "triton": ["triton>=3.0"],
        "mergekit": ["mergekit>=0.1.5"],
        "peft": ["peft>=0.18"],
        "pat": ["transformers>=4.45"],
        # FusionBench pins nothing we pin (torch, transformers, peft): it adds hydra, lightning, tensorboard.
        # The name is spelled as installers normalise it (PEP 685: "fusion-bench"); the metadata always
        # says "fusion-bench", and pip before 23.3 compares the requested name unnormalised.
        "fusion-bench": ["fusion-bench==0.2.33"],
        "eval": ["transformers>=4.45", "lm-eval>=0.4.13"],
        "quality": ["transformers>=4.45", "matplotlib"],
        "test": ["pytest", "hypothesis", "pybind11"],
        "ray": ["ray>=2.40"],  # the ray executor: merges across the workers and nodes of a Ray cluster
    },
    entry_points={
        "console_scripts": [
            "dppa=dppa_kernels.cli:main",
            "dppa-mergekit-yaml=dppa_kernels.integrations.mergekit_cli:main",
        ]
    },
    zip_safe=False,
)
