"""`DeepSynthLoRATrainer`: LoRA fine-tuning with the API users know, over the one `Trainer`.

    from deepsynth.training.deepsynth_lora_trainer import DeepSynthLoRATrainer

    trainer = DeepSynthLoRATrainer({"model_name": "deepseek-ocr-2", "lora_rank": 16, "batch_size": 2})
    metrics, checkpoints = trainer.train(dataset)
    trainer.push_adapters_to_hub("me/deepsynth-squad-lora")   # token: HF_TOKEN or `hf auth login`

`use_lora` is always on (a config with `use_lora: false` is switched on, with a log line);
`use_qlora: true` trains the adapters on a 4-bit base (CUDA only). After `train()` the run directory
holds `adapter/` (the adapters alone, what `push_adapters_to_hub` uploads) and `final/` (the
adapters merged into the base, loadable like any model).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

from deepsynth.training import peft_utils
from deepsynth.training.config import TrainerConfig
from deepsynth.training.production_trainer import UnifiedProductionTrainer, as_config

logger = logging.getLogger(__name__)

__all__ = ["DeepSynthLoRATrainer"]


class DeepSynthLoRATrainer(UnifiedProductionTrainer):
    """LoRA adapters on the decoder's attention/MLP projections (targets per backbone); all base
    weights, vision included, stay frozen."""

    def __init__(self, config: TrainerConfig | Mapping | str | os.PathLike | None = None, model=None,
                 processor=None, **overrides) -> None:
        base = as_config(config, **overrides)
        if not base.use_lora:
            logger.info("DeepSynthLoRATrainer: use_lora switched on")
        # peft freezes everything but the adapters: vision, projector and base decoder stay as they are.
        super().__init__(as_config(base, use_lora=True), model=model, processor=processor)
        self._trained = False

    def train(self, dataset, eval_dataset=None) -> tuple[dict, list[str]]:
        result = super().train(dataset, eval_dataset)
        self._trained = True
        return result

    def trainable_parameters(self) -> dict:
        """The trainable-parameter report (counts overall and per part: lora / vision / decoder / other)."""
        return peft_utils.trainable_parameter_report(self.trainer.model)

    @property
    def adapter_dir(self) -> Path:
        return Path(self.trainer.out) / "adapter"  # the local stage when output_dir is a URI

    def push_adapters_to_hub(self, repo_id: str, token: str | None = None, private: bool = False) -> str:
        """Upload the trained adapters (`output_dir/adapter`) and the processor to `repo_id`.
        The token (argument, HF_TOKEN or stored login) is never printed."""
        if not self._trained or not (self.adapter_dir / "adapter_config.json").is_file():
            raise RuntimeError("no trained adapters yet: call train() first "
                               f"(expected {self.adapter_dir}/adapter_config.json)")
        return peft_utils.push_adapters_to_hub(self.adapter_dir, repo_id, token=token, private=private,
                                               processor=self.trainer.processor)
