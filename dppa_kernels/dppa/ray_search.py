"""The α search on the workers of a Ray cluster: the sequential search's candidates, table (apart
from the times), best factors and first failure, with the independent evaluations in parallel.

What runs in parallel (at most one evaluation per worker at a time):

* ``grid``: every candidate of the grid;
* ``per_task``: the m task searches, side by side; within one task, greedy's candidates one after
  the other (each step's candidate depends on the previous score), a grid's all at once;
* a shared search with one evaluator per task: the m dense-model scores; then the candidates as
  above (each candidate's m task scores are computed by one worker, one after the other);
* a shared ``greedy`` search: nothing. Each candidate depends on the previous score, so one
  worker evaluates them one at a time (on its own device, away from the driver).

Each worker is a Ray actor holding its own :class:`~.search.Scorer`: its DPPA (the caller's,
through the object store once, or built on the worker by a setup callable such as the CLI's,
from the model folders) and its evaluation model, on its own device (``num_gpus`` per actor
with ``device="cuda"``), and the evaluators, imported on the worker by reference
(``MODULE:FUNCTION``). Only candidate factors go to a worker; scores and timings come back. The
driver runs the sequential strategy code and consumes the scores in its order, so everything but
the times is the sequential search's. See ``docs/ray.md``.
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Optional, Sequence, Union

import torch

from .search import (STRATEGIES, Scorer, SearchError, SearchResult, _Runner, _subset, check_args, describe,
                     direction_of, directions, drive, gather_dense, grid_points)

Ref = Union[str, Callable]


def reference(fn: Ref) -> str:
    """``MODULE:FUNCTION`` for ``fn``: the string itself, or the name of a module-level function
    (a worker imports it; a lambda or a closure cannot travel by reference)."""
    if isinstance(fn, str):
        return fn
    mod, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    ref = f"{mod}:{name}"
    if not mod or "<" in name or "." in name or getattr(importlib.import_module(mod), name, None) is not fn:
        raise TypeError(f"evaluate must be given by reference on Ray: 'MODULE:FUNCTION' or a module-level "
                        f"function a worker can import, got {str(fn)[:80]}")
    return ref


def resolve(ref: str, kwargs: dict) -> Callable:
    """The evaluator named ``ref`` with ``kwargs`` bound (its ``higher_is_better`` kept)."""
    from ..search_cli import SearchCliError, load_evaluator

    try:
        fn = load_evaluator(ref)
    except SearchCliError as exc:
        raise ValueError(str(exc).replace("--eval ", "evaluate ", 1)) from None
    if not kwargs:
        return fn
    bound = functools.partial(fn, **kwargs)
    bound.higher_is_better = getattr(fn, "higher_is_better", True)
    return bound


def _guarded(fn: Callable, *args) -> tuple:
    """("ok", value, pid, start, end) or ("error", message, candidate): a SearchError's text goes
    back, not the exception (its traceback may not unpickle on the driver)."""
    t = time.time()
    try:
        return "ok", fn(*args), os.getpid(), t, time.time()
    except SearchError as exc:
        return "error", str(exc), exc.candidate


class SearchWorker:
    """A Ray actor: one :class:`~.search.Scorer` on the worker's device."""

    def __init__(self, source: Any, refs: Sequence[str], eval_kwargs: dict, dirs: Sequence[int], settings: dict):
        from .model import DPPA

        if isinstance(source, DPPA):
            d, model, extra = source, None, {}
        else:
            d, model, extra = source()
        self.scorer = Scorer(d, [resolve(r, eval_kwargs) for r in refs], dirs, model=model, **{**settings, **extra})

    def info(self, best: Optional[list] = None) -> dict:
        d = self.scorer.d
        return {"m": d.m, "levels": d.levels, "labels": d.labels, "backend": d.backend, "summary": d.summary,
                "realised_density": d.realised_density(best) if best is not None else None}

    def dense(self, i: int) -> tuple:
        return _guarded(self.scorer.dense_score, i)

    def score(self, key: tuple, dense: Optional[list]) -> tuple:
        self.scorer.dense = dense
        return _guarded(self.scorer.score, key)


