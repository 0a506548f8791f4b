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
