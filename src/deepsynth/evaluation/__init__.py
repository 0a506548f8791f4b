"""Evaluation: EM/F1 (SQuAD normalisation), ROUGE, corpus aggregation, instruction ablation. The
metrics live in `deepsynth.data.metrics`, below the trainer that validates with them; they are
importable from here too."""

from deepsynth.data.metrics import (
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
