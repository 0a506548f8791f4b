"""Resume is exact across epochs, after SIGKILL: a run killed in epoch 2 (between checkpoints) and
resumed from its latest checkpoint computes the same next losses as a run never interrupted."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deepsynth.training.trainer import EpochSampler, Trainer

sys.path.insert(0, str(Path(__file__).parent))
from resume_worker import BATCH, DATA, SAVE_INTERVAL, STEPS, run_config  # noqa: E402

WORKER = Path(__file__).with_name("resume_worker.py")
KILL_AT = 6  # epoch 2 (2 steps an epoch), one step after checkpoint-000005


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def step_losses(recs: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in recs if "loss" in r and not r.get("final")}


def wait_for(marker: Path, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"worker exited with {proc.returncode} before step {KILL_AT}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"worker did not reach step {KILL_AT} in {timeout} s")
        time.sleep(0.2)


def test_sigkill_in_epoch_2_then_resume_gives_the_uninterrupted_losses(tmp_path):
    # The premise: the batches after the resume point differ between epoch 0 and epoch 2, so a
    # resumed run replaying epoch 0's order (what accelerate's loader did) computes other losses.
    orders = []
    for epoch in (0, 2):
        sampler = EpochSampler(len(DATA), run_config(tmp_path).seed)
        sampler.epoch = epoch
        orders.append(list(sampler))
    assert sorted(orders[0][BATCH:]) != sorted(orders[1][BATCH:])

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the worker's setting: same kernels, same losses
    try:
        Trainer(run_config(tmp_path / "straight")).train(DATA)
        run, marker, log = tmp_path / "run", tmp_path / "paused", tmp_path / "worker.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        with log.open("w") as out:
            proc = subprocess.Popen([sys.executable, str(WORKER), str(run), str(KILL_AT), str(marker)],
                                    stdout=out, stderr=subprocess.STDOUT, env=env)
            wait_for(marker, proc, log)
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        assert sorted(p.name for p in run.glob("checkpoint-*")) == [f"checkpoint-{SAVE_INTERVAL:06d}"]
        # A checkpoint writer killed half-way leaves a temporary folder; the next run removes it.
        (run / ".checkpoint-000006.tmp" / "state").mkdir(parents=True)
        metrics, _ = Trainer(run_config(run, resume="latest")).train(DATA)
    finally:
        torch.set_num_threads(threads)

    straight = step_losses(records(tmp_path / "straight"))
    recs = records(run)
    at = next(i for i, r in enumerate(recs) if "resumed_from" in r)
    assert Path(recs[at]["resumed_from"]).name == f"checkpoint-{SAVE_INTERVAL:06d}" and recs[at]["step"] == SAVE_INTERVAL
    before, after = step_losses(recs[:at]), step_losses(recs[at + 1:])
    assert sorted(before) == list(range(1, KILL_AT)) and sorted(after) == list(range(SAVE_INTERVAL + 1, STEPS + 1))
    assert [r["epoch"] for r in recs[at + 1:] if "epoch" in r] == [2, 3, 3]
    for step in range(1, STEPS + 1):
        got = before.get(step, after.get(step))
        assert got == pytest.approx(straight[step], abs=1e-6), (step, got, straight[step])
    assert metrics["train_steps"] == STEPS
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]
