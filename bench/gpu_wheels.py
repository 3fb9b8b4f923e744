"""The wheels carried to the GPU machine, and their checks.

The GPU machine (bench/gpu_image_packages.txt) has no network and lacks pydantic and mergekit.
``bench/gpu_wheels.sh`` downloads the pinned wheels below on a machine with an index; this module
checks them and installs them on the GPU machine with ``pip --no-index``.

    python bench/gpu_wheels.py pins [--fallback]      # the pinned list (for pip download)
    python bench/gpu_wheels.py check .whl             # here: folder, closure, imports of our code
    python bench/gpu_wheels.py install .whl           # there: pip --no-index, requirements, imports

Checks: one wheel per pinned package at its pinned version, each installable on CPython 3.12
manylinux x86_64, none of them already in the image, at most 64 MiB in all; every requirement of a
carried wheel is carried, in the image (at a matching version where the image's version is known)
or waived with a reason; every third-party module that the package, tests and benchmarks import
comes from the image or a carried wheel (the modules mergekit itself imports included).
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

try:  # the GPU image has packaging; a bare virtual environment has pip's copy
    from packaging import tags as _tags
    from packaging.requirements import Requirement
    from packaging.utils import parse_wheel_filename
except ImportError:  # pragma: no cover - exercised in the Python 3.12 dry-run environment
    from pip._vendor.packaging import tags as _tags
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import parse_wheel_filename

REPO = Path(__file__).resolve().parents[1]
IMAGE_LIST = REPO / "bench" / "gpu_image_packages.txt"
# What the image lacks, at the versions CI tests with (mergekit 0.1.5 is the version we mirror).
WHEELS = {
    "mergekit": "0.1.5",
    "pydantic": "2.14.4",
    "pydantic-core": "2.50.5",
    "annotated-types": "0.8.0",
    "typing-inspection": "0.4.5",
    "immutables": "0.21",  # mergekit.common imports it
}
# Newer versions of image packages, in the folder's fallback/ subfolder, installed only when the
# image's own version is below what a carried wheel requires (pydantic 2.14 needs
# typing-extensions >= 4.16, which the image may predate).
FALLBACK = {"typing-extensions": "4.16.0"}
# Declared requirements of carried wheels that are neither carried nor in the image.
WAIVED = {"datasets": "declared by mergekit 0.1.5 but imported by none of its modules"}
# Optional modules that are neither in the image nor carried: what imports them skips without them.
NOT_CARRIED = {
    "fusion_bench": "its integration tests skip when it is absent; too large to carry (and its deps)",
    "lm_eval": "imported only by the optional lm-eval evaluator, never by a GPU test or benchmark",
    "omegaconf": "imported only by the FusionBench integration, which comes with fusion_bench",
    "ray": "imported only by the optional ray executor, whose tests skip without it",
}
# mergekit modules run on the GPU machine besides those our code imports: mergekit-yaml's entry.
EXTRA_MODULES = ("mergekit.scripts.run_yaml",)
MAX_BYTES = 64 << 20  # everything that travels to the GPU machine together
TARGET_PY = (3, 12)
TARGET_MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                  "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                  "implementation_name": "cpython", "platform_python_implementation": "CPython",
                  "extra": ""}
SCANNED = ("dppa_kernels", "kernels", "tests", "bench")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages(path: Path = IMAGE_LIST) -> dict[str, str | None]:
    """{normalised name: version or None} of the GPU image."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, ver = line.partition("==")
            out[norm(name)] = ver or None
    return out


def target_tags() -> set:
    """Wheel tags installable by CPython 3.12 on manylinux x86_64 (glibc up to 2.39)."""
    plats = ["linux_x86_64", "manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64"]
    plats += [f"manylinux_2_{n}_x86_64" for n in range(5, 40)]
    return set(_tags.cpython_tags(TARGET_PY, abis=["cp312", "abi3", "none"], platforms=plats)) | \
        set(_tags.compatible_tags(TARGET_PY, "cp312", plats))


