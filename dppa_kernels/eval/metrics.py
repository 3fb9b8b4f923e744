"""Exact-match accuracy (greedy generation) and mean token loss of a model on in-memory data."""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from .encoding import encode_answer, encode_pair, encode_prompt, left_padded, pad_id, right_padded


@contextlib.contextmanager
def _inference(model) -> Iterator[torch.device]:
    """Eval mode and no autograd for the duration; the model's training flag is restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield next(model.parameters()).device
    finally:
        model.train(was_training)


def prompt_batches(tokenizer, prompts: Sequence[str], batch_size: int) -> list[dict]:
    """Left-padded ``input_ids`` / ``attention_mask`` batches of the encoded prompts."""
    pad = pad_id(tokenizer)
    return [left_padded([encode_prompt(tokenizer, p) for p in prompts[s:s + batch_size]], pad)
            for s in range(0, len(prompts), batch_size)]


def generate_answers(model, tokenizer, batches: Sequence[dict], *, max_new_tokens: int) -> list[str]:
    """Greedy continuation of each prompt of ``batches`` (from :func:`prompt_batches`) with
    ``model.generate``, decoded without special tokens and cut at EOS."""
    pad = pad_id(tokenizer)
    out: list[str] = []
    with _inference(model) as device:
        for enc in batches:
            gen = model.generate(
                input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id, temperature=None, top_p=None, top_k=None)
            new = gen[:, enc["input_ids"].shape[1]:].tolist()
            for row in new:
                if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in row:
                    row = row[:row.index(tokenizer.eos_token_id)]
                out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


def greedy_answers(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int,
                   batch_size: int = 128) -> list[str]:
    """Greedy continuation of each prompt (``model.generate``, left-padded batches), decoded
    without special tokens and cut at EOS; at most ``max_new_tokens`` tokens each."""
    return generate_answers(model, tokenizer, prompt_batches(tokenizer, prompts, batch_size),
                            max_new_tokens=max_new_tokens)


def default_max_new_tokens(tokenizer, examples: Sequence) -> int:
    """The longest answer's token count + 4 (room for EOS and a tokenization longer than the answer's)."""
    return max(len(encode_answer(tokenizer, ex.answer)) for ex in examples) + 4


def exact_match_of(answers: Sequence[str], examples: Sequence) -> float:
    """Fraction of ``answers`` that, stripped, equal their example's answer stripped."""
    return sum(p.strip() == ex.answer.strip() for p, ex in zip(answers, examples)) / len(examples)


def exact_match_accuracy(model, tokenizer, examples: Sequence, *, batch_size: int = 128,
                         max_new_tokens: int | None = None, method: str = "generate") -> float:
    """Fraction of examples whose greedy continuation, stripped, equals the answer stripped.

    ``examples`` have ``.prompt`` and ``.answer``. ``method``:

    * ``"generate"``: ``model.generate`` greedy decoding; ``max_new_tokens`` defaults to the
      longest answer's token count + 4 (room for EOS and a tokenization longer than the answer's).
    * ``"teacher_forced"``: one forward pass over prompt + answer + EOS; an example counts when
      the argmax at every answer position is the answer's token. Greedy decoding produces the
      answer's tokens then EOS exactly when this holds, so both methods agree whenever the
      tokenizer has one tokenization per answer and EOS (a character tokenizer) — up to float
      near-ties between cached and uncached attention — at a fraction of the cost.
    """
    if not examples:
        raise ValueError("examples must not be empty")
    if method == "teacher_forced":
        if tokenizer.eos_token_id is None:
            raise ValueError("method='teacher_forced' needs a tokenizer with an EOS token")
        return _teacher_forced_hits(model, tokenizer, examples, batch_size) / len(examples)
    if method != "generate":
        raise ValueError(f"method must be 'generate' or 'teacher_forced', got {str(method)[:40]!r}")
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(tokenizer, examples)
    preds = greedy_answers(model, tokenizer, [ex.prompt for ex in examples],
                           max_new_tokens=max_new_tokens, batch_size=batch_size)
    return exact_match_of(preds, examples)


def _teacher_forced_hits(model, tokenizer, examples: Sequence, batch_size: int) -> int:
    pairs = [encode_pair(tokenizer, ex.prompt, ex.answer) for ex in examples]
    hits = 0
    with _inference(model) as device:
        for s in range(0, len(pairs), batch_size):
            chunk = pairs[s:s + batch_size]
            batch = right_padded([p[0] for p in chunk], [p[1] for p in chunk], pad_id(tokenizer))
            logits = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device)).logits
            labels = batch["labels"].to(device)[:, 1:]
            wrong = (logits[:, :-1].argmax(-1) != labels) & (labels != -100)
            hits += int((~wrong.any(dim=1)).sum())
    return hits


def _summed_loss(model, batch: dict, device) -> tuple[float, int]:
    """Sum of next-token cross-entropies over labelled positions, and their count."""
    logits = model(input_ids=batch["input_ids"].to(device),
                   attention_mask=batch["attention_mask"].to(device)).logits
    labels = batch["labels"].to(device)[:, 1:]
    logits = logits[:, :-1].float()
    total = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                              ignore_index=-100, reduction="sum")
    return float(total), int((labels != -100).sum())


def loss_batches(tokenizer, examples: Sequence, batch_size: int) -> list[dict]:
    """Right-padded batches of prompt + answer + EOS, labelled on the answer (and EOS) only."""
    if not examples:
        raise ValueError("examples must not be empty")
    pairs = [encode_pair(tokenizer, ex.prompt, ex.answer) for ex in examples]
    return _batches([p[0] for p in pairs], [p[1] for p in pairs], pad_id(tokenizer), batch_size)


def text_loss_batches(tokenizer, texts: Sequence[str], *, max_length: int, batch_size: int) -> list[dict]:
    """Right-padded batches of ``texts`` labelled on every token; a text longer than
    ``max_length`` tokens is cut into consecutive windows."""
    seqs = []
    for text in texts:
        ids = list(tokenizer(text)["input_ids"])
        seqs.extend(ids[i:i + max_length] for i in range(0, len(ids), max_length))
    seqs = [s for s in seqs if len(s) > 1]
    if not seqs:
        raise ValueError("texts hold no window of two or more tokens")
    return _batches(seqs, seqs, pad_id(tokenizer), batch_size)


def _batches(seqs, labels, pad: int, batch_size: int) -> list[dict]:
    return [right_padded(seqs[s:s + batch_size], labels[s:s + batch_size], pad) for s in range(0, len(seqs), batch_size)]


def mean_loss(model, batches: Sequence[dict]) -> float:
    """Mean next-token cross-entropy (nats) over the labelled positions of ``batches``."""
    total, count = 0.0, 0
    with _inference(model) as device:
        for batch in batches:
            t, c = _summed_loss(model, batch, device)
            total, count = total + t, count + c
    if count == 0:
        raise ValueError("no token to score (every answer is empty and the tokenizer has no EOS)")
    return total / count


def mean_token_loss(model, tokenizer, examples: Sequence, *, batch_size: int = 128) -> float:
    """Mean cross-entropy (nats) over all answer tokens (and EOS) given their prompts; every
    token counts once, so long answers weigh more than short ones."""
    return mean_loss(model, loss_batches(tokenizer, examples, batch_size))


def mean_text_loss(model, tokenizer, texts: Sequence[str], *, max_length: int, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy over every token of ``texts`` (after the first of each
    window); a text longer than ``max_length`` tokens is cut into consecutive windows."""
    return mean_loss(model, text_loss_batches(tokenizer, texts, max_length=max_length, batch_size=batch_size))
