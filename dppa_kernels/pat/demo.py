"""A small local starting point for ``dppa pat train``: a Llama-shaped model pretrained briefly on
the package's synthetic tasks, and prompt/response JSONL files of the same tasks (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Union

# task -> size range; small enough for the 0.8 M-parameter model to learn in minutes on a CPU
DEMO_TASKS = {"reverse": (3, 6), "sort": (3, 6), "lookup": (2, 5), "count": (4, 10), "add": (1, 3)}
DEMO_TEMPLATE = "{prompt}"  # the synthetic prompts end in "=", the answer follows directly


def _write(rows, path: Path) -> None:
    with path.open("w", encoding="utf-8") as f:
        for ex in rows:
            f.write(json.dumps({"prompt": ex.prompt, "response": ex.answer}) + "\n")


def make_demo(out: Union[str, Path], *, pretrain_steps: int = 300, n_train: int = 400,
              n_test: int = 100, seed: int = 0, echo: Callable[[str], None] = print) -> dict:
    """Write ``out/model`` (model + tokenizer), ``out/train.jsonl`` and ``out/test.jsonl``.

    The pretraining and the tuning data are disjoint splits of the same tasks (per task:
    ``n_train`` tuning and ``n_test`` test rows; 4 × n_train pretraining rows).
    Returns the paths written.
    """
    from .. import tasks

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"output {str(out)!r} is not empty")
    if pretrain_steps < 1:
        raise ValueError(f"pretrain_steps must be >= 1, got {pretrain_steps}")
    out.mkdir(parents=True, exist_ok=True)
    pre, train, test = [], [], []
    for name, size_range in DEMO_TASKS.items():
        s = tasks.draw_splits(name, {"pre": 4 * n_train, "train": n_train, "test": n_test},
                              seed=seed, size_range=size_range)
        pre, train, test = pre + s["pre"], train + s["train"], test + s["test"]
    tok = tasks.char_tokenizer()
    model = tasks.build_model(tok, tasks.ModelShape(), seed=seed)
    res = tasks.train_model(model, tok, pre, tasks.TrainConfig(steps=pretrain_steps, seed=seed))
    echo(f"pretrained {sum(p.numel() for p in model.parameters()):,} parameters for "
         f"{pretrain_steps} steps (loss {res.losses[0]:.2f} -> {res.losses[-1]:.2f}, "
         f"{res.seconds:.0f} s)")
    model.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    _write(train, out / "train.jsonl")
    _write(test, out / "test.jsonl")
    return {"model": str(out / "model"), "train": str(out / "train.jsonl"),
            "test": str(out / "test.jsonl")}
