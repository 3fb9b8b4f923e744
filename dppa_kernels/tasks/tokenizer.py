"""A character-level tokenizer as a Hugging Face fast tokenizer (saves and loads with AutoTokenizer).

One token per character of :data:`ALPHABET`; ``<bos>`` is prepended to every encoded text,
``<eos>`` ends every answer in training, ``<pad>`` pads batches, ``<unk>`` stands for any other
character. Decoding joins the characters without separators.
"""

from __future__ import annotations

from typing import Optional

from .generators import ALPHABET

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0..3


def char_tokenizer(alphabet: Optional[str] = None):
    """A ``PreTrainedTokenizerFast`` with one token per character of ``alphabet`` (default ALPHABET)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = ALPHABET if alphabet is None else alphabet
    if not isinstance(alphabet, str) or not alphabet or len(set(alphabet)) != len(alphabet):
        raise ValueError(f"alphabet must be a non-empty string of distinct characters, got {str(alphabet)[:60]!r}")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=4096)
