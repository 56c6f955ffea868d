"""Evaluation: one log-prob engine and the task loaders (tasks), the A/B item type (ab), bootstrap CIs
(metrics), conditions with shuffled-label controls (conditions), the trade-off sweep (sweep), reports (report)
and the ``persona-kernels eval`` entry point (runner). The demo (:mod:`persona_kernels.demo`) is a preset of it."""

from persona_kernels.evaluation.ab import ABItem, swap_options
from persona_kernels.evaluation.metrics import Estimate, bootstrap_mean, paired_difference
from persona_kernels.evaluation.tasks import ResponsePair, choice_logprobs, score_items, sequence_logprobs

__all__ = [
    "ABItem", "swap_options", "Estimate", "bootstrap_mean", "paired_difference", "ResponsePair", "choice_logprobs",
    "score_items", "sequence_logprobs",
]