def wheel_requires(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    return [ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("Requires-Dist:")]


def active(req: Requirement, env: dict | None = None) -> bool:
    """A requirement that applies without extras (on the target, or the running interpreter)."""
    return req.marker is None or req.marker.evaluate(env or {"extra": ""})


def check_folder(folder: Path) -> list[str]:
    """Problems with the wheel folder: pins, one version each, tags, image overlap, size."""
    problems, image, ok_tags = [], image_packages(), target_tags()
    wanted = {**{(n, v): "" for n, v in WHEELS.items()}, **{(n, v): "fallback" for n, v in FALLBACK.items()}}
    seen: dict[str, list[str]] = {}
    total = 0
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        total += path.stat().st_size
        if path.suffix != ".whl":
            problems.append(f"{path.relative_to(folder)}: not a wheel")
            continue
        name, ver, _, wtags = parse_wheel_filename(path.name)
        key = (norm(name), str(ver))
        seen.setdefault(key[0], []).append(str(ver))
        sub = "fallback" if path.parent.name == "fallback" else ""
        if key not in wanted or wanted[key] != sub:
            problems.append(f"{path.relative_to(folder)}: not in the pinned list (bench/gpu_wheels.py)")
        if not set(wtags) & ok_tags:
            problems.append(f"{path.name}: no tag installable by CPython 3.12 on manylinux x86_64")
        print(f"  {path.stat().st_size / 1024:9.1f} KiB  {path.relative_to(folder)}")
    for name, vers in seen.items():
        if len(vers) > 1:
            problems.append(f"{name}: {len(vers)} versions ({', '.join(vers)}); keep one")
    for name, ver in {**WHEELS, **FALLBACK}.items():
        if name not in seen:
            problems.append(f"{name}=={ver}: wheel missing (run bench/gpu_wheels.sh)")
    problems += [f"{n}: already in the GPU image; do not carry it" for n in WHEELS if n in image]
    problems += [f"{n}: a fallback must be an image package" for n in FALLBACK if n not in image]
    print(f"wheels: {total / 2**20:.2f} MiB in {folder} (limit {MAX_BYTES >> 20} MiB with the working tree)")
    if total > MAX_BYTES:
        problems.append(f"{total / 2**20:.1f} MiB of wheels: over {MAX_BYTES >> 20} MiB")
    return problems


def check_requirements(folder: Path) -> list[str]:
    """Each carried wheel's requirements: carried, in the image (version-checked when known) or waived."""
    problems, image = [], image_packages()
    for path in sorted(folder.glob("*.whl")):
        for line in wheel_requires(path):
            req = Requirement(line)
            name = norm(req.name)
            if not active(req, TARGET_MARKERS) or name in WAIVED:
                continue
            if name in WHEELS:
                have = WHEELS[name]
            elif name in image:
                have = image[name]
            else:
                problems.append(f"{path.name}: needs {line}, neither carried nor in the GPU image")
                continue
            if have and not req.specifier.contains(have, prereleases=True):
                fb = FALLBACK.get(name)
                if not (fb and req.specifier.contains(fb, prereleases=True)):
                    problems.append(f"{path.name}: needs {line}, the GPU machine has {name} {have}")
    return problems


def _runtime_imports(tree: ast.AST):
    """Import nodes, leaving out ``if TYPE_CHECKING:`` and ``if sys.version_info ...:`` bodies."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and re.search(r"TYPE_CHECKING|version_info", ast.unparse(node.test)):
            yield from (n for child in node.orelse for n in _runtime_imports(ast.Module([child], [])))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _runtime_imports(node)


def imported(path: Path):
    """(absolute module name, line) of each run-time import in a source file."""
    for node in _runtime_imports(ast.parse(Path(path).read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((a.name, node.lineno) for a in node.names)
        elif node.level == 0 and node.module:
            yield node.module, node.lineno


def _sources(repo: Path) -> list[Path]:
    return [p for top in SCANNED for p in sorted((repo / top).rglob("*.py"))]


def imports_of(files: list, exclude: set = frozenset(), repo: Path | None = None) -> dict[str, list[str]]:
    """{top-level module: [file:line]} imported by these files, outside the stdlib and ``exclude``."""
    found: dict[str, list[str]] = {}
    for f in files:
        if not f or not str(f).endswith(".py"):
            continue
        for name, line in imported(f):
            mod = name.split(".")[0]
            if mod not in exclude and mod not in sys.stdlib_module_names and mod != "__future__":
                where = Path(f).relative_to(repo) if repo else Path(f).name
                found.setdefault(mod, []).append(f"{where}:{line}")
    return found


def third_party_imports(repo: Path = REPO) -> dict[str, list[str]]:
    """{top-level module: [file:line]} that the package, kernels, tests and benchmarks import."""
    local = {"dppa_kernels", "kernels", "tests", "bench"}
    local |= {p.stem for d in ("tests", "bench") for p in (repo / d).rglob("*.py")}
    return imports_of(_sources(repo), local | set(NOT_CARRIED), repo)


def used_modules(prefix: str, repo: Path = REPO) -> list[str]:
    """Fully qualified modules under ``prefix`` imported anywhere in the scanned folders."""
    mods = set(EXTRA_MODULES if prefix == "mergekit" else ())
    for path in _sources(repo):
        mods |= {n for n, _ in imported(path) if n == prefix or n.startswith(prefix + ".")}
    return sorted(mods)


def _top(dist: str) -> str:
    """The import name of a carried distribution (all of ours follow the usual convention)."""
    return norm(dist).replace("-", "_")


def check_distributions(modules: dict[str, list[str]] | list[str]) -> list[str]:
    """Each top-level module must come from an image package or a carried wheel (mapped here)."""
    from importlib.metadata import packages_distributions

    allowed = set(image_packages()) | set(WHEELS)
    dists = packages_distributions()
    problems = []
    for mod in sorted(modules):
        names = {norm(d) for d in dists.get(mod, [])}
        where = f" ({', '.join(modules[mod][:3])})" if isinstance(modules, dict) else ""
        if not names:
            problems.append(f"module {mod}{where}: not installed here, so its distribution is unknown")
        elif not names & allowed:
            problems.append(f"module {mod}{where}: from {', '.join(sorted(names))}, neither in the GPU "
                            "image nor carried (add it to WHEELS)")
    return problems


def probe(modules: list[str], python: str = sys.executable) -> dict:
    """Import each module in a fresh interpreter.

    Returns {'errors': {module: error}, 'files': {loaded module: file}} (files of the loaded
    modules of the carried packages only: what they import is what the image must provide).
    """
    tops = sorted(_top(n) for n in WHEELS)
    code = ("import importlib, json, sys\nerr = {}\n"
            f"for m in {modules!r}:\n"
            "    try:\n        importlib.import_module(m)\n"
            "    except BaseException as e:\n        err[m] = f'{type(e).__name__}: {e}'\n"
            f"files = {{k: getattr(v, '__file__', None) for k, v in list(sys.modules.items())\n"
            f"         if k.split('.')[0] in {tops!r}}}\n"
            "print(json.dumps({'errors': err, 'files': files}))\n")
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    if r.returncode:
        return {"errors": {"<probe>": r.stderr[-2000:]}, "files": {}}
    return json.loads(r.stdout.strip().splitlines()[-1])


def carried_modules() -> list[str]:
    """The carried packages and the mergekit modules we use: what must import on the GPU machine."""
    return [_top(n) for n in WHEELS] + used_modules("mergekit")


def cmd_check(folder: Path) -> int:
    problems = check_folder(folder) + check_requirements(folder)
    imports = third_party_imports()
    print(f"third-party modules imported by the package, tests and benchmarks: {', '.join(sorted(imports))}")
    problems += check_distributions(imports)
    mods = used_modules("mergekit")
    result = probe(mods)  # this interpreter has mergekit installed (.ci/setup)
    problems += [f"import {m} failed here: {e}" for m, e in result["errors"].items()]
    needed = imports_of(list(result["files"].values()), {_top(n) for n in WHEELS})
    print(f"the {len(mods)} mergekit modules we use load {len(result['files'])} modules of the carried "
          f"packages, which import: {', '.join(sorted(needed))}")
    problems += check_distributions(needed)
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    print("wheel check: " + ("OK" if not problems else f"{len(problems)} problem(s)"))
    return 1 if problems else 0


def _pip(*args: str) -> int:
    """pip with no configuration files or PIP_* variables: only what the command names is used."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    cmd = [sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check", *args]
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, env=env).returncode