class _Pool:
    """Jobs (``("dense", i)`` or ``("score", candidate)``) on idle actors, in submission order;
    ``result(job)`` waits for one (submitting it if needed). Thread-safe (per-task searches run
    in threads)."""

    def __init__(self, ray, actors: list, labels: Sequence[str], timeline: Optional[list]):
        self.ray, self.idle, self.labels, self.timeline = ray, list(actors), labels, timeline
        self.queue: deque = deque()
        self.futures: dict = {}
        self.dense: Optional[list] = None
        self.lock = threading.RLock()  # a done callback may run inside _pump, in the same thread

    def submit(self, job: tuple) -> None:
        with self.lock:
            if job not in self.futures:
                self.futures[job] = Future()
                self.queue.append(job)
                self._pump()

    def _pump(self) -> None:
        while self.idle and self.queue:
            job = self.queue.popleft()
            actor = self.idle.pop()
            ref = actor.dense.remote(job[1]) if job[0] == "dense" else actor.score.remote(job[1], self.dense)
            ref.future().add_done_callback(functools.partial(self._done, job, actor))

    def _done(self, job: tuple, actor, fut) -> None:
        with self.lock:
            self.idle.append(actor)
            self._pump()
        out = self.futures[job]
        try:
            value = fut.result()
        except BaseException as exc:  # noqa: BLE001 (a lost worker: the waiting search reports it)
            out.set_exception(exc)
            return
        if value[0] == "ok" and self.timeline is not None:
            self.timeline.append({"job": job, "pid": value[2], "start": value[3], "end": value[4]})
        out.set_result(value)

    def result(self, job: tuple) -> Any:
        self.submit(job)
        what = f"the dense model {self.labels[job[1]]}" if job[0] == "dense" else describe(job[1], self.labels)
        try:
            value = self.futures[job].result()
        except self.ray.exceptions.RayError as exc:
            raise SearchError(f"a Ray worker failed on {what}: {str(exc)[:500]}", what, None) from None
        if value[0] == "error":
            raise SearchError(value[1], value[2], None)
        return value[1]


class _RemoteScorer:
    """The driver's stand-in for a :class:`~.search.Scorer`: candidates go to the pool."""

    def __init__(self, pool: _Pool, dirs: Sequence[int], multi: bool):
        self.pool, self.dirs, self.multi = pool, dirs, multi

    def direction(self, task: Optional[int]) -> int:
        return direction_of(task, self.dirs, self.multi)

    def prefetch(self, keys: Sequence[tuple]) -> None:
        for key in keys:
            self.pool.submit(("score", key))

    def score(self, key: tuple) -> tuple:
        return self.pool.result(("score", key))


def _side_by_side(fn: Callable[[int], tuple], n: int) -> list:
    """``fn(i)`` for every i at once, in threads (the per-task searches); results in task order."""
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="dppa-search-task") as tp:
        return list(tp.map(fn, range(n)))


def width(strategy: str, max_evals: int, levels: Sequence, per_task: bool, multi: bool) -> int:
    """The most evaluations the search can run at once (see the module docstring)."""
    def one(k: int) -> int:
        return len(_subset(grid_points(k), max_evals)) if strategy == "grid" else 1
    if per_task:
        return sum(one(len(lv)) for lv in levels)
    return max(one(len(levels[0])), len(levels) if multi else 1)


