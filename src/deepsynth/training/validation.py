"""Scores of a model on examples, decoded the way `ask` and `serve` decode them: the one evaluation
routine of the project. The trainer validates through it, and `deepsynth evaluate` (with its
instruction ablation, `deepsynth.evaluation.run`) and `predict` build on it.

Answers come from `deepsynth.models.generate.Decoder` with the bundle's decoding defaults; each
answer is scored by its task's metrics (`deepsynth.data.metrics`).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch.utils.data import Dataset

from deepsynth.data.instruction_dataset import InstructionDataset
from deepsynth.data.metrics import attach_tasks, score_predictions
from deepsynth.data.schema import InstructionExample
from deepsynth.models.generate import Decoder, GenerationSettings
from deepsynth.render import RenderConfig


def as_dataset(data, render_config: RenderConfig | None) -> tuple[Dataset, list[InstructionExample]]:
    """(a dataset of items, its examples) for examples (drawn with `render_config`) or a dataset."""
    dataset = data if isinstance(data, Dataset) else InstructionDataset(list(data), render_config)
    examples = list(getattr(dataset, "examples", None) or getattr(getattr(dataset, "dataset", None), "examples", []))
    return dataset, examples


def decode_dataset(decoder: Decoder, dataset: Dataset, instructions: Sequence[str | None] = (None,),
                   settings: GenerationSettings | None = None, batch_size: int = 16) -> list[list[dict]]:
    """Prediction records (`decode_items`) of every item of `dataset`, once per entry of
    `instructions` (None: each item's own; "": none, the ablation): one list per entry, in the
    dataset's order. Items are drawn one batch at a time and answered by every pass before the next
    batch is drawn, so each page is rendered once and one batch of pages is in memory; the batches
    are `Decoder.run_all`'s, so the answers are those of one `run_all` over the whole dataset."""
    passes: list[list[dict]] = [[] for _ in instructions]
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        for records, instruction in zip(passes, instructions):
            records += decode_items(decoder, items, settings, instruction, batch_size)
    return passes


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
    dataset, examples = as_dataset(data, render_config)
    records = decode_dataset(decoder, dataset, (instruction,), settings, batch_size)[0]
    return scored(records, examples, metrics)


def scored(records: list[dict], examples: Sequence[InstructionExample], metrics: Sequence[str] | None = None) -> dict:
    """{"scores", "metrics", "predictions"} of prediction records (each scored by its example's task
    unless `metrics` is given)."""
    records = attach_tasks(records, examples)
    scores = score_predictions(records, metrics)
    names = [k for k in scores if k not in ("n", "by_task", "stopped")]
    return {"scores": scores, "metrics": names, "predictions": records}
