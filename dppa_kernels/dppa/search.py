"""The α search of DPPA: band factors chosen on the caller's validation data.

Only the apply pass runs per candidate (the statistics are cached in the :class:`DPPA` object).

* ``greedy`` (the official coordinate ascent, corrected): factors rounded to one decimal, step
  0.1. α₁ (top band) starts at 1.8 and moves up while the score improves, else down while it
  improves (two-sided). Each lower band starts at 0, tries 1.0, reverts to 0 when 1.0 is not
  better, else climbs by 0.1 while it improves.
* ``grid``: α₁ ∈ {1.0, 1.1, …, 3.0} × each lower α ∈ {0} ∪ {1.0, …, 2.0}; when ``max_evals`` is
  smaller than the grid, an evenly spaced subset of it (the result says ``complete: False``).

Every evaluated candidate is memoised. ``evaluate(candidate) -> float`` receives the merged state
dict, or ``model`` with that state loaded when a model is given. With one evaluator per fine-tuned
model, ``per_task=True`` searches each model's own factors on its own task (model i alone, on the
base) and merges with them; ``per_task=False`` searches one factor list shared by all models with
the objective (default) geometric mean over tasks of score_i / dense_i, where dense_i is task i's
score of the dense fine-tuned model i (dense_i / score_i for lower-is-better scores), so higher is
better. A single evaluator scores the merged model directly (its direction respected).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch

from ..eval import score_direction

STRATEGIES = ("greedy", "grid")
STEP = 0.1
GREEDY_START_TOP = 1.8
GRID_TOP = tuple(round(1.0 + STEP * i, 1) for i in range(21))
GRID_LOWER = (0.0,) + tuple(round(1.0 + STEP * i, 1) for i in range(11))


@dataclass
class SearchResult:
    """best: the chosen factors per model; best_score: its objective; table: every evaluated
    candidate (``alphas``, ``task`` (its model index, or None for a shared candidate), ``score`` as returned, ``objective``, ``apply_s``,
    ``eval_s``), in evaluation order; ``best_score`` is the best candidate's score (per task: None); ``dense``: the dense fine-tuned scores used to normalise."""

    strategy: str
    best: Optional[list] = None
    best_score: Optional[float] = None
    table: list = field(default_factory=list)
    dense: Optional[list] = None
    per_task: bool = False
    complete: bool = True
    seconds: float = 0.0

    @property
    def eval_seconds(self) -> float:
        return sum(r["eval_s"] for r in self.table) + sum((self.dense_eval_s or [0.0]))

    dense_eval_s: Optional[list] = None

    def to_json(self) -> dict:
        return {"strategy": self.strategy, "per_task": self.per_task, "best_alphas": self.best,
                "best_score": self.best_score, "dense_scores": self.dense, "complete": self.complete,
                "seconds": self.seconds, "eval_seconds": self.eval_seconds, "candidates": self.table}


class SearchError(RuntimeError):
    """The evaluator failed (raised, or returned NaN/Inf / a non-number) on a candidate.
    ``candidate``: its factors; ``partial``: the :class:`SearchResult` up to that point."""

    def __init__(self, message: str, candidate: Any, partial: SearchResult):
        super().__init__(message)
        self.candidate = candidate
        self.partial = partial


def _r(x: float) -> float:
    return round(x + 0.0, 1)


def greedy(score: Callable[[tuple], float], k: int, budget: Callable[[], bool]) -> None:
    """Coordinate ascent over k factors (see the module docstring); ``score`` memoises and
    raises when the budget is spent; ``budget()`` says whether another evaluation may run."""
    cur = [GREEDY_START_TOP] + [0.0] * (k - 1)
    best = score(tuple(cur))
    for direction in (+1, -1):  # the top band: up while better, else down while better
        moved = False
        while budget():
            trial = cur.copy()
            trial[0] = _r(cur[0] + direction * STEP)
            if trial[0] < 0:
                break
            s = score(tuple(trial))
            if s > best:
                cur, best, moved = trial, s, True
            else:
                break
        if moved:
            break
    for j in range(1, k):  # each lower band: 1.0 or back to 0, then up while better
        if not budget():
            return
        trial = cur.copy()
        trial[j] = 1.0
        s = score(tuple(trial))
        if s <= best:
            continue  # the official code would stay at 1.0 here
        cur, best = trial, s
        while budget():
            trial = cur.copy()
            trial[j] = _r(cur[j] + STEP)
            s = score(tuple(trial))
            if s > best:
                cur, best = trial, s
            else:
                break


