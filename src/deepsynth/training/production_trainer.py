"""The training API users know from the original project, as a thin layer over `Trainer`.

    from deepsynth.training.production_trainer import UnifiedProductionTrainer

    trainer = UnifiedProductionTrainer({"model_name": "deepseek-ocr-2", "use_lora": True})
    metrics, checkpoints = trainer.train(dataset)

`config` is a `TrainerConfig`, a dict of its fields, or a YAML recipe path. `dataset` is anything the
project produces: an `InstructionDataset` (e.g. from `create_instruction_dataset_from_qa`), a list of
`InstructionExample`s or of their dicts, a `datasets.Dataset` with id/text/instruction/answer
columns, or a .jsonl/.json/.parquet file. Training itself is `deepsynth.training.trainer.Trainer`:
same loop, checkpoints, resume and metrics as `deepsynth train`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from deepsynth.data.instruction_dataset import InstructionDataset
from deepsynth.data.schema import InstructionExample
from deepsynth.training.config import TrainerConfig
from deepsynth.training.trainer import Trainer

__all__ = ["UnifiedProductionTrainer", "as_config", "as_examples", "as_training_data"]


def as_config(config: TrainerConfig | Mapping | str | os.PathLike | None, **overrides) -> TrainerConfig:
    """A TrainerConfig from a TrainerConfig, a dict of its fields, or a YAML recipe (+ overrides)."""
    if config is None:
        return TrainerConfig(**overrides)
    if isinstance(config, TrainerConfig):
        return TrainerConfig(**{**{f.name: getattr(config, f.name) for f in fields(TrainerConfig)}, **overrides})
    if isinstance(config, Mapping):
        known = {f.name for f in fields(TrainerConfig)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"unknown TrainerConfig fields {unknown}")
        return TrainerConfig(**{**config, **overrides})
    if isinstance(config, (str, os.PathLike)):
        return TrainerConfig.from_yaml(config, **overrides)
    raise TypeError(f"config must be a TrainerConfig, a dict or a YAML path, got {type(config).__name__}")


def as_examples(data: Any) -> list[InstructionExample]:
    """InstructionExamples from a list of examples/dicts, a `datasets.Dataset`, an InstructionDataset
    or an example file."""
    if isinstance(data, InstructionDataset):
        return list(data.examples)
    if isinstance(data, (str, os.PathLike)):
        from deepsynth.data import read_examples

        return read_examples(Path(data))
    out = []
    for i, item in enumerate(data):
        if isinstance(item, InstructionExample):
            out.append(item)
        elif isinstance(item, Mapping):
            row = {k: v for k, v in item.items() if k in ("id", "text", "instruction", "answer", "source", "meta")}
            out.append(InstructionExample.from_dict(row, where=f"example {i}"))
        else:
            raise TypeError(f"example {i}: expected an InstructionExample or a dict, got {type(item).__name__}")
    return out


def as_training_data(data: Any):
    """What `Trainer.train` takes: a torch Dataset as is (InstructionDataset keeps its pages), else examples."""
    if isinstance(data, Dataset):
        return data
    return as_examples(data)


class UnifiedProductionTrainer:
    """`UnifiedProductionTrainer(config).train(dataset) -> (metrics, checkpoints)`.

    config:     TrainerConfig, dict of its fields, or YAML recipe path.
    model, processor: an already loaded model (else `config.model_name` is loaded).
    metrics:    {"train_steps", "train_seconds", "stopped", "loss_first", "loss_last", "final_model",
                 "eval" (when eval data is given)}; checkpoints: the checkpoint directories kept.
    """

    def __init__(self, config: TrainerConfig | Mapping | str | os.PathLike | None = None, model=None,
                 processor=None, **overrides) -> None:
        self.config = as_config(config, **overrides)
        self.trainer = Trainer(self.config, model=model, processor=processor)

    @property
    def model(self):
        return self.trainer.model

    @property
    def processor(self):
        return self.trainer.processor

    def train(self, dataset, eval_dataset=None) -> tuple[dict, list[str]]:
        """Train on `dataset`; score `eval_dataset` (EM/F1) at eval_interval and at the end."""
        evals = as_examples(eval_dataset) if eval_dataset is not None else None
        return self.trainer.train(as_training_data(dataset), evals)
