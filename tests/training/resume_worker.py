"""Worker for test_resume_fault.py: the tiny model trained for 8 steps over 4 examples (2 steps an
epoch, so steps 5-6 are epoch 2) with a checkpoint every 5 steps, on one thread so that runs in
different processes compute the same losses. Given a pause step, it writes a marker file when that
step ends and waits there to be killed.

    python resume_worker.py OUT_DIR PAUSE_STEP MARKER
"""

import sys
import time
from pathlib import Path

import torch

from deepsynth.data.synthetic import SyntheticConfig, generate
from deepsynth.training.config import TrainerConfig
from deepsynth.training.trainer import Trainer, TrainerCallback

DATA = generate(SyntheticConfig(facts_per_doc=2), 4, "train")
BATCH = 2
STEPS = 8
SAVE_INTERVAL = 5


def run_config(output_dir, resume: str | None = None) -> TrainerConfig:
    return TrainerConfig(model_name="tiny", output_dir=str(output_dir), batch_size=BATCH, max_steps=STEPS,
                         learning_rate=1e-3, log_interval=1, save_interval=SAVE_INTERVAL, keep_checkpoints=2, seed=7,
                         resume_from_checkpoint=resume)


class PauseAt(TrainerCallback):
    def __init__(self, step: int, marker: str) -> None:
        self.step, self.marker = step, Path(marker)

    def on_step_end(self, trainer, step, record, control) -> None:
        if step == self.step:
            self.marker.write_text(str(step))
            while True:  # the test kills this process with SIGKILL
                time.sleep(1)


def main(out: str, pause_step: str, marker: str) -> None:
    torch.set_num_threads(1)
    Trainer(run_config(out), callbacks=[PauseAt(int(pause_step), marker)]).train(DATA)


if __name__ == "__main__":
    main(*sys.argv[1:4])
