"""The ``dppa`` command line: ``dppa merge CONFIG --out DIR``, ``dppa search``, ``dppa info``, ``dppa demo``."""

from __future__ import annotations

import re
import sys
from typing import Optional

import typer

from . import search_cli
from ._exit import exit_now, unexpected
from .pat.cli import app as pat_app

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Fast pruning and merging of LLM deltas (DPPA, TIES, DARE, DELLA, breadcrumbs).")
app.add_typer(pat_app, name="pat")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTB]i?B?|[KMGTB])?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "B": 10**9, "T": 10**12,
          "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_size(text: str) -> int:
    """Bytes from '5B', '500M', '2GiB', '1e9' or a plain integer (mergekit: B = 10⁹ bytes)."""
    try:
        value = float(text)
        if value >= 1:
            return int(value)
    except ValueError:
        pass
    from .engine.errors import brief  # the engine loads on use: ``dppa info`` stays quick

    m = _SIZE.match(text)
    if not m:
        raise typer.BadParameter(f"{brief(text)} is not a size (examples: 5B, 500M, 2GiB, 1000000)")
    unit = (m.group(2) or "").upper()
    unit = unit[:-1] if unit.endswith("B") and len(unit) > 1 else unit
    size = int(float(m.group(1)) * _UNITS[unit])
    if size < 1:
        raise typer.BadParameter(f"shard size must be at least 1 byte, got {brief(text)}")
    return size


def _fail(msg: str, code: int = 1) -> None:
    from .engine.errors import one_line

    typer.secho(f"error: {one_line(msg)}", err=True, fg=typer.colors.RED)
    raise typer.Exit(code)


@app.command()
def merge(
    config: str = typer.Argument(..., help="mergekit-style YAML config"),
    out: str = typer.Option(..., "--out", "-o", help="output folder (created; written atomically)"),
    device: str = typer.Option("cpu", help="math device: cpu or cuda[:N]"),
    backend: str = typer.Option("auto", help="auto, reference, torch, cpu, triton or cuda"),
    dtype: Optional[str] = typer.Option(None, "--dtype", "--out-dtype",
                                        help="output dtype (overrides out_dtype in the config)"),
    out_shard_size: str = typer.Option("5B", help="max bytes per output shard (5B = 5e9, 500M, 2GiB)"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted merge into --out"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty --out (only once done)"),
    seed: int = typer.Option(0, help="seed of the DARE/DELLA draws (per tensor name and model)"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bars"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle",
                                      help="accept .bin pickle checkpoints (loaded with weights_only, torch >= 2.6)"),
    allow_crimes: bool = typer.Option(False, "--allow-crimes",
                                      help="merge models whose config.json model_type or architectures differ"),
    truncate_vocab: bool = typer.Option(False, "--truncate-vocab",
                                        help="cut fine-tuned embedding/lm_head rows to the base's vocabulary"),
    resident: str = typer.Option("auto", help="DPPA: keep deltas on the device between phases (auto/on/off)"),
    executor: str = typer.Option("local", help="local (one process), serial, or ray (one task per output shard)"),
    ray_address: Optional[str] = typer.Option(None, help="ray: the cluster to join (auto or HOST:PORT; "
                                              "default: start a local one)"),
    workers: Optional[int] = typer.Option(None, help="ray: at most N shard tasks at a time"),
    gpus_per_worker: Optional[float] = typer.Option(None, help="ray with --device cuda: GPUs per task (default 1)"),
) -> None:
    """Merge the models of CONFIG (mergekit YAML) into --out as sharded safetensors."""
    from .engine import MergeError, MergeOptions, run_merge
    from .engine.errors import brief

    if resident not in ("auto", "on", "off"):
        _fail(f"--resident must be auto, on or off, got {brief(resident)}", 2)
    try:
        shard_size = parse_size(out_shard_size)
    except typer.BadParameter as exc:
        _fail(f"--out-shard-size: {exc.message}", 2)
    opts = MergeOptions(out=out, device=device, backend=backend, out_dtype=dtype, shard_size=shard_size,
                        resume=resume, force=force, seed=seed, progress=not no_progress, allow_pickle=allow_pickle,
                        allow_crimes=allow_crimes, truncate_vocab=truncate_vocab, resident=resident, executor=executor,
                        ray_address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker)
    try:
        report = run_merge(config, opts)
    except MergeError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail(f"interrupted; rerun with --resume to continue the merge into {out}", 130)
    except Exception as exc:  # noqa: BLE001 (every failure of the command is one line)
        _fail(unexpected(exc))
    t = report["timings"]
    typer.echo(f"merged {report['n_tensors']} tensors with {report['method']} on {report['device']} "
               f"({report['backend']} backend) in {t['total_s']:.1f} s -> {out}")


@app.command()
def info() -> None:
    """Versions, build switches and available backends."""
    from .info import info_text

    typer.echo(info_text())


@app.command()
def demo(
    workdir: Optional[str] = typer.Option(None, help="folder for the synthetic models (default: a temp dir)"),
    backend: str = typer.Option("auto", help="backend for the merges"),
    keep: bool = typer.Option(False, "--keep", help="keep the generated models and merges"),
    progress: bool = typer.Option(False, "--progress", help="show progress bars"),
) -> None:
    """Build a small synthetic Llama family locally and merge it with DPPA, TIES and DARE."""
    from .demo import run_demo
    from .engine import MergeError

    try:
        run_demo(workdir=workdir, backend=backend, keep=keep, progress=progress, echo=typer.echo)
    except MergeError as exc:
        _fail(str(exc))
    except Exception as exc:  # noqa: BLE001
        _fail(unexpected(exc))


app.command("search")(search_cli.search)


def main() -> None:
    """Run the command, then leave without the interpreter's teardown (see ``exit_now``)."""
    try:
        app(prog_name="dppa")
        code = 0
    except SystemExit as exc:
        code = exc.code
    exit_now(code)


if __name__ == "__main__":
    sys.exit(main())