def grid_points(k: int) -> list:
    """The spec's grid for k factors (top band first)."""
    pts = [(a,) for a in GRID_TOP]
    for _ in range(1, k):
        pts = [p + (b,) for p in pts for b in GRID_LOWER]
    return pts


def _subset(points: list, n: int) -> list:
    if n >= len(points):
        return points
    idx = sorted({round(i * (len(points) - 1) / max(n - 1, 1)) for i in range(n)})
    return [points[i] for i in idx]


class _Exhausted(Exception):
    pass


def _call(evaluate: Callable, state: Any, what: str) -> float:
    """The evaluator's value on ``state``, checked; a failure is a :class:`SearchError` naming
    ``what`` (its ``partial`` is attached by the search that ran it)."""
    try:
        v = evaluate(state)
    except Exception as exc:  # noqa: BLE001 (any failure of the user's evaluator is reported the same way)
        raise SearchError(f"evaluate failed on {what}: {type(exc).__name__}: {str(exc)[:200]}",
                          what, None) from exc
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SearchError(f"evaluate returned {type(v).__name__} {str(v)[:60]!r} on {what}; expected a "
                          f"number", what, None)
    if not math.isfinite(v):
        raise SearchError(f"evaluate returned {v} on {what}; expected a finite number", what, None)
    return float(v)


def _load(model, state: dict):
    """``model`` with ``state`` copied into its parameters and buffers (same names)."""
    with torch.no_grad():
        own = model.state_dict()
        for name, t in state.items():
            if name in own:
                own[name].copy_(t)
    return model


def evaluators(evaluate: Union[Callable, Sequence[Callable]]) -> list:
    evals = list(evaluate) if isinstance(evaluate, (list, tuple)) else [evaluate]
    if not evals or not all(callable(e) for e in evals):
        raise TypeError("evaluate must be a callable or a list of callables (one per fine-tuned model)")
    return evals


def check_args(strategy: str, max_evals: int, n_evals: int, levels: Sequence, per_task: bool) -> None:
    """The search's arguments against the models' density levels (one tuple per model)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {str(strategy)[:40]!r}")
    if isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < 1:
        raise ValueError(f"max_evals must be a positive integer, got {str(max_evals)[:40]!r}")
    m = len(levels)
    if n_evals > 1 and n_evals != m:
        raise ValueError(f"evaluate has {n_evals} callables, expected 1 or one per model ({m})")
    if per_task and n_evals != m:
        raise ValueError(f"per_task needs one evaluator per fine-tuned model ({m}), got {n_evals}")
    if len({len(lv) for lv in levels}) != 1 and not per_task:
        raise ValueError("a shared search needs the same number of density levels for every model")


def directions(evals: Sequence[Callable], higher_is_better: Optional[bool]) -> list:
    """+1 / −1 per evaluator: the argument when given, else each evaluator's attribute."""
    if higher_is_better is not None:
        return [1 if higher_is_better else -1] * len(evals)
    return [score_direction(e) for e in evals]


def direction_of(task: Optional[int], dirs: Sequence[int], multi: bool) -> int:
    """The sign that turns a candidate's score into the value maximised (+1 for the objective of a
    shared search over several tasks, which is higher-is-better)."""
    return dirs[task] if task is not None else 1 if multi else dirs[0]


def describe(key: tuple, labels: Sequence[str]) -> str:
    """How errors name the candidate ``(task, alphas)``."""
    task, a = key
    return f"model {labels[task]} alphas {a}" if task is not None else f"alphas {list(a)}"


