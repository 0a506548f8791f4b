"""The familiar training API: UnifiedProductionTrainer and DeepSynthLoRATrainer wrap the one Trainer."""

from pathlib import Path

import pytest

from deepsynth.data.instruction_dataset import InstructionDataset
from deepsynth.data.synthetic import SyntheticConfig, generate
from deepsynth.render import RenderConfig
from deepsynth.training.config import TrainerConfig
from deepsynth.training.deepsynth_lora_trainer import DeepSynthLoRATrainer
from deepsynth.training.production_trainer import UnifiedProductionTrainer
from deepsynth.training.trainer import Trainer

DATA = generate(SyntheticConfig(facts_per_doc=2), 4, "train")


def test_unified_trainer_takes_a_dict_config_and_plain_dicts(tmp_path):
    trainer = UnifiedProductionTrainer({"model_name": "tiny", "output_dir": str(tmp_path / "run"), "batch_size": 2,
                                        "max_steps": 2, "log_interval": 1}, seed=5)
    assert isinstance(trainer.trainer, Trainer) and trainer.config.seed == 5
    rows = [ex.to_dict() for ex in DATA]
    metrics, checkpoints = trainer.train(rows, eval_dataset=rows[:2])
    assert metrics["train_steps"] == 2 and set(metrics["eval"]) >= {"em", "f1"}
    assert [Path(c).name for c in checkpoints] == ["checkpoint-000002"]
    assert Path(metrics["final_model"], "config.json").is_file()
    with pytest.raises(ValueError, match="unknown TrainerConfig fields"):
        UnifiedProductionTrainer({"model_name": "tiny", "learning_rat": 1e-3})


def test_lora_trainer_trains_adapters_and_pushes_them(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    config = TrainerConfig(model_name="tiny", output_dir=str(tmp_path / "lora"), batch_size=2, max_steps=2,
                           lora_rank=4, lora_alpha=8)
    trainer = DeepSynthLoRATrainer(config)
    assert trainer.config.use_lora  # switched on
    report = trainer.trainable_parameters()
    assert report["trainable"] == report["parts"]["lora"]["trainable"] > 0
    with pytest.raises(RuntimeError, match="call train"):
        trainer.push_adapters_to_hub("me/x", token="t")
    metrics, _ = trainer.train(InstructionDataset(DATA, RenderConfig.from_preset("tiny")))
    assert metrics["train_steps"] == 2
    uploaded = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: f"https://huggingface.co/{repo_id}")
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, folder_path, repo_id, **kw: uploaded.update(
        repo=repo_id, files={p.name for p in Path(folder_path).iterdir()}))
    url = trainer.push_adapters_to_hub("me/deepsynth-lora", token="hf_dummy")
    assert url.endswith("me/deepsynth-lora") and uploaded["repo"] == "me/deepsynth-lora"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "processor_config.json"} <= \
        uploaded["files"]
