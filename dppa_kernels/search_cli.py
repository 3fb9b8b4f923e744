"""``dppa search CONFIG --eval MODULE:FUNCTION --out DIR``: the α search, then the best merge.

The config is a ``dppa`` / ``dppa_ties`` merge config (the one ``dppa merge`` takes). The
statistics pass runs once; each candidate is one apply pass, loaded into a model built from the
base folder, and scored by the evaluator on the user's validation data. The best factors are
then written into a copy of the config and merged by the engine, so ``DIR`` holds exactly what
``dppa merge`` writes for them, plus ``search_report.json`` and ``search_scores.png`` (when
matplotlib is installed).
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

import typer

from ._exit import unexpected

REPORT = "search_report.json"
PLOT = "search_scores.png"


def _settings() -> tuple:
    """The dppa method's global parameters (registry) that the in-memory DPPA takes under the same
    name; the rest of a dppa config is per model, or (density_renormalize) renamed below."""
    from .dppa import DPPA
    from .methods import get_method

    taken = inspect.signature(DPPA.__init__).parameters
    return tuple(n for n in get_method("dppa").names(scope="global") if n in taken)


class SearchCliError(Exception):
    """A bad argument or input, reported as one ``error:`` line."""


def load_evaluator(ref: str) -> Callable:
    """The callable named ``MODULE:FUNCTION``."""
    mod, sep, fn = ref.partition(":")
    if not sep or not mod or not fn:
        raise SearchCliError(f"--eval must be MODULE:FUNCTION (e.g. dppa_kernels.eval:loss), got {ref[:100]!r}")
    try:
        obj = getattr(importlib.import_module(mod), fn)
    except ImportError as exc:
        raise SearchCliError(f"--eval {ref[:100]!r}: cannot import module {mod[:100]!r}: {str(exc)[:200]}") from None
    except AttributeError:
        raise SearchCliError(f"--eval {ref[:100]!r}: module {mod[:100]!r} has no {fn[:60]!r}") from None
    if not callable(obj):
        raise SearchCliError(f"--eval {ref[:100]!r} is not callable")
    return obj


def parse_eval_args(items: list) -> dict:
    """KEY=VALUE pairs; VALUE is read as JSON when it parses (numbers, lists), else kept as text."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise SearchCliError(f"--eval-arg must be KEY=VALUE, got {item[:100]!r}")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _plain_settings(cfg) -> dict:
    glob = dict(cfg.parameters or {})
    out = {}
    for k in _settings():
        if k in glob:
            v = glob[k]
            if isinstance(v, (dict, list)) and k != "density_clamp":
                raise SearchCliError(f"parameter {k} must be one plain value for dppa search, got {str(v)[:80]!r}")
            out[k] = v
    if "density_renormalize" in glob:
        out["renormalize"] = bool(glob["density_renormalize"])
    return out


def check_method(cfg) -> None:
    from .engine.config import is_dppa

    if not is_dppa(cfg.merge_method):
        raise SearchCliError(f"dppa search needs merge_method dppa or dppa_ties (a DPPA method), "
                             f"got {cfg.merge_method!r}")


def build_dppa(cfg, *, device: str, backend: str):
    """(DPPA over the config's folders, the merge's keyword arguments) for a dppa config."""
    from .dppa import DPPA
    from .engine.params import ParamResolver
    from .engine.plan import DTYPES

    check_method(cfg)
    levels = ParamResolver(cfg, 1).dp_levels()
    weights = []
    for m in cfg.models:
        w = (m.parameters or {}).get("weight", (cfg.parameters or {}).get("weight", 1.0))
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise SearchCliError(f"model {m.model[:80]!r}: weight must be one number for dppa search, got {str(w)[:60]!r}")
        weights.append(float(w))
    glob = cfg.parameters or {}
    lam = glob.get("lambda", 1.0)
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise SearchCliError(f"lambda must be one number for dppa search, got {str(lam)[:60]!r}")
    if "normalize" in glob and bool(glob["normalize"]) != (cfg.merge_method == "dppa_ties"):
        raise SearchCliError("dppa search merges with the method's default normalize; remove 'normalize'")
    work = DTYPES[cfg.dtype] if cfg.dtype else None
    d = DPPA.from_folders(cfg.base_model, [m.model for m in cfg.models], device=device, densities=levels,
                          dtype=work, backend=backend, **_plain_settings(cfg))
    out = DTYPES[cfg.out_dtype] if cfg.out_dtype else None
    combine = "ties" if cfg.merge_method == "dppa_ties" else "sum"
    return d, {"combine": combine, "weights": weights, "lam": float(lam), "out_dtype": out}


