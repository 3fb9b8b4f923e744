"""Prompt/response data for PAT tuning: JSONL loading with validation, tokenisation with an
instruction template, and a collator that puts the loss on response tokens only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

# the recipe's alpaca-style template of the recipe; the response follows, then </s>
ALPACA_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n"
IGNORE_INDEX = -100  # labels with this value carry no loss (torch cross-entropy's ignore_index)


def _short(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load_jsonl(path: Union[str, Path], prompt_field: str = "prompt",
               response_field: str = "response", limit: Optional[int] = None) -> list[dict]:
    """Rows {"prompt": str, "response": str} from a JSON-lines file (blank lines skipped).

    Every row is checked before anything is returned: a missing file, a line that is not a JSON
    object, a missing or non-string field, or an empty response raises ValueError naming the file,
    the line and the field. ``limit`` keeps the first ``limit`` rows (all are still checked).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist or is not a file")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg}): {_short(line.strip())}") \
                    from None
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {_short(obj)}")
            for field in (prompt_field, response_field):
                if field not in obj:
                    raise ValueError(f"{where}: missing field {field!r} (fields: "
                                     f"{_short(sorted(obj))})")
                if not isinstance(obj[field], str):
                    raise ValueError(f"{where}: field {field!r} must be a string, got "
                                     f"{_short(obj[field])}")
            if not obj[response_field]:
                raise ValueError(f"{where}: field {response_field!r} is empty")
            rows.append({"prompt": obj[prompt_field], "response": obj[response_field]})
    if not rows:
        raise ValueError(f"data file {str(path)!r} has no rows")
    return rows if limit is None else rows[:limit]


def tokenize_pairs(rows: Sequence[dict], tokenizer, template: str = ALPACA_TEMPLATE,
                   max_length: int = 256) -> list[dict]:
    """Features {"prompt_ids", "response_ids"} (lists of ints) for ``ResponseOnlyCollator``.

    prompt = tokenizer(template.format(prompt=row["prompt"])) with the tokenizer's special tokens
    (e.g. BOS); response = tokenizer(row["response"]) without them, then EOS if the tokenizer has
    one. A pair longer than ``max_length`` is cut from the right; a pair whose response would be
    cut entirely is dropped (it would carry no loss).
    """
    if "{prompt}" not in template:
        raise ValueError(f"template must contain '{{prompt}}', got {_short(template)}")
    if not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length must be an int >= 2, got {max_length!r}")
    eos = getattr(tokenizer, "eos_token_id", None)
    out = []
    for row in rows:
        p = list(tokenizer(template.format(prompt=row["prompt"]))["input_ids"])
        r = list(tokenizer(row["response"], add_special_tokens=False)["input_ids"])
        if eos is not None:
            r.append(int(eos))
        if len(p) >= max_length:
            continue
        out.append({"prompt_ids": p, "response_ids": r[:max_length - len(p)]})
    return out


class ResponseOnlyCollator:
    """Pads a list of {"prompt_ids", "response_ids"} features into a batch whose labels are the
    response tokens only: {"input_ids", "attention_mask", "labels"}, [B, T] int64 tensors.

    labels = input_ids on response positions and ``IGNORE_INDEX`` (−100) on prompt and padding
    positions (the model shifts labels by one internally, so token t+1 is predicted at t).
    Padding is on the right: position ids then start at 0 for every row, as transformers computes
    them from the sequence index. ``pad_to_multiple_of`` rounds T up (tensor-core friendly).
    Features that already hold ``input_ids`` and ``labels`` are padded as they are.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: Optional[int] = None) -> None:
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a non-negative int, got {pad_token_id!r}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict]) -> dict:
        seqs, labels = [], []
        for f in features:
            if "prompt_ids" in f:
                p, r = list(f["prompt_ids"]), list(f["response_ids"])
                seqs.append(p + r)
                labels.append([IGNORE_INDEX] * len(p) + r)
            else:
                seqs.append(list(f["input_ids"]))
                labels.append(list(f["labels"]))
        t = max(len(s) for s in seqs)
        q = self.pad_to_multiple_of
        if q:
            t = -(-t // q) * q
        ids = torch.full((len(seqs), t), self.pad_token_id, dtype=torch.long)
        lab = torch.full((len(seqs), t), IGNORE_INDEX, dtype=torch.long)
        att = torch.zeros((len(seqs), t), dtype=torch.long)
        for i, (s, y) in enumerate(zip(seqs, labels)):
            ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            lab[i, :len(y)] = torch.tensor(y, dtype=torch.long)
            att[i, :len(s)] = 1
        return {"input_ids": ids, "attention_mask": att, "labels": lab}
