"""Evaluation runs: answer examples through the model's decoding path, score them, ablate the instruction.

Answers come from `deepsynth.models.generate.Decoder`, the path the engine and the server use, with
the bundle's decoding defaults, so a reported score is a score of what `ask` and `serve` return.
Decoding and scoring are `deepsynth.training.validation.evaluate_examples` (the trainer validates
through the same routine) and the task rules of `deepsynth.data.metrics`; their names stay
importable from here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import Dataset

from deepsynth.data.metrics import (  # noqa: F401  (task rules, importable from here as before)
    SHORT_ANSWER_WORDS, TASK_METRICS, ablation_summary, attach_tasks, metrics_of_tasks, score_predictions, task_of)
from deepsynth.data.schema import InstructionExample
from deepsynth.models.generate import Decoder, GenerationSettings
from deepsynth.render import RenderConfig
from deepsynth.training.validation import (  # noqa: F401  (the one evaluation routine)
    as_dataset, decode_dataset, decode_items, evaluate_examples, scored)

logger = logging.getLogger(__name__)


def ablation_report(normal: dict, ablated: dict | None, chance: float = 0.0,
                    out_path: str | Path | None = None) -> dict:
    """The report of `evaluate_with_ablation` from its two `evaluate_examples` results (written
    to `out_path` when given). `ablated` None (no ablation run): the fields of the run without the
    instruction are None."""
    key = "em" if "em" in normal["scores"] else normal["metrics"][0]
    report = {
        "n": len(normal["predictions"]),
        "metrics": normal["metrics"],
        "scores": normal["scores"],
        "scores_no_instruction": ablated["scores"] if ablated is not None else None,
        "ablation": ({"metric": key, **ablation_summary(normal["scores"][key], ablated["scores"][key], chance)}
                     if ablated is not None else None),
        "predictions": normal["predictions"],
        "predictions_no_instruction": ablated["predictions"] if ablated is not None else None,
    }
    if out_path is not None:
        from deepsynth import storage

        storage.write_text(out_path, json.dumps(report, indent=2))  # a local path or an object-storage URI
    return report


def evaluate_with_ablation(
    decoder: Decoder,
    data: Sequence[InstructionExample] | Dataset,
    render_config: RenderConfig | None = None,
    chance: float = 0.0,
    settings: GenerationSettings | None = None,
    out_path: str | Path | None = None,
    metrics: Sequence[str] | None = None,
    batch_size: int = 16,
) -> dict:
    """Normal score, score with the instruction removed, and the chance level, side by side
    (each example scored by its task unless `metrics` is given).

    A model that really reads the instruction must fall towards `chance` without it. Each batch of
    pages is drawn once and answered with and without the instruction (`decode_dataset`).
    """
    dataset, examples = as_dataset(data, render_config)
    normal, ablated = decode_dataset(decoder, dataset, (None, ""), settings, batch_size)
    return ablation_report(scored(normal, examples, metrics), scored(ablated, examples, metrics), chance, out_path)
