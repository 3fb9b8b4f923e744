"""The α search of DPPA (DPPA.md §6): band factors chosen on the caller's validation data.

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


class _Runner:
    """Evaluates candidates: builds the state (apply pass), calls the evaluator, checks the score,
    memoises and times, and stops at ``max_evals``."""

    def __init__(self, result: SearchResult, max_evals: int):
        self.result, self.max_evals, self.memo, self.count = result, max_evals, {}, 0

    def budget(self) -> bool:
        return self.count < self.max_evals

    def run(self, key, build: Callable[[], Any], evaluate: Callable, direction: int, describe: str) -> float:
        if key in self.memo:
            return self.memo[key]
        if not self.budget():
            raise _Exhausted
        t = time.perf_counter()
        state = build()
        t_apply = time.perf_counter() - t
        t = time.perf_counter()
        raw = _call(evaluate, state, describe, self.result)
        t_eval = time.perf_counter() - t
        self.count += 1
        value = direction * raw
        self.memo[key] = value
        self.result.table.append({"alphas": list(key[1]), "task": key[0], "score": raw, "objective": value,
                                  "apply_s": t_apply, "eval_s": t_eval})
        return value


class _Exhausted(Exception):
    pass


def _call(evaluate: Callable, state: Any, describe: str, partial: SearchResult) -> float:
    try:
        v = evaluate(state)
    except Exception as exc:  # noqa: BLE001 (any failure of the user's evaluator is reported the same way)
        raise SearchError(f"evaluate failed on {describe}: {type(exc).__name__}: {str(exc)[:200]}",
                          describe, partial) from exc
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        v = v.item()
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise SearchError(f"evaluate returned {type(v).__name__} {str(v)[:60]!r} on {describe}; expected a "
                          f"number", describe, partial)
    if not math.isfinite(v):
        raise SearchError(f"evaluate returned {v} on {describe}; expected a finite number", describe, partial)
    return float(v)


def _load(model, state: dict):
    """``model`` with ``state`` copied into its parameters and buffers (same names)."""
    with torch.no_grad():
        own = model.state_dict()
        for name, t in state.items():
            if name in own:
                own[name].copy_(t)
    return model


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
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {str(strategy)[:40]!r}")
    if isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < 1:
        raise ValueError(f"max_evals must be a positive integer, got {str(max_evals)[:40]!r}")
    evals = list(evaluate) if isinstance(evaluate, (list, tuple)) else [evaluate]
    if not evals or not all(callable(e) for e in evals):
        raise TypeError("evaluate must be a callable or a list of callables (one per fine-tuned model)")
    if len(evals) > 1 and len(evals) != d.m:
        raise ValueError(f"evaluate has {len(evals)} callables, expected 1 or one per model ({d.m})")
    if per_task and len(evals) != d.m:
        raise ValueError(f"per_task needs one evaluator per fine-tuned model ({d.m}), got {len(evals)}")
    if len({len(lv) for lv in d.levels}) != 1 and not per_task:
        raise ValueError("a shared search needs the same number of density levels for every model")
    dirs = [(1 if higher_is_better else -1) if higher_is_better is not None else score_direction(e) for e in evals]
    model = model if model is not None else getattr(d, "module", None)
    wrap = (lambda sd: _load(model, sd)) if model is not None else (lambda sd: sd)
    into = model.state_dict() if model is not None else None  # the model's own tensors
    d._static_into = None  # nothing in ``into`` is known to hold this search's α-free tensors yet

    def merged(alphas, **kw):
        """The candidate: merged straight into the model's tensors when there is a model."""
        out = d.merge(alphas, out_dtype=out_dtype, into=into, **kw)
        return model if model is not None else out
    t0 = time.perf_counter()
    result = SearchResult(strategy, per_task=per_task)
    runner = _Runner(result, max_evals)
    try:
        if per_task:
            best = []
            for i in range(d.m):
                runner.count = 0
                k = len(d.levels[i])

                def build(a, i=i):
                    return merged([a], models=[i])

                def score(a, i=i):
                    return runner.run((i, a), lambda: build(a), evals[i], dirs[i], f"model {d.labels[i]} alphas {a}")
                best.append(_strategy(strategy, score, k, runner, max_evals, result, task=i))
            result.best = [list(b) for b in best]
            result.best_score = None
        else:
            k = len(d.levels[0])
            if len(evals) == 1:
                ev, direction = evals[0], dirs[0]
            else:
                ev, direction = _multi_objective(d, evals, dirs, wrap, objective, result), 1

            def score(a):
                return runner.run((None, a), lambda: merged(a, combine=combine, weights=weights, lam=lam),
                                  ev, direction, f"alphas {list(a)}")
            best = _strategy(strategy, score, k, runner, max_evals, result, task=None)
            result.best = [list(best)] * d.m
            result.best_score = runner.memo[(None, best)] * direction  # back to the score's own sign
    finally:
        result.seconds = time.perf_counter() - t0
    return result


def _strategy(strategy: str, score: Callable, k: int, runner: _Runner, max_evals: int, result: SearchResult,
              task) -> tuple:
    tried = []

    def tracked(a):
        tried.append(a)
        return score(a)
    try:
        if strategy == "greedy":
            greedy(tracked, k, runner.budget)
        else:
            pts = grid_points(k)
            chosen = _subset(pts, max_evals)
            result.complete = result.complete and len(chosen) == len(pts)
            for p in chosen:
                tracked(p)
    except _Exhausted:
        pass
    done = [a for a in tried if (task, a) in runner.memo]
    return max(done, key=lambda a: runner.memo[(task, a)])


def _multi_objective(d, evals: list, dirs: list, wrap: Callable, objective, result: SearchResult) -> Callable:
    """The shared-α objective over several tasks; scores each dense fine-tuned model first."""
    dense, dense_t = [], []
    for i, ev in enumerate(evals):
        t = time.perf_counter()
        state = {n: (b + d.deltas[i][n].to(b.dtype)) if n in d.deltas[i] else b for n, b in d.base.items()}
        dense.append(_call(ev, wrap(state), f"the dense model {d.labels[i]}", result))
        dense_t.append(time.perf_counter() - t)
    result.dense, result.dense_eval_s = dense, dense_t
    d._static_into = None  # the dense models overwrote every tensor of the evaluation model

    def geo_mean(scores: list) -> float:
        ratios = []
        for s, ref, sign in zip(scores, dense, dirs):
            if s <= 0 or ref <= 0:
                raise ValueError(f"the default objective needs positive scores (got {s} against the dense "
                                 f"model's {ref}); pass objective=")
            ratios.append(s / ref if sign > 0 else ref / s)
        return math.exp(sum(math.log(r) for r in ratios) / len(ratios))

    obj = objective or geo_mean

    def combined(state) -> float:
        return float(obj([ev(state) for ev in evals]))
    combined.higher_is_better = True
    return combined
