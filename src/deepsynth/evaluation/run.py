"""Evaluation runs: answer examples through the model's decoding path, score them, ablate the instruction.

Answers come from `deepsynth.models.generate.Decoder`, the path the engine and the server use, with
the bundle's decoding defaults, so a reported score is a score of what `ask` and `serve` return.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from torch.utils.data import Dataset

from deepsynth.data.instruction_dataset import InstructionDataset
from deepsynth.data.schema import InstructionExample
from deepsynth.evaluation.metrics import ablation_summary, aggregate
from deepsynth.models.generate import Decoder, GenerationSettings
from deepsynth.render import RenderConfig

logger = logging.getLogger(__name__)

QA_METRICS = ("em", "f1")
SUMMARY_METRICS = ("em", "f1", "rouge1", "rouge2", "rougeL")


def default_metrics(examples: Sequence[InstructionExample]) -> tuple[str, ...]:
    """EM/F1 for extractive answers; ROUGE-1/2/L as well when any target is free-form
    (summaries: converters mark them `meta["extractive"] = False`)."""
    if any((ex.meta or {}).get("extractive") is False for ex in examples):
        return SUMMARY_METRICS
    return QA_METRICS


def _items(data, render_config: RenderConfig | None) -> tuple[list[dict], list[InstructionExample]]:
    if isinstance(data, Dataset):
        dataset = data
    else:
        dataset = InstructionDataset(list(data), render_config)
    examples = list(getattr(dataset, "examples", None) or getattr(getattr(dataset, "dataset", None), "examples", []))
    items = [dataset[i] for i in range(len(dataset))]
    return items, examples


def decode_items(decoder: Decoder, items: Sequence[dict], settings: GenerationSettings | None = None,
                 instruction: str | None = None, batch_size: int = 16) -> list[dict]:
    """Prediction records of dataset items (``{"id", "pages", "instruction", "answer"}``), answered
    ``batch_size`` per `generate` call: {"id", "instruction", "prediction", "answer", "stopped",
    "new_tokens", "prompt_tokens"}. `instruction` replaces every item's instruction when given."""
    instructions = [it["instruction"] if instruction is None else instruction for it in items]
    rows = decoder.run_all([it["pages"] for it in items], instructions, settings, batch_size=batch_size)
    return [
        {"id": it["id"], "instruction": ins, "prediction": r["answer"], "answer": it["answer"],
         "stopped": r["stopped"], "new_tokens": r["new_tokens"], "prompt_tokens": r["prompt_tokens"]}
        for it, ins, r in zip(items, instructions, rows)
    ]


def score_predictions(records: Sequence[dict], metrics: Sequence[str]) -> dict:
    """Scores of prediction records against their answers, and how often each stop reason occurred."""
    scores = aggregate([r["prediction"] for r in records], [r["answer"] for r in records], metrics=metrics)
    stops = [r["stopped"] for r in records]
    scores["stopped"] = {k: sum(s == k for s in stops) for k in sorted(set(stops))}
    return scores


def evaluate_examples(
    decoder: Decoder,
    data: Sequence[InstructionExample] | Dataset,
    render_config: RenderConfig | None = None,
    settings: GenerationSettings | None = None,
    metrics: Sequence[str] | None = None,
    instruction: str | None = None,
    batch_size: int = 16,
) -> dict:
    """Score a model on examples (rendered with `render_config`) or on a dataset of pages
    (e.g. `InstructionDataset.from_prepared`). `instruction` replaces every example's instruction
    when given ("" removes it: the ablation). Returns {"scores", "metrics", "predictions"}; each
    prediction records why generation stopped and how many tokens it took."""
    items, examples = _items(data, render_config)
    metrics = tuple(metrics) if metrics else default_metrics(examples)
    records = decode_items(decoder, items, settings, instruction, batch_size)
    return {"scores": score_predictions(records, metrics), "metrics": list(metrics), "predictions": records}


def ablation_report(normal: dict, ablated: dict, chance: float = 0.0, out_path: str | Path | None = None) -> dict:
    """The report of `evaluate_with_ablation` from its two `evaluate_examples` results (written
    to `out_path` when given)."""
    key = "em" if "em" in normal["scores"] else normal["metrics"][0]
    report = {
        "n": len(normal["predictions"]),
        "metrics": normal["metrics"],
        "scores": normal["scores"],
        "scores_no_instruction": ablated["scores"],
        "ablation": {"metric": key, **ablation_summary(normal["scores"][key], ablated["scores"][key], chance)},
        "predictions": normal["predictions"],
        "predictions_no_instruction": ablated["predictions"],
    }
    if out_path is not None:
        from deepsynth.atomic import write_text_atomic

        write_text_atomic(out_path, json.dumps(report, indent=2))
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
    """Normal score, score with the instruction removed, and the chance level, side by side.

    A model that really reads the instruction must fall towards `chance` without it.
    """
    normal = evaluate_examples(decoder, data, render_config, settings, metrics, batch_size=batch_size)
    ablated = evaluate_examples(decoder, data, render_config, settings, normal["metrics"], instruction="",
                                batch_size=batch_size)
    return ablation_report(normal, ablated, chance, out_path)
