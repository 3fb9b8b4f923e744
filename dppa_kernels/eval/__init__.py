"""Offline evaluators, usable as ``MODULE:FUNCTION`` references (``dppa_kernels.eval:exact_match``).

Each evaluator is called as ``evaluator(model, **kwargs) -> float`` with an HF ``PreTrainedModel``
and keyword arguments naming the data; its ``higher_is_better`` attribute says which way is
better, so a search maximises ``score if higher_is_better else -score``.
"""

from .evaluators import exact_match, loss, score_direction
from .lm_harness import lm_eval
from .metrics import exact_match_accuracy, greedy_answers, mean_text_loss, mean_token_loss

__all__ = ["exact_match", "exact_match_accuracy", "greedy_answers", "lm_eval", "loss", "mean_text_loss",
           "mean_token_loss", "score_direction"]