def unmet_requirements() -> list[tuple[str, str, str | None]]:
    """(carried package, requirement, installed version or None) not satisfied in this interpreter."""
    from importlib.metadata import PackageNotFoundError, requires, version

    out = []
    for name in WHEELS:
        for line in requires(name) or []:
            req = Requirement(line)
            if not active(req) or norm(req.name) in WAIVED:
                continue
            try:
                have = version(req.name)
            except PackageNotFoundError:
                have = None
            if have is None or not req.specifier.contains(have, prereleases=True):
                out.append((name, line, have))
    return out


def cmd_install(folder: Path, stand_in: bool) -> int:
    """Install the pinned wheels with --no-index, upgrade fallbacks where needed, import them."""
    folder = folder.resolve()
    pins = [f"{n}=={v}" for n, v in WHEELS.items()]
    if _pip("install", "--no-index", "--no-deps", "--find-links", str(folder), *pins):
        print("error: installing the carried wheels failed", file=sys.stderr)
        return 1
    problems, upgrades, absent = [], {}, set()
    for name, line, have in unmet_requirements():
        req = Requirement(line)
        fb = FALLBACK.get(norm(req.name))
        if fb and req.specifier.contains(fb, prereleases=True):
            print(f"{name} needs {line}; installed: {have}: the fallback wheel {norm(req.name)} {fb} will be installed")
            upgrades[norm(req.name)] = fb
        elif stand_in and have is None:
            absent.add(norm(req.name))
        else:
            print(f"warning: {name} needs {line}; installed: {have}")
    if absent:
        print(f"not in this stand-in (GPU image packages): {', '.join(sorted(absent))}")
    for name, ver in upgrades.items():
        if _pip("install", "--no-index", "--no-deps", "--upgrade", "--find-links", str(folder / "fallback"),
                f"{name}=={ver}"):
            problems.append(f"installing the fallback wheel {name}=={ver} failed")
    carried = {_top(n) for n in WHEELS}
    result = probe(carried_modules(), sys.executable)
    for mod, err in sorted(result["errors"].items()):
        missing = re.match(r"ModuleNotFoundError: No module named '(\w+)", err)
        if stand_in and missing and missing.group(1) not in carried:
            print(f"import {mod}: skipped in this stand-in, needs {missing.group(1)} (a GPU image package)")
        else:
            problems.append(f"import {mod}: {err}")
    ok = sorted(set(carried_modules()) - set(result["errors"]))
    print(f"imported: {', '.join(ok)}")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 1 if problems else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pins", help="print the pinned list, one name==version a line")
    p.add_argument("--fallback", action="store_true", help="the conditional upgrades instead")
    p = sub.add_parser("check", help="check a downloaded wheel folder (on the machine with an index)")
    p.add_argument("folder", type=Path)
    p = sub.add_parser("install", help="install from the folder with --no-index (on the GPU machine)")
    p.add_argument("folder", type=Path)
    p.add_argument("--stand-in", action="store_true",
                   help="a Python 3.12 stand-in without the image: imports that need image packages are skipped")
    a = ap.parse_args(argv)
    if a.cmd == "pins":
        print("\n".join(f"{n}=={v}" for n, v in (FALLBACK if a.fallback else WHEELS).items()))
        return 0
    if not a.folder.is_dir():
        print(f"error: wheel folder {str(a.folder)[:200]!r} does not exist (run bench/gpu_wheels.sh)",
              file=sys.stderr)
        return 2
    return cmd_check(a.folder) if a.cmd == "check" else cmd_install(a.folder, a.stand_in)


if __name__ == "__main__":
    sys.exit(main())
