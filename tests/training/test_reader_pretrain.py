import json
import math
import random
from pathlib import Path

import pytest

import deepsynth.models
import deepsynth.training.reader_pretrain as reader_pretrain
from deepsynth.data.synthetic import SyntheticConfig, split_values
from deepsynth.models import load_model
from deepsynth.training.reader_pretrain import STAGES, PretrainConfig, make_example, pretrain, render_fingerprint

# First losses of the reader's own optimizer loop (the code before the curriculum moved onto the
# Trainer), recorded on one thread with a fake time source ending the run after N steps:
# A = stage 0 from a fresh tiny model, B = the form-layout question stage.
OLD_LOOP_LOSSES_A = [4.734149, 4.423572, 4.090822, 3.487794, 3.060028, 3.333577]
OLD_LOOP_LOSSES_B = [4.669667, 4.414596, 4.522770]
PHASE_A = dict(batch_size=2, warmup_steps=2, planned_steps=6, lr=1e-3, lr_min=1e-4, seed=3)
PHASE_B = dict(batch_size=2, warmup_steps=1, planned_steps=4, lr=4e-4, lr_min=1e-5, start_stage=5, layout="form",
               question_share=0.5, seed=0)
QUIET = dict(eval_examples=1, eval_every_minutes=1e6, stage_minutes=1e6, log_every=1)


