"""Evaluation: EM/F1 (SQuAD normalisation), ROUGE, corpus aggregation, instruction ablation."""

from deepsynth.evaluation.metrics import (
    ROUGE_KEYS,
    SUPPORTED_METRICS,
    ablation_summary,
    aggregate,
    exact_match,
    f1_score,
    normalize_answer,
    rouge_scores,
)

__all__ = [
    "ROUGE_KEYS",
    "SUPPORTED_METRICS",
    "ablation_summary",
    "aggregate",
    "exact_match",
    "f1_score",
    "normalize_answer",
    "rouge_scores",
]
