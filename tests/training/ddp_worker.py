"""Worker for test_multiprocess.py, run under `accelerate launch --num_processes 2` (CPU, gloo).

Trains the tiny model for a few steps with the project's Trainer; every rank then writes
rank-<i>.json: world size, backend, steps, the example indices it was given, and a checksum of
its final weights. Different indices + equal checksums = gradients were all-reduced.
"""

import hashlib
import json
import sys
from pathlib import Path

import torch

from deepsynth.data.instruction_dataset import InstructionDataset
from deepsynth.data.synthetic import SyntheticConfig, generate
from deepsynth.render import RenderConfig
from deepsynth.training.config import TrainerConfig
from deepsynth.training.trainer import Trainer


class RecordingDataset(InstructionDataset):
    seen: list[int] = []

    def __getitem__(self, index: int) -> dict:
        self.seen.append(int(index))
        return super().__getitem__(index)


def main(out: str) -> None:
    # The last step is also a save_interval step: every rank must skip the end-of-run save together.
    config = TrainerConfig(model_name="tiny", output_dir=str(Path(out) / "run"), batch_size=2, max_steps=3,
                           learning_rate=1e-3, log_interval=1, save_interval=3, seed=11)
    trainer = Trainer(config)
    data = RecordingDataset(generate(SyntheticConfig(facts_per_doc=2), 16, "train"), RenderConfig.from_preset("tiny"))
    metrics, checkpoints = trainer.train(data)
    acc = trainer.accelerator
    model = acc.unwrap_model(trainer._prepared)
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(param.detach().to(torch.float32).contiguous().numpy().tobytes())
    record = {"rank": acc.process_index, "world_size": acc.num_processes, "backend": str(acc.state.backend),
              "steps": metrics["train_steps"], "seen": sorted(data.seen), "checksum": digest.hexdigest(),
              "checkpoints": checkpoints, "is_main": acc.is_main_process}
    (Path(out) / f"rank-{acc.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1])