def old_lr_at(step: int, lr: float, lr_min: float, warmup_steps: int, planned_steps: int, **_) -> float:
    """The old loop's learning rate for its step `step` (0-based)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, planned_steps - warmup_steps))
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * progress))


def step_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "lr" in r]


def test_trainer_path_gives_the_old_loops_first_losses_and_a_loadable_reader_with_its_history(tmp_path, monkeypatch):
    calls = []
    real = reader_pretrain.generate_with_stats
    monkeypatch.setattr(reader_pretrain, "generate_with_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    out = tmp_path / "reader"
    meta = pretrain(PretrainConfig(out=str(out), max_steps=6, **PHASE_A, **QUIET))
    recs = step_records(tmp_path / "reader.run")
    assert [r["loss"] for r in recs] == pytest.approx(OLD_LOOP_LOSSES_A, abs=1e-3)
    # The time-budgeted LR options map onto the Trainer's scheduler: the old loop's rate, step by step
    # (a record holds the rate of the next step, as the old log did).
    assert [r["lr"] for r in recs] == pytest.approx([old_lr_at(s, **PHASE_A) for s in range(1, 7)], rel=1e-9)
    assert [r["stage"] for r in recs] == [0] * 6
    assert all(r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0 for r in recs)
    assert len(calls) == 3  # the final evaluation decodes through generate_with_stats (3 kinds)

    assert meta["step"] == 6 and meta["final_stage"] == 0 and meta["tokens_per_s"] > 0
    assert set(meta["eval"]) == {f"{kind}_{m}" for kind in ("read", "question", "question_seen_values")
                                 for m in ("em", "char_acc")}
    saved = json.loads((out / "reader_pretrain.json").read_text())
    assert saved["render_fingerprint"] == render_fingerprint() and saved["phases"][-1]["step"] == 6
    history = [json.loads(line) for line in (out / "reader_pretrain.phase1.log.jsonl").read_text().splitlines()]
    assert history[-1]["final"]["step"] == 6 and [r["loss"] for r in history if "lr" in r] == [r["loss"] for r in recs]
    model, processor = load_model(str(out))
    assert model.config.vision_readout == "patches"
    bundle = json.loads((out / "deepsynth.json").read_text())
    assert bundle["default_instruction"] == "read" and bundle["evaluation"]["reader_heldout"] == meta["eval"]
    assert [p["seed"] for p in bundle["training"]["phases"]] == [3]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]

    # A second phase continues from the first; both phases' metadata and logs ship together.
    again = tmp_path / "reader2"
    meta2 = pretrain(PretrainConfig(out=str(again), max_steps=2, batch_size=2, init_from=str(out),
                                    start_stage=len(STAGES) - 1, layout="form", question_share=1.0, **QUIET))
    saved = json.loads((again / "reader_pretrain.json").read_text())
    assert [p["step"] for p in saved["phases"]] == [6, meta2["step"]] == [6, 2]
    assert saved["phases"][1]["config"]["layout"] == "form"
    assert (again / "reader_pretrain.phase1.log.jsonl").read_text() == (out / "reader_pretrain.phase1.log.jsonl").read_text()
    assert (again / "reader_pretrain.phase2.log.jsonl").exists()


def test_trainer_path_gives_the_old_loops_first_losses_on_the_form_question_stage(tmp_path):
    pretrain(PretrainConfig(out=str(tmp_path / "reader"), max_steps=3, **PHASE_B, **QUIET))
    recs = step_records(tmp_path / "reader.run")
    assert [r["loss"] for r in recs] == pytest.approx(OLD_LOOP_LOSSES_B, abs=1e-3)
    assert [r["lr"] for r in recs] == pytest.approx([old_lr_at(s, **PHASE_B) for s in range(1, 4)], rel=1e-9)


GATE = dict(batch_size=1, warmup_steps=0, planned_steps=10, eval_examples=1, eval_every_minutes=1e6, log_every=1, seed=1)


def test_stage_gate_advances_on_accuracy_and_a_resumed_run_continues_exactly(tmp_path):
    # advance_at 0 over a window of one batch: every measured batch passes. A decision after step k
    # takes effect at step k + 2 (step k + 1 is already drawn), and that batch is not measured.
    gate = dict(GATE, advance_at=0.0, advance_window=1, stage_minutes=1e6)
    meta = pretrain(PretrainConfig(out=str(tmp_path / "straight"), max_steps=5, **gate))
    straight = step_records(tmp_path / "straight.run")
    assert [r["stage"] for r in straight] == [0, 0, 1, 1, 2]
    assert [h["ended_step"] for h in meta["stages"]] == [1, 3, 5] and meta["final_stage"] == 3

    # Stop after step 3 (the gate has just moved on; step 4 is drawn) and resume to step 5.
    run = dict(out=str(tmp_path / "part"), run_dir=str(tmp_path / "part.run"), **gate)
    pretrain(PretrainConfig(max_steps=3, **run))
    resumed_meta = pretrain(PretrainConfig(max_steps=5, resume="latest", **run))
    lines = [json.loads(x) for x in (tmp_path / "part.run" / "metrics.jsonl").read_text().splitlines()]
    at = next(i for i, r in enumerate(lines) if "resumed_from" in r)
    resumed = [r for r in lines[at:] if "lr" in r]
    assert [r["step"] for r in resumed] == [4, 5]
    assert [(r["stage"], r["loss"]) for r in resumed] == [(r["stage"], r["loss"]) for r in straight[3:]]
    assert [(h["stage"], h["ended_step"]) for h in resumed_meta["stages"]] == \
        [(h["stage"], h["ended_step"]) for h in meta["stages"]]


class TickingClock:
    """A fake clock that advances one second each time it is read."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_stage_gate_advances_after_stage_minutes_by_the_trainers_clock(tmp_path):
    # Accuracy never passes advance_at 2.0; stage_minutes of 1/60 (one second) does, on a clock
    # that moves one second per reading, whatever the machine's speed.
    gate = dict(GATE, advance_at=2.0, advance_window=1, stage_minutes=1 / 60)
    meta = pretrain(PretrainConfig(out=str(tmp_path / "reader"), max_steps=4, **gate), clock=TickingClock())
    assert [r["stage"] for r in step_records(tmp_path / "reader.run")] == [0, 0, 1, 1]
    assert [h["ended_step"] for h in meta["stages"]] == [1, 3]


def test_bad_options_are_refused_naming_the_flag():
    with pytest.raises(ValueError, match=r"--lr-min=0.01 is invalid: must be in \[0, lr=0.001\]"):
        PretrainConfig(lr=1e-3, lr_min=1e-2)
    with pytest.raises(ValueError, match=r"--start-stage=9 is invalid"):
        PretrainConfig(start_stage=9)


def test_shipped_reader_matches_the_renderer():
    # The reader only reads pages drawn exactly as when it was trained.
    shipped = Path(deepsynth.models.__file__).parent / "checkpoints" / "form-reader" / "reader_pretrain.json"
    assert json.loads(shipped.read_text())["render_fingerprint"] == render_fingerprint()


def test_jitter_moves_training_pages():
    syn = SyntheticConfig(layout="form")
    values, _ = split_values(syn)
    stage = STAGES[-1]
    plain = make_example(random.Random(1), stage, syn, values)
    moved = make_example(random.Random(1), stage, syn, values, jitter=8)
    assert (plain["instruction"], plain["answer"]) == (moved["instruction"], moved["answer"])
    assert plain["pages"][0].size == moved["pages"][0].size
    assert plain["pages"][0].tobytes() != moved["pages"][0].tobytes()
