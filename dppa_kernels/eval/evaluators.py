"""File-based evaluators: ``evaluator(model, *, data, tokenizer=None, ...) -> float``.

Signature shared by ``exact_match`` and ``loss`` (``lm_eval``, in ``lm_harness``, takes task names):

* ``model``: a ``transformers.PreTrainedModel`` (causal LM), on any device; it is not modified
  (eval mode and no gradients during the call, its training flag restored after).
* ``data``: path of a local file (see each evaluator).
* ``tokenizer``: a tokenizer object, a folder to load one from with ``AutoTokenizer``, or None for
  the model's own folder (``model.name_or_path``).
* ``batch_size``: examples per forward pass / generation batch.

``higher_is_better`` on each function gives the score's direction. The tokenizer loaded from a
folder, the parsed file and its token batches are prepared on the first call and reused while
the files and arguments are unchanged (``eval.prepared``): a search's later candidates only run
the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional, Union

from ..tasks.examples import Example, PathLike, read_jsonl
from .metrics import (default_max_new_tokens, exact_match_of, generate_answers, loss_batches, mean_loss,
                      prompt_batches, text_loss_batches)
from .prepared import cached, data_file, file_version, load_tokenizer

_TEXT_MAX_LENGTH = 2048  # window cap for plain-text loss when the model allows longer contexts


def resolve_tokenizer(model, tokenizer):
    """The tokenizer object for ``model``: as given, loaded from a folder, or from the model's folder."""
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    source = tokenizer if tokenizer is not None else getattr(model, "name_or_path", "")
    if not source or not Path(source).is_dir():
        raise ValueError("tokenizer is required: pass a tokenizer or its folder (the model has no local folder "
                         f"to load one from; name_or_path={str(source)[:100]!r})")
    return load_tokenizer(Path(source))


def _check_counts(batch_size: Any, **optional: Any) -> None:
    """``batch_size`` is a positive integer, each other keyword one or None (checked before they
    become part of a cache key)."""
    for name, v in {"batch_size": batch_size, **optional}.items():
        if (v is not None or name == "batch_size") and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be a positive integer{'' if name == 'batch_size' else ' or None'}, "
                             f"got {str(v)[:40]!r}")


def _limit(items: list, limit: Optional[int]) -> list:
    return items if limit is None else items[:limit]


def exact_match(model, *, data: PathLike, tokenizer: Any = None, batch_size: int = 64,
                max_new_tokens: Optional[int] = None, limit: Optional[int] = None) -> float:
    """Exact-match accuracy in [0, 1] on a JSONL file of ``{"prompt": ..., "answer": ...}`` lines.

    Each prompt is continued greedily with ``model.generate`` (left-padded batches, stop at EOS);
    a prediction counts when its decoded text, stripped of surrounding whitespace, equals the
    stripped answer. ``limit`` scores only the first ``limit`` examples. Higher is better.
    """
    _check_counts(batch_size, limit=limit, max_new_tokens=max_new_tokens)
    path = data_file(data)
    tok = resolve_tokenizer(model, tokenizer)

    def prepare() -> tuple:
        examples = _limit(read_jsonl(path), limit)
        n_new = default_max_new_tokens(tok, examples) if max_new_tokens is None else max_new_tokens
        return examples, n_new, prompt_batches(tok, [ex.prompt for ex in examples], batch_size)
    examples, n_new, batches = cached(("exact_match", file_version(path), id(tok), limit, batch_size, max_new_tokens),
                                      prepare, pin=tok)
    return exact_match_of(generate_answers(model, tok, batches, max_new_tokens=n_new), examples)


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
    _check_counts(batch_size, limit=limit)
    path = data_file(data)
    tok = resolve_tokenizer(model, tokenizer)
    max_len = min(int(getattr(model.config, "max_position_embeddings", _TEXT_MAX_LENGTH)), _TEXT_MAX_LENGTH)

    def prepare() -> list:
        items = _limit(_read_loss_data(path), limit)
        if items and isinstance(items[0], Example):
            return loss_batches(tok, items, batch_size)
        return text_loss_batches(tok, items, max_length=max_len, batch_size=batch_size)
    batches = cached(("loss", file_version(path), id(tok), limit, batch_size, max_len), prepare, pin=tok)
    return mean_loss(model, batches)


loss.higher_is_better = False


def score_direction(evaluator: Callable) -> int:
    """+1 when ``evaluator``'s scores are better higher, −1 when lower (its ``higher_is_better``);
    evaluators without the attribute count as higher-is-better."""
    return 1 if getattr(evaluator, "higher_is_better", True) else -1
