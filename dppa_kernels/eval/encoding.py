"""Token ids of prompt/answer pairs and padded batches of them (shared by training and evaluation).

A pair is encoded as ``tokenizer(prompt)`` (with the tokenizer's own special tokens, e.g. BOS),
then the answer's tokens without special tokens, then EOS when the tokenizer has one: exactly
what greedy generation after the prompt must produce. Labels are -100 on the prompt, so a loss
over them is the loss of the answer given the prompt.
"""

from __future__ import annotations

from typing import Sequence

import torch

IGNORE = -100  # the label transformers' causal-LM loss skips


def pad_id(tokenizer) -> int:
    """The id used to pad batches: the pad token, else EOS, else 0 (always masked out)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    return list(tokenizer(prompt)["input_ids"])


def encode_answer(tokenizer, answer: str) -> list[int]:
    ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    return ids + ([int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else [])


def encode_pair(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one pair; labels are IGNORE on the prompt tokens."""
    p, a = encode_prompt(tokenizer, prompt), encode_answer(tokenizer, answer)
    return p + a, [IGNORE] * len(p) + a


def right_padded(seqs: Sequence[Sequence[int]], labels: Sequence[Sequence[int]], pad: int) -> dict:
    """input_ids, attention_mask and labels [B, T] with right padding (for training and losses)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    lab = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, y) in enumerate(zip(seqs, labels)):
        ids[i, :len(s)] = torch.tensor(s)
        lab[i, :len(y)] = torch.tensor(y)
        mask[i, :len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": lab}


def left_padded(seqs: Sequence[Sequence[int]], pad: int) -> dict:
    """input_ids and attention_mask [B, T] with left padding (for batched generation)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return {"input_ids": ids, "attention_mask": mask}
