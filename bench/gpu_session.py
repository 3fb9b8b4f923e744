"""One command per stage on a bare GPU machine: build, test, benchmark; every output in one folder.

    bash bench/gpu_session.sh STAGES OUTDIR [--commit SHA] [--budget 540] [--force] [--dry-run]

STAGES is a comma list of ``build``, ``test``, ``bench``, ``all``, ``status`` or single steps:

    build.env       versions of Python, torch, triton, CUDA, the driver and the GPU (summary.json)
    build.wheels    the carried wheels (bench/gpu_wheels.sh) installed with pip --no-index
    build.package   pip install --no-index --no-build-isolation -e . with the CUDA extension (sm_90)
    test.cuda       TRITON_INTERPRET=0 pytest: the GPU test files, then every test named *cuda*
    test.rest       the rest of the suite on the same machine
    bench.threshold / bench.merge   bench/bench_gpu.py, one section each
    bench.pat       bench/bench_pat.py: PAT's fused HSM forward+backward vs the torch reference
    bench.e2e       bench/bench_e2e.py: dppa merge --device cuda vs cpu and mergekit-yaml --cuda, 271M
    bench.della     bench/bench_gpu.py's DELLA section (its baselines are the slowest)
    bench.plot      bench/plot_gpu.py: gpu.png from gpu.csv

test and bench steps run the build steps first. Each call stops within --budget seconds (9 minutes
by default); a later call on the same machine skips the steps already done (stamps in --state) and
continues with the rest, so repeating ``all`` until its last line says so runs everything. The
output folder always receives: session.log (every step's log), summary.json (environment, steps,
test counts, failed test ids), junit.xml, gpu.csv, gpu.png, e2e_gpu.csv, pat_gpu_hsm.csv.
``--dry-run`` runs every step without a GPU: the CUDA parts skipped, the tests only collected, the
wheels installed with --no-index into a fresh Python 3.12 virtual environment.
Exit code: 0 all selected steps ok, 1 a step failed or hit its time cap, 75 steps left for a next call.

Afterwards, on the development machine, ``python bench/gpu_session.py collect FOLDER`` appends the
CSV rows of a returned output folder to bench/results/, writes bench/results/gpu_run.json (device,
versions, commit, step statuses, test counts) and redraws bench/results/gpu.png.
"""

from __future__ import annotations

import argparse
import csv
import glob
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_session_core import Session, Step  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STAGES = ("build", "test", "bench")
CUDA_TEST_FILES = ("tests/test_gpu_backends.py", "tests/test_backend_parity.py", "tests/test_triton_backend.py",
                   "tests/test_triton_della.py", "tests/test_pat_kernel.py")
SOURCES = ("setup.py", "pyproject.toml", "csrc/**", "dppa_kernels/**/*.py", "kernels/**/*.py")
RESULT_FILES = ("gpu.csv", "gpu.png", "e2e_gpu.csv", "pat_gpu_hsm.csv")
# the 271M-parameter synthetic family of bench/bench_e2e.py (16 layers); the dry run uses 1 layer
E2E_LAYERS, E2E_RUNS, E2E_REPEAT = 16, "dppa:ties,dppa:dppa,mergekit:ties", 3


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    ap = Parser(prog="bench/gpu_session.sh", description=__doc__.split("\n")[0])
    ap.add_argument("stages", help="comma list: build, test, bench, all, status, or steps such as test.cuda")
    ap.add_argument("out", type=Path, help="output folder (created)")
    ap.add_argument("--dry-run", action="store_true", help="no GPU: CUDA parts skipped, tests collected only")
    ap.add_argument("--budget", type=float, default=540.0, help="seconds for this call (default 540)")
    ap.add_argument("--state", type=Path, default=None,
                    help="stamps, logs and results between calls (default /tmp/dppa-gpu-session[-dry])")
    ap.add_argument("--wheels", type=Path, default=REPO / ".whl", help="carried wheels (default .whl)")
    ap.add_argument("--commit", default=None, help="commit of the tree, for the CSVs when git is absent")
    ap.add_argument("--force", action="store_true", help="run the named steps again even if done")
    ap.add_argument("--python", default=sys.executable, help="interpreter for the steps (default this one)")
    ap.add_argument("--python312", default=None, help="dry run: a Python 3.12 (default: found here)")
    ap.add_argument("--jobs", type=int, default=None, help="pytest-xdist workers (default: min(8, cpus/2))")
    ap.add_argument("--test-timeout", type=int, default=300, help="seconds per test (pytest-timeout)")
    a = ap.parse_args(argv)
    if a.budget <= 60:
        ap.error(f"--budget must be above 60 seconds, got {a.budget:g}")
    if a.out.exists() and not a.out.is_dir():
        ap.error(f"output folder {str(a.out)[:200]!r} exists and is not a folder")
    a.state = a.state or Path("/tmp/dppa-gpu-session" + ("-dry" if a.dry_run else ""))
    a.commit = a.commit or git_commit()
    if a.dry_run and not a.python312:
        a.python312 = find_python312()
    a.names = expand(a.stages, [s.name for s in make_steps(a)], ap)
    return a


