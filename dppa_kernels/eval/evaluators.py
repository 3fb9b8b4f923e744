"""File-based evaluators: ``evaluator(model, *, data, tokenizer=None, ...) -> float``.

Signature shared by ``exact_match`` and ``loss``:

* ``model``: a ``transformers.PreTrainedModel`` (causal LM), on any device; it is not modified
  (eval mode and no gradients during the call, its training flag restored after).
* ``data``: path of a local file (see each evaluator).
* ``tokenizer``: a tokenizer object, a folder to load one from with ``AutoTokenizer``, or None for
  the model's own folder (``model.name_or_path``).
* ``batch_size``: examples per forward pass / generation batch.

``higher_is_better`` on each function gives the score's direction.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from ..tasks.examples import Example, PathLike, read_jsonl
from .metrics import exact_match_accuracy, mean_text_loss, mean_token_loss

_TEXT_MAX_LENGTH = 2048  # window cap for plain-text loss when the model allows longer contexts


def resolve_tokenizer(model, tokenizer):
    """The tokenizer object for ``model``: as given, loaded from a folder, or from the model's folder."""
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    source = tokenizer if tokenizer is not None else getattr(model, "name_or_path", "")
    if not source or not Path(source).is_dir():
        raise ValueError("tokenizer is required: pass a tokenizer or its folder (the model has no local folder "
                         f"to load one from; name_or_path={str(source)[:100]!r})")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source))


def _limit(items: list, limit: Optional[int]) -> list:
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")
    return items if limit is None else items[:limit]


def exact_match(model, *, data: PathLike, tokenizer: Any = None, batch_size: int = 64,
                max_new_tokens: Optional[int] = None, limit: Optional[int] = None) -> float:
    """Exact-match accuracy in [0, 1] on a JSONL file of ``{"prompt": ..., "answer": ...}`` lines.

    Each prompt is continued greedily with ``model.generate`` (left-padded batches, stop at EOS);
    a prediction counts when its decoded text, stripped of surrounding whitespace, equals the
    stripped answer. ``limit`` scores only the first ``limit`` examples. Higher is better.
    """
    examples = _limit(read_jsonl(data), limit)
    return exact_match_accuracy(model, resolve_tokenizer(model, tokenizer), examples, batch_size=batch_size,
                                max_new_tokens=max_new_tokens)


exact_match.higher_is_better = True


def _read_loss_data(path: Path) -> Union[list[Example], list[str]]:
    """Prompt/answer pairs or texts from a JSONL file (``text`` field), or a plain text file."""
    if path.suffix != ".jsonl":
        return [path.read_text(encoding="utf-8")]
    first = next((line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()), "")
    try:
        has_text = isinstance(json.loads(first), dict) and "prompt" not in json.loads(first)
    except json.JSONDecodeError:
        has_text = False
    if not has_text:
        return read_jsonl(path)
    texts = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        obj = json.loads(line) if line.strip().startswith("{") else None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise ValueError(f"{path}:{i}: expected an object with a string field 'text', got {line.strip()[:80]!r}")
        texts.append(obj["text"])
    return texts


def loss(model, *, data: PathLike, tokenizer: Any = None, batch_size: int = 32,
         limit: Optional[int] = None) -> float:
    """Mean token cross-entropy (nats per token) on a local file. Lower is better.

    * ``*.jsonl`` with ``prompt``/``answer`` fields: loss of the answer tokens (and EOS) given the
      prompt, averaged over all answer tokens of the file.
    * ``*.jsonl`` with a ``text`` field: loss over every token of each text after its first.
    * any other file: its whole content as one text, cut into windows of the model's context
      length (``max_position_embeddings``, at most 2048 tokens).
    """
    path = Path(data)
    if not path.is_file():
        raise ValueError(f"data file {str(path)[:200]!r} does not exist")
    items = _limit(_read_loss_data(path), limit)
    tok = resolve_tokenizer(model, tokenizer)
    if items and isinstance(items[0], Example):
        return mean_token_loss(model, tok, items, batch_size=batch_size)
    max_len = min(int(getattr(model.config, "max_position_embeddings", _TEXT_MAX_LENGTH)), _TEXT_MAX_LENGTH)
    return mean_text_loss(model, tok, items, max_length=max_len, batch_size=batch_size)


loss.higher_is_better = False


def lm_eval(model, *, tasks: Union[str, Sequence[str]], tokenizer: Any = None, include_path: Optional[PathLike] = None,
            metric: Optional[str] = None, limit: Optional[int] = None, batch_size: int = 8,
            num_fewshot: Optional[int] = None, include_defaults: Optional[bool] = None) -> float:
    """Score of ``model`` on lm-evaluation-harness ``tasks`` (needs the ``lm-eval`` package).

    ``include_path`` is a folder of custom task YAMLs (e.g. a local ``dataset_path: json`` task, so
    nothing is downloaded). ``include_defaults`` also indexes lm-eval's built-in tasks; by default
    only when no ``include_path`` is given (indexing them takes tens of seconds). The score is the
    mean over ``tasks`` of ``metric`` (default: each task's first reported metric); a metric lm-eval marks lower-is-better is negated, so higher is always
    better.
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ImportError("the lm_eval evaluator needs lm-evaluation-harness: pip install 'dppa-kernels[eval]' "
                          f"({exc})") from None
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"tasks must be a task name or a non-empty list of names, got {str(tasks)[:100]!r}")
    if include_path is not None and not Path(include_path).is_dir():
        raise ValueError(f"include_path {str(include_path)[:200]!r} is not a folder")
    lm = HFLM(pretrained=model, tokenizer=resolve_tokenizer(model, tokenizer), batch_size=batch_size)
    if include_defaults is None:
        include_defaults = include_path is None
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None,
                          include_defaults=include_defaults)
    was_training = model.training
    try:
        out = simple_evaluate(model=lm, tasks=names, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                              log_samples=False)
    finally:
        model.train(was_training)
    scores = [_task_score(out, name, metric) for name in names]
    return sum(scores) / len(scores)


lm_eval.higher_is_better = True


def _task_score(out: dict, task: str, metric: Optional[str]) -> float:
    results = out["results"].get(task)
    if results is None:
        raise ValueError(f"lm-eval returned no results for task {task!r} (got {sorted(out['results'])[:5]})")
    values = {k.split(",")[0]: v for k, v in results.items() if "," in k and not k.split(",")[0].endswith("_stderr")
              and isinstance(v, (int, float))}
    if not values:
        raise ValueError(f"lm-eval task {task!r} reported no numeric metric")
    name = metric if metric is not None else next(iter(values))
    if name not in values:
        raise ValueError(f"metric {name!r} is not among task {task!r}'s metrics {sorted(values)}")
    higher = out.get("higher_is_better", {}).get(task, {}).get(name, True)
    return float(values[name]) if higher else -float(values[name])


def score_direction(evaluator: Callable) -> int:
    """+1 when ``evaluator``'s scores are better higher, −1 when lower (its ``higher_is_better``);
    evaluators without the attribute count as higher-is-better."""
    return 1 if getattr(evaluator, "higher_is_better", True) else -1
