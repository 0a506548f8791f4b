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

# How each task is scored. Extractive QA: SQuAD's EM/F1. Summaries and long free-form answers:
# ROUGE-1/2/L (EM of a paraphrase is meaningless). Short free-form answers (yes/no, MS MARCO's
# short answers): both.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "extractive_qa": ("em", "f1"),
    "short_answer": ("em", "f1", "rouge1", "rouge2", "rougeL"),
    "free_form": ("rouge1", "rouge2", "rougeL"),
    "summarization": ("rouge1", "rouge2", "rougeL"),
}
# Longest answer (in words) still scored with EM/F1 when its task is not given.
SHORT_ANSWER_WORDS = 10


def task_of(answer: str, text: str | None = None, meta: dict | None = None) -> str:
    """The task an example is scored as: ``meta["task"]`` when a converter or helper set it
    (SQuAD rows: extractive_qa; summarisation rows and helpers: summarization); otherwise from
    the answer: up to SHORT_ANSWER_WORDS words and extractive (``meta["extractive"]``, or, when
    unmarked, found verbatim in ``text``) -> extractive_qa; up to that length otherwise ->
    short_answer; longer -> free_form."""
    meta = meta or {}
    task = meta.get("task")
    if task is not None:
        if task not in TASK_METRICS:
            raise ValueError(f"meta['task']={task!r} is unknown: use one of {', '.join(TASK_METRICS)}")
        return task
    if len(answer.split()) > SHORT_ANSWER_WORDS:
        return "free_form"
    extractive = meta.get("extractive")
    if extractive is None:
        extractive = text is not None and answer.strip() != "" and answer.strip() in text
    return "extractive_qa" if extractive else "short_answer"


def metrics_of_tasks(tasks: Sequence[str]) -> list[str]:
    """Every metric the tasks are scored with, in one stable order."""
    order = ("em", "f1", "rouge1", "rouge2", "rougeL")
    wanted = {m for t in set(tasks) for m in TASK_METRICS[t]}
    return [m for m in order if m in wanted]


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


def score_predictions(records: Sequence[dict], metrics: Sequence[str] | None = None) -> dict:
    """Scores of prediction records against their answers, overall and per task (``by_task``:
    {task: {"n", metric: mean}}), and how often each stop reason occurred.

    metrics: None scores each record with its task's metrics (``TASK_METRICS``; a record's
    ``task``, else `task_of` its answer); the overall value of a metric is then its mean over the
    records scored with it. Given, every record is scored with those metrics."""
    tasks = [r.get("task") or task_of(r["answer"]) for r in records]
    by_task: dict[str, dict] = {}
    for task in sorted(set(tasks)):
        rows = [r for r, t in zip(records, tasks) if t == task]
        by_task[task] = aggregate([r["prediction"] for r in rows], [r["answer"] for r in rows],
                                  metrics=tuple(metrics) if metrics else TASK_METRICS[task])
    names = [m for m in next(iter(by_task.values())) if m != "n"] if metrics else metrics_of_tasks(tasks)
    scores: dict = {}
    for name in names:
        scored = [(v[name], v["n"]) for v in by_task.values() if name in v]
        scores[name] = sum(value * n for value, n in scored) / sum(n for _, n in scored)
    scores["n"] = len(records)
    scores["by_task"] = by_task
    stops = [r["stopped"] for r in records]
    scores["stopped"] = {k: sum(s == k for s in stops) for k in sorted(set(stops))}
    return scores


def attach_tasks(records: list[dict], examples: Sequence[InstructionExample]) -> list[dict]:
    """Record each prediction's task (`task_of` its example) in the record, in order."""
    if examples and len(examples) != len(records):
        raise ValueError(f"{len(records)} predictions for {len(examples)} examples")
    for i, record in enumerate(records):
        ex = examples[i] if examples else None
        record["task"] = task_of(record["answer"], ex.text if ex else None, ex.meta if ex else None)
    return records


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
    when given ("" removes it: the ablation). `metrics`: None scores each example by its task
    (`TASK_METRICS`). Returns {"scores", "metrics", "predictions"}; each prediction records its
    task, why generation stopped and how many tokens it took."""
    items, examples = _items(data, render_config)
    records = attach_tasks(decode_items(decoder, items, settings, instruction, batch_size), examples)
    scores = score_predictions(records, metrics)
    names = [k for k in scores if k not in ("n", "by_task", "stopped")]
    return {"scores": scores, "metrics": names, "predictions": records}


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

    A model that really reads the instruction must fall towards `chance` without it.
    """
    normal = evaluate_examples(decoder, data, render_config, settings, metrics, batch_size=batch_size)
    ablated = evaluate_examples(decoder, data, render_config, settings, metrics, instruction="",
                                batch_size=batch_size)
    return ablation_report(normal, ablated, chance, out_path)