def expand(spec: str, known: list[str], ap: argparse.ArgumentParser) -> list[str]:
    """Stage list -> step names in canonical order, build steps added before test and bench steps."""
    want = set()
    for part in (p.strip() for p in spec.split(",")):
        if part == "status":
            continue
        if part == "all":
            want |= set(known)
        elif part in STAGES:
            want |= {n for n in known if n.startswith(part + ".")}
        elif part in known:
            want.add(part)
        else:
            ap.error(f"unknown stage {part[:60]!r}; expected build, test, bench, all, status or one of "
                     + ", ".join(known))
    if any(n.startswith(("test.", "bench.")) and n != "bench.plot" for n in want):
        want |= {n for n in known if n.startswith("build.")}
    return [n for n in known if n in want]


def find_python312() -> str | None:
    """A working Python 3.12 interpreter on this machine (PATH, pyenv, the usual prefixes), or None."""
    cands = [shutil.which("python3.12"), "/usr/bin/python3.12", "/usr/local/bin/python3.12",
             *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))]
    for c in filter(None, cands):
        try:
            r = subprocess.run([c, "-c", "import sys, venv; print(sys.version_info[:2] == (3, 12))"],
                               capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            continue
        if r.stdout.strip() == "True":
            return c
    return None


def git_commit() -> str:
    try:
        r = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                           timeout=10)
        return r.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def pytest_args(a, junit: Path) -> list:
    args = [a.python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rfEs", "--durations=15",
            f"--junitxml={junit}"]
    xdist = importlib.util.find_spec("xdist") is not None
    jobs = a.jobs if a.jobs is not None else (min(8, (os.cpu_count() or 2) // 2) if xdist and not a.dry_run else 0)
    if jobs > 0:
        args += ["-n", str(jobs)]
    if importlib.util.find_spec("pytest_timeout") is not None:
        # thread: a test stuck in a CUDA call is ended by ending its worker (xdist replaces it)
        args += [f"--timeout={a.test_timeout}", f"--timeout-method={'thread' if jobs > 0 else 'signal'}"]
    return args + (["--collect-only", "-qq"] if a.dry_run else [])


def make_steps(a) -> list[Step]:
    py, dry, res = a.python, a.dry_run, a.state / "results"
    ignore = [f"--ignore={f}" for f in CUDA_TEST_FILES]
    tenv = {"TRITON_INTERPRET": "1" if dry else "0",
            "DPPA_REQUIRE_BACKENDS": "cpu,triton" if dry else "cpu,triton,cuda"}
    fill = lambda name: (lambda: fill_commit(res / name, a.commit))  # noqa: E731
    venv = a.state / "venv312"
    if not dry:
        wheels = [[py, "bench/gpu_wheels.py", "install", a.wheels]]
    elif a.python312:
        wheels = [[a.python312, "-m", "venv", "--clear", venv],
                  [venv / "bin" / "python", "bench/gpu_wheels.py", "install", a.wheels, "--stand-in"]]
    else:
        wheels = [[py, "-c", "raise SystemExit('no python3.12 found here: pass --python312 PATH')"]]
    build_env = {"DPPA_CUDA_ARCHS": "90", "TORCH_CUDA_ARCH_LIST": "9.0", "MAX_JOBS": os.cpu_count() or 2}
    if not dry:
        build_env["DPPA_FORCE_CUDA"] = "1"  # a failed CUDA build is an error, not a CPU-only install

    def gpu_bench(section):
        cmd = [py, "bench/bench_gpu.py", "--sections", section, "--csv", res / "gpu.csv", "--no-plot",
               "--max-seconds", "10"]
        return Step(f"bench.{section}", [cmd], 420, 90, SOURCES + ("bench/bench_gpu.py",), tenv,
                    after=fill("gpu.csv"))

    hsm = ["--device", "cuda", "--results-dir", res] if not dry else \
        ["--device", "cpu", "--hsm-tokens", "16", "--hsm-d", "64", "--hsm-rank", "8", "--repeats", "1", "--no-write"]
    e2e = ["--layers", str(E2E_LAYERS), "--only", E2E_RUNS, "--repeat", str(E2E_REPEAT),
           "--workdir", "/tmp/dppa-bench-e2e"] if not dry else \
        ["--layers", "1", "--only", "dppa:ties,mergekit:ties", "--repeat", "1", "--workdir", a.state / "e2e"]
    return [
        Step("build.env", [[py, Path(__file__), "_env", res / "env.json"]], 120, 10),
        Step("build.wheels", wheels, 180, 20, ("bench/gpu_wheels.py", f"{a.wheels}/**/*.whl")),
        Step("build.package", [
            [py, "-m", "pip", "--isolated", "install", "--no-index", "--no-deps", "--no-build-isolation", "-e", "."],
            [py, "-m", "dppa_kernels", "info"],
            [py, Path(__file__), "_require", "cpu" if dry else "cpu,triton,cuda"]],
            480, 120, ("setup.py", "pyproject.toml", "csrc/**"), {**build_env, "PIP_CONFIG_FILE": os.devnull}),
        Step("test.cuda", [pytest_args(a, res / "junit-cuda-files.xml") + list(CUDA_TEST_FILES),
                           pytest_args(a, res / "junit-cuda-named.xml") + ["tests", "-k", "cuda", *ignore]],
             500, 240, SOURCES + ("tests/**/*.py",), tenv, keep_going=True, ok_rcs=(0, 5)),
        Step("test.rest", [pytest_args(a, res / "junit-rest.xml") + ["tests", "-k", "not cuda", *ignore]],
             400, 60, SOURCES + ("tests/**/*.py",), tenv, ok_rcs=(0, 5)),
        gpu_bench("threshold"), gpu_bench("merge"),
        Step("bench.pat", [[py, "bench/bench_pat.py", "--skip-fold", *hsm]], 180, 45,
             SOURCES + ("bench/bench_pat.py",), tenv, after=fill("pat_gpu_hsm.csv")),
        Step("bench.e2e", [[py, "bench/bench_e2e.py", "--devices", "cpu,cuda", "--csv", res / "e2e_gpu.csv", *e2e]],
             480, 150, SOURCES + ("bench/bench_e2e.py",), tenv, after=fill("e2e_gpu.csv")),
        gpu_bench("della"),
        Step("bench.plot", [[py, "bench/plot_gpu.py", "--csv", res / "gpu.csv", "--out", res / "gpu.png"]],
             60, 10, ("bench/plot_gpu.py", str(res / "gpu.csv"))),
    ]


def fill_commit(path: Path, commit: str) -> None:
    """Write the commit into rows whose script could not read it (no git on the GPU machine)."""
    if commit == "unknown" or not path.is_file():
        return
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "commit" not in rows[0]:
        return
    for r in rows:
        if r["commit"] in ("", "unknown"):
            r["commit"] = commit
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


def collect_env(dest: Path) -> dict:
    """Versions and the device, as the GPU run saw them."""
    def out(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            return (r.stdout or r.stderr).strip()
        except (OSError, subprocess.SubprocessError) as exc:
            return f"unavailable: {exc.__class__.__name__}"

    import sysconfig
    from importlib.metadata import PackageNotFoundError, version

    info = {"python": sys.version.split()[0], "executable": sys.executable, "cpus": os.cpu_count(),
            "platform": platform.platform(), "nvidia_smi": out(["nvidia-smi", "--query-gpu=name,driver_version,"
                                                                "memory.total", "--format=csv,noheader"]),
            "nvcc": out(["nvcc", "--version"]).splitlines()[-1:],
            "site_packages_writable": os.access(sysconfig.get_paths()["purelib"], os.W_OK),
            "tmp_free_gib": round(shutil.disk_usage("/tmp").free / 2**30, 1)}
    try:
        import torch

        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info.update(device=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                        memory_gib=round(p.total_memory / 2**30, 1))
    except Exception as exc:
        info["torch"] = f"not importable: {exc!r}"
    pkgs = {}
    for name in ("torch", "triton", "transformers", "peft", "accelerate", "safetensors", "numpy", "click",
                 "typing-extensions", "pytest", "pytest-timeout", "pytest-xdist", "hypothesis", "pybind11",
                 "setuptools", "ninja", "mergekit", "pydantic", "pydantic-core", "immutables"):
        try:
            pkgs[name] = version(name)
        except PackageNotFoundError:
            pkgs[name] = None
    info["packages"] = pkgs
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))
    return info


def require_backends(names: list[str]) -> int:
    from dppa_kernels.backends.registry import availability

    av = availability()
    missing = [f"{n} ({av[n][1]})" for n in names if not av[n][0]]
    print("backends: " + ", ".join(f"{n}={'yes' if ok else 'no'}" for n, (ok, _) in av.items()))
    if missing:
        print("error: required backends unavailable: " + "; ".join(missing), file=sys.stderr)
    return 1 if missing else 0


def collect(src: Path, dest: Path = REPO / "bench" / "results") -> int:
    """Append the CSV rows of a run's output folder to bench/results, keep its summary, re-plot."""
    if not (src / "summary.json").is_file():
        print(f"error: {str(src)[:200]!r} holds no summary.json: not an output folder of this script",
              file=sys.stderr)
        return 2
    for name in RESULT_FILES:
        if not name.endswith(".csv") or not (src / name).is_file():
            continue
        with (src / name).open(newline="") as f:
            rows = list(csv.DictReader(f))
        target = dest / name
        if target.is_file():
            with target.open(newline="") as f:
                header = next(csv.reader(f), [])
            if rows and header != list(rows[0]):
                print(f"error: {name}: columns differ from {target}; not appended", file=sys.stderr)
                return 1
        with target.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
            if not target.stat().st_size and rows:
                w.writeheader()
            w.writerows(rows)
        print(f"{target}: +{len(rows)} rows")
    summary = json.loads((src / "summary.json").read_text())
    env = summary.get("environment", {})
    keep = {"commit": summary.get("meta", {}).get("commit"), "environment": env, "tests": summary.get("tests"),
            "steps": {n: {k: st.get(k) for k in ("status", "rc", "wall_s")} for n, st in summary["steps"].items()}}
    out = dest / "gpu_run.json"
    out.write_text(json.dumps(keep, indent=1) + "\n")
    print(f"{out}: environment ({env.get('device', 'no device')}, torch {env.get('torch')}), steps, test counts")
    if (dest / "gpu.csv").is_file():
        subprocess.run([sys.executable, str(REPO / "bench" / "plot_gpu.py")], check=False)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["collect"] and len(argv) == 2:
        return collect(Path(argv[1]))
    if argv[:1] == ["_env"]:
        collect_env(Path(argv[1]))
        return 0
    if argv[:1] == ["_require"]:
        return require_backends(argv[1].split(","))
    a = parse_args(argv)
    steps = make_steps(a)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PATH"] = f"{Path(a.python).parent}{os.pathsep}{env.get('PATH', '')}"  # mergekit-yaml, dppa
    named = [p.strip() for p in a.stages.split(",")]
    explicit = {s.name for s in steps if "all" in named or s.name in named or s.stage in named}
    session = Session(steps, a.state, a.out, REPO, a.budget, selected=a.names,
                      force=explicit if a.force else (), env=env, result_files=RESULT_FILES,
                      meta={"commit": a.commit, "dry_run": a.dry_run, "stages": a.stages})
    return session.run()


if __name__ == "__main__":
    sys.exit(main())