def eval_model(base_dir: str, device: str, progress: bool = True):
    """The causal LM of the base folder on ``device``, in eval mode (candidates are loaded into it)."""
    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise SearchCliError("dppa search evaluates a transformers model: pip install transformers") from None
    if not progress:
        transformers.utils.logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype="auto")
    return model.to(device).eval()


@dataclass(frozen=True)
class FolderSetup:
    """Builds a config's DPPA and evaluation model on a worker of the Ray search (the folders must
    be visible there under the same paths): ``() -> (DPPA, model, merge keywords)``."""

    config: str
    device: str
    backend: str

    def __call__(self) -> tuple:
        from .engine.config import load_config

        cfg, _ = load_config(self.config)
        d, merge_kw = build_dppa(cfg, device=self.device, backend=self.backend)
        return d, eval_model(cfg.base_model, self.device, progress=False), merge_kw


def best_config(cfg_dict: dict, best: list) -> dict:
    """The config with each model's ``alphas`` set to its searched factors."""
    out = dict(cfg_dict)
    out["models"] = [dict(m, parameters=dict(m.get("parameters") or {}, alphas=[float(a) for a in b]))
                     for m, b in zip(cfg_dict["models"], best)]
    return out


def plot_scores(result, path: str, label: str) -> Optional[str]:
    """A PNG of the score over α₁ (one line per α₂); returns why not when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict = {}
    for row in result.table:
        a = row["alphas"]
        groups.setdefault(tuple(a[1:]), []).append((a[0], row["score"]))
    for rest, pts in sorted(groups.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                label="α_lo = " + ", ".join(f"{x:g}" for x in rest) if rest else None)
    best = result.best[0]
    ax.scatter([best[0]], [result.best_score], s=160, facecolors="none", edgecolors="red", label="best")
    ax.set_xlabel("α_hi (top band factor)")
    ax.set_ylabel(label)
    ax.set_title(f"DPPA α search ({result.strategy}, {len(result.table)} candidates)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def run_search(config: str, *, eval_ref: str, out: str, strategy: str = "greedy", max_evals: int = 20,
               device: str = "cpu", backend: str = "auto", eval_data: Optional[str] = None,
               tokenizer: Optional[str] = None, eval_args: Optional[dict] = None, force: bool = False,
               progress: bool = True, echo: Callable[[str], None] = print, executor: str = "local",
               ray_address: Optional[str] = None, workers: Optional[int] = None,
               gpus_per_worker: Optional[float] = None) -> dict:
    """Search, merge the best with the engine into ``out``, write the report; returns the report.
    ``executor="ray"``: the candidates are evaluated on Ray workers (see ``dppa.ray_search``),
    each building the DPPA and the model from the config's folders itself."""
    import yaml

    from .engine import MergeOptions, run_merge
    from .engine.config import load_config

    t0 = time.perf_counter()
    evaluate = load_evaluator(eval_ref)
    if os.path.isdir(out) and os.listdir(out) and not force:
        raise SearchCliError(f"--out {out[:200]!r} exists and is not empty (pass --force to replace it)")
    kwargs = dict(eval_args or {})
    if eval_data is not None:
        if not os.path.isfile(eval_data):
            raise SearchCliError(f"--eval-data {eval_data[:200]!r} does not exist")
        kwargs["data"] = eval_data
    if tokenizer is not None:
        kwargs["tokenizer"] = tokenizer
    cfg, yaml_text = load_config(config)
    higher = getattr(evaluate, "higher_is_better", True)
    if executor == "ray":
        check_method(cfg)
        for key in ("data", "tokenizer"):  # the workers may run elsewhere: paths they can resolve
            if key in kwargs and os.path.exists(str(kwargs[key])):
                kwargs[key] = os.path.abspath(kwargs[key])
        t = time.perf_counter()
        result, view = _ray_search(config, eval_ref, kwargs, strategy=strategy, max_evals=max_evals, device=device,
                                   backend=backend, progress=progress, echo=echo, address=ray_address,
                                   workers=workers, gpus_per_worker=gpus_per_worker)
        # the statistics pass and the evaluation model are built on the workers, inside the search
        setup = {"statistics_s": 0.0, "model_load_s": 0.0, "search_s": time.perf_counter() - t}
    else:
        result, view, setup = _local_search(cfg, evaluate, kwargs, strategy=strategy, max_evals=max_evals,
                                            device=device, backend=backend, progress=progress, echo=echo, t0=t0)
    t_search = setup["search_s"]
    with tempfile.TemporaryDirectory(prefix="dppa-search-") as tmp:
        path = os.path.join(tmp, os.path.basename(config) or "config.yml")
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(best_config(yaml.safe_load(yaml_text), result.best), f, sort_keys=False)
        t = time.perf_counter()
        merge_report = run_merge(path, MergeOptions(out=out, device=device, backend=backend, force=force,
                                                     progress=progress))
        t_merge = time.perf_counter() - t
    plot_why = plot_scores(result, os.path.join(out, PLOT), f"{eval_ref} ({'higher' if higher else 'lower'} is better)")
    total = time.perf_counter() - t0
    report = {"config": os.path.abspath(config), "evaluator": eval_ref, "eval_kwargs": {k: str(v) for k, v in kwargs.items()},
              "higher_is_better": bool(higher), "device": device, "backend": view["backend"], "max_evals": max_evals,
              "executor": executor, **result.to_json(),
              "realised_density": dict(zip(view["labels"], view["realised_density"])), "allocation": view["summary"],
              "plot": None if plot_why else PLOT, "plot_skipped": plot_why,
              "timings": {**setup, "eval_s": result.eval_seconds,
                          "outside_eval_share_of_search": 1 - result.eval_seconds / t_search if t_search else None,
                          "merge_s": t_merge, "total_s": total},
              "merge_report": "merge_report.json", "merged_realised_density": merge_report["realised_density"]}
    with open(os.path.join(out, REPORT), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return report


def _row_echo(progress: bool, echo: Callable[[str], None]) -> Optional[Callable[[dict], None]]:
    n = [0]

    def row(r: dict) -> None:
        n[0] += 1
        echo(f"  candidate {n[0]}: score {r['score']}")
    return row if progress else None


def _local_search(cfg, evaluate: Callable, kwargs: dict, *, strategy: str, max_evals: int, device: str,
                  backend: str, progress: bool, echo: Callable, t0: float) -> tuple:
    """(result, the DPPA's view for the report, timings): the search in this process. Timings:
    ``statistics_s`` (from ``t0``: reading the folders and the statistics pass), ``model_load_s``
    (the evaluation model), ``search_s`` (the ``DPPA.search`` call: candidates and their evaluation)."""
    from .dppa import SearchError

    d, merge_kw = build_dppa(cfg, device=device, backend=backend)
    t = time.perf_counter()
    model = eval_model(cfg.base_model, device, progress)
    setup = {"statistics_s": t - t0, "model_load_s": time.perf_counter() - t}
    row = _row_echo(progress, echo)

    def scored(m) -> float:
        v = evaluate(m, **kwargs)
        if row is not None:
            row({"score": v})
        return v
    scored.higher_is_better = getattr(evaluate, "higher_is_better", True)
    try:
        result = d.search(scored, strategy=strategy, max_evals=max_evals, model=model, **merge_kw)
    except SearchError as exc:
        raise SearchCliError(str(exc)) from None
    view = {"backend": d.backend, "labels": d.labels, "summary": d.summary,
            "realised_density": d.realised_density(result.best)}
    return result, view, {**setup, "search_s": result.seconds}


def _ray_search(config: str, eval_ref: str, kwargs: dict, *, strategy: str, max_evals: int, device: str,
                backend: str, progress: bool, echo: Callable, **ray_kw) -> tuple:
    """(result, the workers' view of the DPPA): the search on Ray workers."""
    from .dppa import SearchError
    from .dppa.ray_search import search_on_ray

    worker_device = "cuda" if device.startswith("cuda") else device  # the GPU Ray gives the worker
    view: dict = {}
    try:
        result = search_on_ray(FolderSetup(os.path.abspath(config), worker_device, backend), eval_ref,
                               eval_kwargs=kwargs, strategy=strategy, max_evals=max_evals, device=device,
                               on_row=_row_echo(progress, echo), info=view, **ray_kw)
    except SearchError as exc:
        raise SearchCliError(str(exc)) from None
    return result, view


def search(
    config: str = typer.Argument(..., help="dppa / dppa_ties merge config (the YAML dppa merge takes)"),
    eval_ref: str = typer.Option(..., "--eval", help="evaluator MODULE:FUNCTION, called as f(model, **kwargs)"),
    out: str = typer.Option(..., "--out", "-o", help="output folder: the best merge, search_report.json, plot"),
    strategy: str = typer.Option("greedy", help="greedy (coordinate ascent) or grid"),
    max_evals: int = typer.Option(20, "--max-evals", help="most candidates evaluated"),
    device: str = typer.Option("cpu", help="cpu or cuda[:N] (statistics, apply passes, evaluation, merge)"),
    backend: str = typer.Option("auto", help="auto, torch, cpu, triton or cuda"),
    eval_data: Optional[str] = typer.Option(None, "--eval-data", help="validation file passed as data= (JSONL/text)"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="tokenizer folder (default: the base's)"),
    eval_arg: list[str] = typer.Option([], "--eval-arg", help="extra evaluator argument KEY=VALUE (repeatable)"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty --out"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress output"),
    executor: str = typer.Option("local", help="local (this process) or ray (candidates on Ray workers)"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address",
                                              help="with ray: auto or HOST:PORT (default: a local cluster)"),
    workers: Optional[int] = typer.Option(None, "--workers",
                                          help="with ray: at most N workers (one evaluation each at a time)"),
    gpus_per_worker: Optional[float] = typer.Option(None, "--gpus-per-worker",
                                                    help="with ray and --device cuda: GPUs per worker (default 1)"),
) -> None:
    """Search DPPA's band factors on a validation split, then merge with the best into --out."""
    from .engine import MergeError
    from .engine.errors import one_line

    def fail(msg: str, code: int = 1) -> None:
        typer.secho(f"error: {one_line(msg)}", err=True, fg=typer.colors.RED)
        raise typer.Exit(code)

    if strategy not in ("greedy", "grid"):
        fail(f"--strategy must be greedy or grid, got {strategy[:40]!r}", 2)
    if max_evals < 1:
        fail(f"--max-evals must be at least 1, got {max_evals}", 2)
    if executor not in ("local", "ray"):
        fail(f"--executor must be local or ray, got {executor[:40]!r}", 2)
    if executor == "local" and (ray_address or workers or gpus_per_worker):
        fail("--ray-address, --workers and --gpus-per-worker need --executor ray", 2)
    try:
        rep = run_search(config, eval_ref=eval_ref, out=out, strategy=strategy, max_evals=max_evals, device=device,
                         backend=backend, eval_data=eval_data, tokenizer=tokenizer,
                         eval_args=parse_eval_args(eval_arg), force=force, progress=not no_progress, echo=typer.echo,
                         executor=executor, ray_address=ray_address, workers=workers, gpus_per_worker=gpus_per_worker)
    except (SearchCliError, MergeError, ValueError, TypeError) as exc:
        fail(str(exc))
    except Exception as exc:  # noqa: BLE001 (every failure of the command is one line)
        fail(unexpected(exc))
    t = rep["timings"]
    typer.echo(f"best alphas {rep['best_alphas'][0]} (score {rep['best_score']:.6g}) after {len(rep['candidates'])} "
               f"candidates in {t['search_s']:.1f} s ({100 * (t['outside_eval_share_of_search'] or 0):.1f} % outside "
               f"the evaluator) -> {out}")

