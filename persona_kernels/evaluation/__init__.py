"""Evaluation: log-likelihood scoring, bias-free A/B scoring, paired response margins, bootstrap CIs,
task loaders (tasks), conditions with shuffled-label controls (conditions), the trade-off sweep (sweep),
reports (report) and the ``persona-kernels eval`` entry point (runner)."""

from persona_kernels.evaluation.ab import ABItem, ABScores, score_ab, swap_options
from persona_kernels.evaluation.loglik import LogLik, continuation_loglik
from persona_kernels.evaluation.metrics import Estimate, bootstrap_mean, paired_difference
from persona_kernels.evaluation.paired import ResponsePair, response_margin, text_logprob

__all__ = [
    "ABItem", "ABScores", "score_ab", "swap_options", "LogLik", "continuation_loglik", "Estimate",
    "bootstrap_mean", "paired_difference", "ResponsePair", "response_margin", "text_logprob",
]
