"""Text metrics (EM/F1 with SQuAD normalisation, ROUGE, aggregation, instruction ablation): they live
in `deepsynth.data.metrics`, below the trainer that validates with them; importable from here too."""

from deepsynth.data.metrics import (  # noqa: F401
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