class Scorer:
    """Scores candidates in this process: builds a candidate (the apply pass, merged into the
    model's tensors when there is a model) and calls the evaluator on it, checking its value.

    A candidate is ``(task, alphas)``: ``task`` the model index of a per-task search, else None.
    The sequential search runs one Scorer; the Ray search one per worker (same code, same values).
    With several evaluators and a shared search, :attr:`dense` must hold the dense models' scores
    (:meth:`dense_score`) before any candidate is scored.
    """

    def __init__(self, d, evals: Sequence[Callable], dirs: Sequence[int], *, per_task: bool = False,
                 model: Any = None, objective: Optional[Callable[[list], float]] = None, combine: str = "sum",
                 weights: Optional[Sequence[float]] = None, lam: float = 1.0,
                 out_dtype: Optional[torch.dtype] = None):
        self.d, self.evals, self.dirs, self.per_task = d, list(evals), list(dirs), per_task
        self.model = model if model is not None else getattr(d, "module", None)
        self.into = self.model.state_dict() if self.model is not None else None  # the model's own tensors
        d._static_into = None  # nothing in ``into`` is known to hold this search's α-free tensors yet
        self.objective, self.merge_kw = objective, dict(combine=combine, weights=weights, lam=lam)
        self.out_dtype = out_dtype
        self.multi = not per_task and len(self.evals) > 1
        self.dense: Optional[list] = None

    def _wrap(self, sd: dict):
        return _load(self.model, sd) if self.model is not None else sd

    def _merged(self, alphas, **kw):
        """The candidate: merged straight into the model's tensors when there is a model."""
        out = self.d.merge(alphas, out_dtype=self.out_dtype, into=self.into, **kw)
        return self.model if self.model is not None else out

    def direction(self, task: Optional[int]) -> int:
        return direction_of(task, self.dirs, self.multi)

    def prefetch(self, keys: Sequence[tuple]) -> None:
        pass  # candidates are scored when asked for, one at a time

    def dense_score(self, i: int) -> tuple[float, float]:
        """(task i's score of the dense fine-tuned model i, seconds)."""
        d, t = self.d, time.perf_counter()
        state = {n: (b + d.deltas[i][n].to(b.dtype)) if n in d.deltas[i] else b for n, b in d.base.items()}
        raw = _call(self.evals[i], self._wrap(state), f"the dense model {d.labels[i]}")
        d._static_into = None  # the dense model overwrote every tensor of the evaluation model
        return raw, time.perf_counter() - t

    def score(self, key: tuple) -> tuple[float, float, float]:
        """(the candidate's score as returned, apply seconds, evaluation seconds)."""
        task, a = key
        t = time.perf_counter()
        if task is not None:
            state = self._merged([a], models=[task])
            ev = self.evals[task]
        else:
            state = self._merged(a, **self.merge_kw)
            ev = self._combined if self.multi else self.evals[0]
        t_apply = time.perf_counter() - t
        t = time.perf_counter()
        raw = _call(ev, state, describe(key, self.d.labels))
        return raw, t_apply, time.perf_counter() - t

    def _combined(self, state) -> float:
        """The shared-α objective over several tasks (default: the geometric mean of the
        normalised scores)."""
        return float((self.objective or self._geo_mean)([ev(state) for ev in self.evals]))

    def _geo_mean(self, scores: list) -> float:
        ratios = []
        for s, ref, sign in zip(scores, self.dense, self.dirs):
            if s <= 0 or ref <= 0:
                raise ValueError(f"the default objective needs positive scores (got {s} against the dense "
                                 f"model's {ref}); pass objective=")
            ratios.append(s / ref if sign > 0 else ref / s)
        return math.exp(sum(math.log(r) for r in ratios) / len(ratios))


class _Runner:
    """The driver's side of one search (or one task's): memoises, stops at ``max_evals`` and
    records each candidate's row in evaluation order. ``scorer``: a :class:`Scorer`, or any object
    with its ``score``, ``direction`` and ``prefetch`` (which announces candidates that will be
    asked for in this order, so that a parallel scorer can start them all)."""

    def __init__(self, max_evals: int, scorer: Scorer, on_row: Optional[Callable[[dict], None]] = None):
        self.max_evals, self.scorer, self.on_row = max_evals, scorer, on_row
        self.memo, self.count, self.rows = {}, 0, []

    def budget(self) -> bool:
        return self.count < self.max_evals

    def prefetch(self, keys: Sequence[tuple]) -> None:
        self.scorer.prefetch(keys)

    def run(self, key: tuple) -> float:
        if key in self.memo:
            return self.memo[key]
        if not self.budget():
            raise _Exhausted
        raw, t_apply, t_eval = self.scorer.score(key)
        self.count += 1
        value = self.scorer.direction(key[0]) * raw
        self.memo[key] = value
        self.rows.append({"alphas": list(key[1]), "task": key[0], "score": raw, "objective": value,
                          "apply_s": t_apply, "eval_s": t_eval})
        if self.on_row is not None:
            self.on_row(self.rows[-1])
        return value


def in_order(fn: Callable[[int], tuple], n: int) -> list:
    """``fn(i)`` for i = 0, 1, ... until the first failure (a sequential per-task search)."""
    out = []
    for i in range(n):
        out.append(fn(i))
        if not out[-1][0]:
            break
    return out