def search_on_ray(source: Any, evaluate: Union[Ref, Sequence[Ref]], *, eval_kwargs: Optional[dict] = None,
                  strategy: str = "greedy", max_evals: int = 20, per_task: bool = False,
                  objective: Optional[Callable[[list], float]] = None, higher_is_better: Optional[bool] = None,
                  combine: str = "sum", weights: Optional[Sequence[float]] = None, lam: float = 1.0,
                  out_dtype: Optional[torch.dtype] = None, device: Optional[str] = None,
                  address: Optional[str] = None, workers: Optional[int] = None,
                  gpus_per_worker: Optional[float] = None, cpus_per_worker: float = 1,
                  on_row: Optional[Callable[[dict], None]] = None, info: Optional[dict] = None,
                  timeline: Optional[list] = None) -> SearchResult:
    """:func:`.search.search` with the evaluations on Ray actors; the same :class:`SearchResult`
    apart from the times, the same :class:`SearchError` (naming the candidate, ``.partial`` the
    table up to it).

    ``source``: a :class:`~.model.DPPA` (put into the object store once; each worker holds a copy,
    with its ``module`` if it has one), or a picklable callable run on each worker that returns
    ``(DPPA, model or None, merge keywords)`` (e.g. one that builds both from shared folders).
    ``evaluate``: ``MODULE:FUNCTION`` (or a module-level function) or one per model, called as
    ``f(state, **eval_kwargs)`` on the worker. ``objective`` travels pickled. ``device``: where the
    workers merge and evaluate (default: the DPPA's; with ``cuda`` each actor asks for
    ``gpus_per_worker`` GPUs, default 1). ``address`` / ``workers``: as for the Ray executor;
    ``workers`` caps the actors (default: as many as the cluster's CPUs or GPUs and the search's
    parallelism allow). ``info``: filled with the workers' view of the DPPA (levels, labels,
    backend, allocation summary, realised density of the best factors). ``timeline``: filled
    with one ``{job, pid, start, end}`` per evaluation.
    """
    from ..engine.ray_executor import connect, import_ray
    from .model import DPPA

    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {str(strategy)[:40]!r}")
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers must be a positive integer, got {str(workers)[:40]!r}")
    if gpus_per_worker is not None and not gpus_per_worker > 0:
        raise ValueError(f"gpus_per_worker must be positive, got {str(gpus_per_worker)[:40]!r}")
    is_dppa = isinstance(source, DPPA)
    if not is_dppa and not callable(source):
        raise TypeError(f"source must be a DPPA or a callable that builds one on a worker, got {type(source).__name__}")
    refs = [reference(e) for e in (evaluate if isinstance(evaluate, (list, tuple)) else [evaluate])]
    kwargs = dict(eval_kwargs or {})
    if not refs:
        raise TypeError("evaluate must name one evaluator or one per fine-tuned model")
    dirs = directions([resolve(r, kwargs) for r in refs], higher_is_better)  # also checks every reference
    if is_dppa:
        check_args(strategy, max_evals, len(refs), source.levels, per_task)
        device = device or source.device.type
    device = device or "cpu"
    cuda = str(device).startswith("cuda")
    ray = import_ray()
    connect(address, workers)
    resources = ray.cluster_resources()
    need = "GPU" if cuda else "CPU"
    cap = int(resources.get(need, 0) // ((gpus_per_worker or 1) if cuda else cpus_per_worker))
    if cap < 1:
        raise ValueError(f"the Ray cluster has no room for one worker ({need}s: {resources.get(need, 0)})")
    actor_cls = ray.remote(SearchWorker).options(num_cpus=cpus_per_worker,
                                                 num_gpus=(gpus_per_worker or 1) if cuda else 0)
    settings = dict(per_task=per_task, objective=objective, combine=combine, weights=weights, lam=lam,
                    out_dtype=out_dtype)
    src = ray.put(source) if is_dppa else source
    actors = [actor_cls.remote(src, refs, kwargs, dirs, settings)]
    pool = None
    try:
        seen = _get(ray, actors[0].info.remote())
        check_args(strategy, max_evals, len(refs), seen["levels"], per_task)
        multi = not per_task and len(refs) > 1
        n = min(workers or cap, cap, width(strategy, max_evals, seen["levels"], per_task, multi))
        actors += [actor_cls.remote(src, refs, kwargs, dirs, settings) for _ in range(n - 1)]
        pool = _Pool(ray, actors, seen["labels"], timeline)
        result = _run(pool, seen, strategy, max_evals, per_task, multi, dirs, on_row)
        if info is not None:
            info.update(_get(ray, actors[0].info.remote(result.best)))
        return result
    finally:
        for actor in actors:
            ray.kill(actor)


def _get(ray, ref):
    try:
        return ray.get(ref)
    except ray.exceptions.RayError as exc:  # the setup failed on the worker (a missing file, a bad reference)
        cause = getattr(exc, "cause", None)
        raise ValueError(f"a Ray search worker could not start: {str(cause if cause is not None else exc)[:1000]}") \
            from None


def _run(pool: _Pool, seen: dict, strategy: str, max_evals: int, per_task: bool, multi: bool, dirs: list,
         on_row) -> SearchResult:
    t0 = time.perf_counter()
    result = SearchResult(strategy, per_task=per_task)
    try:
        if multi:
            for i in range(seen["m"]):  # independent: all at once
                pool.submit(("dense", i))
            pool.dense = gather_dense(result, seen["m"], lambda i: pool.result(("dense", i)))
        scorer = _RemoteScorer(pool, dirs, multi)
        return drive(result, strategy, max_evals, seen["levels"], per_task,
                     lambda: _Runner(max_evals, scorer, on_row), each=_side_by_side)
    finally:
        result.seconds = time.perf_counter() - t0
