"""Evaluation runs: generate answers for examples, score them, ablate the instruction."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from deepsynth.data.instruction_dataset import InstructionDataset
from deepsynth.data.schema import InstructionExample
from deepsynth.evaluation.metrics import aggregate, ablation_summary
from deepsynth.models.collate import Collator
from deepsynth.models.generate import GenerationSettings, generate_answers
from deepsynth.render import RenderConfig

logger = logging.getLogger(__name__)


def evaluate_examples(
    model,
    processor,
    examples: Sequence[InstructionExample],
    render_config: RenderConfig,
    settings: GenerationSettings | None = None,
    metrics: Sequence[str] = ("em", "f1"),
    instruction: str | None = None,
    batch_size: int = 16,
) -> dict:
    """Score a model on examples. `instruction` replaces every example's instruction when given
    ("" removes it: the ablation). Returns {"scores": {...}, "predictions": [...]}."""
    dataset = InstructionDataset(examples, render_config)
    items = [dataset[i] for i in range(len(dataset))]
    instructions = [it["instruction"] if instruction is None else instruction for it in items]
    preds = generate_answers(model, Collator.for_model(model, processor), [it["pages"] for it in items], instructions,
                             settings, batch_size=batch_size)
    scores = aggregate(preds, [ex.answer for ex in examples], metrics=metrics)
    records = [
        {"id": ex.id, "instruction": ins, "prediction": p, "answer": ex.answer}
        for ex, ins, p in zip(examples, instructions, preds)
    ]
    return {"scores": scores, "predictions": records}


def evaluate_with_ablation(
    model,
    processor,
    examples: Sequence[InstructionExample],
    render_config: RenderConfig,
    chance: float,
    settings: GenerationSettings | None = None,
    out_path: str | Path | None = None,
) -> dict:
    """Normal score, score with the instruction removed, and the chance level, side by side.

    A model that really reads the instruction must fall towards `chance` without it.
    """
    normal = evaluate_examples(model, processor, examples, render_config, settings)
    ablated = evaluate_examples(model, processor, examples, render_config, settings, instruction="")
    report = {
        "n": len(examples),
        "scores": normal["scores"],
        "scores_no_instruction": ablated["scores"],
        "ablation": ablation_summary(normal["scores"]["em"], ablated["scores"]["em"], chance),
        "predictions": normal["predictions"],
        "predictions_no_instruction": ablated["predictions"],
    }
    if out_path is not None:
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        Path(out_path).write_text(json.dumps(report, indent=2))
    return report