def gather_dense(result: SearchResult, m: int, score: Callable[[int], tuple]) -> list:
    """The dense models' scores (``score(i) -> (score, seconds)``, in model order) into
    ``result``; returns them. A failure's ``partial`` is ``result``."""
    try:
        dense = [score(i) for i in range(m)]
    except SearchError as exc:
        exc.partial = result
        raise
    result.dense, result.dense_eval_s = [s for s, _ in dense], [t for _, t in dense]
    return result.dense


def drive(result: SearchResult, strategy: str, max_evals: int, levels: Sequence, per_task: bool,
          make_runner: Callable[[], _Runner], each: Callable = in_order) -> SearchResult:
    """The strategy over the candidates: per task (``each(fn, m)`` runs the task searches; their
    rows go into the table task by task) or shared. Fills ``result``; a :class:`SearchError`
    gets ``result`` (the table up to the failed candidate) as its ``partial``."""
    if per_task:
        runners = [make_runner() for _ in levels]

        def one(i: int) -> tuple:
            try:
                return True, _strategy(strategy, runners[i], len(levels[i]), max_evals, result, task=i)
            except SearchError as exc:
                return False, exc
        best = []
        for i, (ok, value) in enumerate(each(one, len(levels))):
            result.table.extend(runners[i].rows)
            if not ok:
                value.partial = result
                raise value
            best.append(list(value))
        result.best, result.best_score = best, None
        return result
    runner = make_runner()
    try:
        best = _strategy(strategy, runner, len(levels[0]), max_evals, result, task=None)
    except SearchError as exc:
        exc.partial = result
        raise
    finally:
        result.table.extend(runner.rows)
    result.best = [list(best)] * len(levels)
    result.best_score = runner.memo[(None, best)] * runner.scorer.direction(None)  # the score's own sign
    return result


def search(d, evaluate: Union[Callable, Sequence[Callable]], *, strategy: str = "greedy", max_evals: int = 20,
           per_task: bool = False, model: Any = None, objective: Optional[Callable[[list], float]] = None,
           higher_is_better: Optional[bool] = None, combine: str = "sum", weights: Optional[Sequence[float]] = None,
           lam: float = 1.0, out_dtype: Optional[torch.dtype] = None) -> SearchResult:
    """Search the band factors of ``d`` (a :class:`DPPA`); returns a :class:`SearchResult`.

    ``evaluate``: one callable (scores the merge), or one per fine-tuned model (task i's
    validation score). ``max_evals``: evaluations of candidates (memoised repeats and the dense
    reference scores are not counted); per task with ``per_task``. ``objective``: maps the list
    of per-task scores of a shared candidate to the value maximised (default above).
    ``higher_is_better``: overrides each evaluator's ``higher_is_better`` attribute.
    ``combine`` / ``weights`` / ``lam`` / ``out_dtype``: the merge the candidates are evaluated in.
    Raises :class:`SearchError` (with ``.partial``) when the evaluator fails on a candidate.
    The same search on the workers of a Ray cluster: :func:`.ray_search.search_on_ray`.
    """
    evals = evaluators(evaluate)
    check_args(strategy, max_evals, len(evals), d.levels, per_task)
    scorer = Scorer(d, evals, directions(evals, higher_is_better), per_task=per_task, model=model,
                    objective=objective, combine=combine, weights=weights, lam=lam, out_dtype=out_dtype)
    t0 = time.perf_counter()
    result = SearchResult(strategy, per_task=per_task)
    try:
        if scorer.multi:
            scorer.dense = gather_dense(result, d.m, scorer.dense_score)
        return drive(result, strategy, max_evals, d.levels, per_task, lambda: _Runner(max_evals, scorer))
    finally:
        result.seconds = time.perf_counter() - t0


def _strategy(strategy: str, runner: _Runner, k: int, max_evals: int, result: SearchResult, task) -> tuple:
    tried = []

    def tracked(a):
        tried.append(a)
        return runner.run((task, a))
    try:
        if strategy == "greedy":
            greedy(tracked, k, runner.budget)
        else:
            pts = grid_points(k)
            chosen = _subset(pts, max_evals)
            result.complete = result.complete and len(chosen) == len(pts)
            runner.prefetch([(task, p) for p in chosen])  # independent: a parallel runner starts them all
            for p in chosen:
                tracked(p)
    except _Exhausted:
        pass
    done = [a for a in tried if (task, a) in runner.memo]
    return max(done, key=lambda a: runner.memo[(task, a)])
