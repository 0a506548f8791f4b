"""One-time pre-training of the form reader (`form-reader`, the default reader before the page
reader): a transcription curriculum, as OCR models are made.

A tiny model trained on answers alone learns to ignore the page (README, "The tiny models"). Dense supervision
fixes that: the model first learns to transcribe ("read" -> every line) big digits, then key/value
lines, one more line per stage, with a share of key questions so that it also learns to take a
prompt. A stage ends when the teacher-forced sequence accuracy of recent training batches passes
`advance_at`, or after `stage_minutes`. Only training values (synthetic.split_values) are used,
so held-out evaluation values are never seen here.

    python -m deepsynth.training.reader_pretrain --out runs/form-reader/phase1 --minutes 60

The curriculum is data and a callback of the one training loop, `deepsynth.training.trainer.Trainer`
(accelerate, checkpoints and resume, the NaN guard, telemetry): `CurriculumStream` draws endless
examples for the stage its `StageSchedule` gives each step, and `StageGate` measures the training
batches, moves the schedule on, evaluates every `eval_every_minutes` and asks for a checkpoint
then. The Trainer's run folder (`--run-dir`, default `<out>.run`: checkpoints, metrics.jsonl,
curves.png) lets a killed phase continue with `--resume latest`.

A later phase continues from a saved reader (`--init-from DIR --start-stage 5`), e.g. key
questions on the fixed-order form layout (`--layout form --question-share 0.9`); `make form-reader`
runs the phases that made the shipped checkpoint. The result is the Trainer's final model bundle
(config.json + model.safetensors + processor files + deepsynth.json) that
`deepsynth.models.load_model` reads like any checkpoint, plus every phase's metadata
(reader_pretrain.json, with the render fingerprint) and log (reader_pretrain.phase{N}.log.jsonl).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import random
import shutil
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import IterableDataset

from deepsynth.atomic import atomic_dir
from deepsynth.data.synthetic import LAYOUTS, TRANSCRIBE_INSTRUCTION, SyntheticConfig, make_document, split_values
from deepsynth.models.bundle import make_collator, read_spec, write_spec
from deepsynth.models.collate import Collator
from deepsynth.models.generate import GenerationSettings, generate_with_stats
from deepsynth.render import RenderConfig, render_text
from deepsynth.render.renderer import PRESETS
from deepsynth.training.config import TrainerConfig
from deepsynth.training.trainer import StepControl, Trainer, TrainerCallback

logger = logging.getLogger(__name__)


@dataclass
class Stage:
    """One rung of the curriculum."""

    lines: int  # key/value lines per page; 0 = a lone two-digit number
    font_size: int
    question_share: float  # share of examples that are key questions (rest: transcription)


_PAGE_FONT = PRESETS["tiny"]["font_size"]
STAGES = (
    Stage(lines=0, font_size=56, question_share=0.0),
    Stage(lines=0, font_size=_PAGE_FONT, question_share=0.0),
    Stage(lines=1, font_size=_PAGE_FONT, question_share=0.3),
    Stage(lines=2, font_size=_PAGE_FONT, question_share=0.3),
    Stage(lines=3, font_size=_PAGE_FONT, question_share=0.3),
    Stage(lines=4, font_size=_PAGE_FONT, question_share=0.5),
)


def option_check(command: str, cfg) -> Callable[[str, bool, str], None]:
    """`check(name, ok, limit)` for a phase config's `__post_init__`: raises one error naming the
    command's flag, its value and the limit when `ok` is false."""

    def check(name: str, ok: bool, limit: str) -> None:
        if not ok:
            raise ValueError(f"{command} --{name.replace('_', '-')}={getattr(cfg, name)!r} is invalid: "
                             f"must be {limit}")

    return check


@dataclass
class PhaseConfig:
    """What every pre-training phase takes, the reader's (`PretrainConfig`) and the page reader's
    (`deepsynth.training.page_reader.PageReaderConfig`), which set their own defaults. Every field is a
    command-line flag: --field-name."""

    out: str = ""  # the reader folder written at the end
    minutes: float = 60.0  # wall-clock budget; the run stops and saves when it is spent
    batch_size: int = 16  # examples per step
    lr: float = 1e-3  # peak learning rate (AdamW, weight decay 0.01, gradient norm clipped at 1)
    lr_min: float = 1e-4  # learning rate at the end of the cosine decay
    warmup_steps: int = 100  # linear warm-up steps
    planned_steps: int = 9_000  # length of the cosine schedule (the run may stop before)
    advance_at: float = 0.8  # rolling training accuracy that ends a stage
    stage_minutes: float = 15.0  # safety cap: a stage ends after this long even below advance_at
    eval_every_minutes: float = 5.0  # held-out evaluation (and a checkpoint) this often
    eval_examples: int = 100  # held-out examples (per kind) per evaluation
    seed: int = 0  # seed of the fresh model's weights and of the example stream
    init_from: str = ""  # continue from a saved reader instead of a fresh model
    start_stage: int = 0  # curriculum stage to start at (with init_from)
    question_share: float = -1.0  # overrides every stage's share of questions when >= 0
    jitter: int = 0  # move each training page by up to this many pixels in x and y (evaluation pages stay put)
    advance_window: int = 50  # training batches in the rolling accuracy that gates a stage
    max_steps: int = 0  # also stop after this many steps (0 = the time budget alone)
    log_every: int = 25  # steps between log records
    run_dir: str = ""  # the Trainer's run folder (checkpoints, metrics.jsonl, curves.png); "" = <out>.run
    resume: str = ""  # continue a killed phase from a checkpoint in run_dir ("latest" = the newest)

    def checked(self, command: str) -> Callable[[str, bool, str], None]:
        """Checks the fields every phase shares; returns `check` for the phase's own."""
        check = option_check(command, self)
        check("minutes", self.minutes > 0, "> 0")
        check("batch_size", self.batch_size >= 1, ">= 1")
        check("lr", 0 < self.lr < 1, "in (0, 1)")
        check("lr_min", 0 <= self.lr_min <= self.lr, f"in [0, lr={self.lr}] (the decay goes from lr down to lr_min)")
        check("warmup_steps", self.warmup_steps >= 0, ">= 0")
        check("planned_steps", self.planned_steps >= 1, ">= 1")
        check("stage_minutes", self.stage_minutes > 0, "> 0")
        check("eval_every_minutes", self.eval_every_minutes > 0, "> 0")
        check("eval_examples", self.eval_examples >= 1, ">= 1")
        check("question_share", self.question_share == -1.0 or 0 <= self.question_share <= 1, "-1 or in [0, 1]")
        check("advance_window", self.advance_window >= 1, ">= 1")
        check("max_steps", self.max_steps >= 0, ">= 0")
        check("log_every", self.log_every >= 1, ">= 1")
        return check

    def run_folder(self) -> Path:
        """The Trainer's run folder: run_dir, or <out>.run beside the reader folder."""
        out = Path(self.out)
        return Path(self.run_dir) if self.run_dir else out.with_name(out.name + ".run")

    def trainer_config(self, run_dir: Path, *, model: str, render_preset: str, instruction: str,
                       **options) -> TrainerConfig:
        """The phase's options as Trainer settings: the cosine schedule from lr to lr_min over
        planned_steps (warm-up included) whatever the budget ends up allowing, minutes as the
        budget; `model` when there is no init_from; `options` are the phase's own Trainer settings."""
        return TrainerConfig(
            model_name=self.init_from or model, output_dir=str(run_dir), batch_size=self.batch_size,
            max_steps=self.max_steps or None, max_minutes=self.minutes, learning_rate=self.lr,
            min_lr_ratio=self.lr_min / self.lr, warmup_steps=self.warmup_steps, schedule_steps=self.planned_steps,
            lr_scheduler="cosine", weight_decay=0.01, max_grad_norm=1.0, seed=self.seed, render_preset=render_preset,
            instruction_prompt=instruction, log_interval=self.log_every, save_interval=0, keep_checkpoints=2,
            resume_from_checkpoint=self.resume or None, num_workers=0, **options)

    @classmethod
    def from_command_line(cls, description: str):
        """The phase config given by the command line's flags (one per field); a bad value is a usage error."""
        parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
        for name, value in asdict(cls()).items():
            flag = f"--{name.replace('_', '-')}"
            if isinstance(value, bool):  # --flag / --no-flag (type=bool would take "False" as true)
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
            else:
                parser.add_argument(flag, type=type(value), default=value)
        args = parser.parse_args()
        try:
            return cls(**vars(args))
        except ValueError as err:
            parser.error(str(err))


@dataclass
class PretrainConfig(PhaseConfig):
    """One phase of reader pre-training (the tiny preset reading `key: value` pages)."""

    out: str = "src/deepsynth/models/checkpoints/form-reader"
    layout: str = "shuffled"  # synthetic page layout: "shuffled" or "form" (fixed key order)

    def __post_init__(self) -> None:
        check = self.checked("reader_pretrain")
        check("start_stage", 0 <= self.start_stage < len(STAGES), f"in [0, {len(STAGES) - 1}]")
        check("layout", self.layout in LAYOUTS, f"one of {LAYOUTS}")
        check("jitter", self.jitter >= 0, ">= 0")


def shifted(page: Image.Image, dx: int, dy: int) -> Image.Image:
    """The page moved by (dx, dy) pixels on a blank page of the same size."""
    out = Image.new(page.mode, page.size, "white")
    out.paste(page, (dx, dy))
    return out


def make_example(rng: random.Random, stage: Stage, syn: SyntheticConfig, values: list[str], jitter: int = 0) -> dict:
    preset = RenderConfig.from_preset("tiny", font_size=stage.font_size)
    if stage.lines == 0:
        text = rng.choice(values)
        pages = [render_text(text, preset)[0].image]
        instruction, answer = TRANSCRIBE_INSTRUCTION, text
    else:
        cfg = SyntheticConfig(facts_per_doc=stage.lines, keys=syn.keys, value_digits=syn.value_digits, seed=syn.seed,
                              layout=syn.layout)
        text, facts = make_document(rng, cfg, values)
        pages = [p.image for p in render_text(text, preset)]
        instruction, answer = TRANSCRIBE_INSTRUCTION, text
        if rng.random() < stage.question_share:
            key, answer = rng.choice(facts)
            instruction = cfg.question_templates[0].format(key=key)
    if jitter:
        pages = [shifted(p, rng.randint(-jitter, jitter), rng.randint(-jitter, jitter)) for p in pages]
    return {"pages": pages, "instruction": instruction, "answer": answer}


def sequence_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of examples whose every answer token is the argmax (teacher forcing)."""
    pred = logits[:, :-1].argmax(-1)
    gold = labels[:, 1:]
    mask = gold != -100
    ok = ((pred == gold) | ~mask).all(-1)
    return ok.float().mean().item()


class StageSchedule:
    """Which curriculum stage each training step (0-based) draws from: a list of (stage, first step).

    The loader draws one batch ahead, so when the gate decides after step k, step k + 1 is already
    drawn: a new stage starts at step k + 2 (`StageGate`). Every step's stage is therefore fixed
    before its examples are drawn, in a resumed run as in an uninterrupted one.
    """

    def __init__(self, start_stage: int) -> None:
        self.starts: list[tuple[int, int]] = [(start_stage, 0)]

    def at(self, step_index: int) -> int:
        return next(stage for stage, first in reversed(self.starts) if first <= step_index)

    def advance(self, stage: int, first_step: int) -> None:
        self.starts.append((stage, first_step))


class CurriculumStream(IterableDataset):
    """Endless training examples: one `random.Random(seed)` stream, each example drawn for the stage
    the schedule gives its step (old runs drew the same way, so a fixed seed gives the same first
    batches as the loop this replaces). Resumable: `state_at(n)` is the RNG state before example n
    (kept for the last few steps, since the loader draws ahead), `load_state_dict` restores it."""

    def __init__(self, cfg: PretrainConfig, syn: SyntheticConfig, values: list[str], schedule: StageSchedule) -> None:
        self.cfg, self.syn, self.values, self.schedule = cfg, syn, values, schedule
        self.render_config = RenderConfig.from_preset("tiny")  # what the reader reads (stage 0 draws bigger digits)
        self.examples_per_step = cfg.batch_size  # set by StageGate from the trainer (processes, accumulation)
        self.rng = random.Random(cfg.seed)
        self.produced = 0
        self._snapshots: dict[int, tuple] = {}

    def stage(self, step_index: int) -> Stage:
        stage = STAGES[self.schedule.at(step_index)]
        if self.cfg.question_share >= 0:
            stage = Stage(stage.lines, stage.font_size, self.cfg.question_share)
        return stage

    def __iter__(self):
        while True:
            n = self.produced
            if n % self.examples_per_step == 0:
                self._snapshots[n] = self.rng.getstate()
                for old in [k for k in self._snapshots if k < n - 4 * self.examples_per_step]:
                    del self._snapshots[old]
            example = self.draw(self.stage(n // self.examples_per_step))
            self.produced = n + 1
            yield example

    def draw(self, stage: Stage) -> dict:
        """One example of `stage` from the stream's RNG (the page reader draws its own tasks)."""
        return make_example(self.rng, stage, self.syn, self.values, self.cfg.jitter)

    def state_at(self, examples: int) -> dict:
        if examples == self.produced:
            state = self.rng.getstate()
        elif examples in self._snapshots:
            state = self._snapshots[examples]
        else:
            raise RuntimeError(f"no stream state at example {examples} (produced {self.produced}, "
                               f"kept {sorted(self._snapshots)})")
        return {"examples": examples, "rng": [state[0], list(state[1]), state[2]]}

    def load_state_dict(self, state: dict) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.produced = state["examples"]
        self._snapshots = {}


class StageGate(TrainerCallback):
    """The curriculum's stage gate and held-out evaluation, as a Trainer callback.

    After every step it adds the batch's teacher-forced sequence accuracy to a rolling window
    (batches of the stage being measured only); when the window's mean passes `advance_at`, or
    the stage has run `stage_minutes` by the trainer's clock, the next stage starts (at the step
    after the one already drawn). Every `eval_every_minutes` it scores held-out pages
    (`evaluate_reader`), logs the scores and asks for a checkpoint; at the end it scores again.
    """

    def __init__(self, cfg: PretrainConfig, syn: SyntheticConfig, stream: CurriculumStream) -> None:
        self.cfg, self.syn, self.stream, self.schedule = cfg, syn, stream, stream.schedule
        self.stage = cfg.start_stage  # the stage being measured
        self.recent: deque[float] = deque(maxlen=cfg.advance_window)
        self.stage_started = 0.0  # training seconds when self.stage began
        self.last_eval = 0.0
        self.history: list[dict] = []
        self.final_scores: dict | None = None
        self._step_accuracy: list[float] = []

    def on_train_begin(self, trainer: Trainer) -> None:
        self.stream.examples_per_step = trainer.examples_per_step
        # the layout the run trains on (its base's bundle), not the processor's default
        self.collator = make_collator(trainer.model, trainer.processor, trainer.base_spec)

    n_stages = len(STAGES)

    def batch_accuracy(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        """What gates a stage: the share of examples decoded whole under teacher forcing."""
        return sequence_accuracy(logits, labels)

    def evaluate(self, model) -> dict:
        """Held-out scores logged every eval_every_minutes and at the end."""
        return evaluate_reader(model, self.collator, self.syn, n=self.cfg.eval_examples)

    def on_batch_end(self, trainer: Trainer, batch: dict, outputs) -> None:
        self._step_accuracy.append(self.batch_accuracy(outputs.logits.detach(), batch["labels"]))

    def on_step_end(self, trainer: Trainer, step: int, record: dict, control: StepControl) -> None:
        accuracy = sum(self._step_accuracy) / len(self._step_accuracy)
        self._step_accuracy = []
        acc = trainer.accelerator
        if acc.num_processes > 1:
            accuracy = acc.reduce(torch.tensor(accuracy, device=acc.device), "mean").item()
        drawn_at = self.schedule.at(step - 1)
        # Only the stage's own batches count; it ends (by accuracy or time) once one was trained.
        measuring = drawn_at == self.stage
        if measuring:
            self.recent.append(accuracy)
        rolling = sum(self.recent) / len(self.recent) if self.recent else 0.0
        record.update(stage=drawn_at, train_seq_acc=round(rolling, 3))
        now = trainer.elapsed()
        passed = len(self.recent) == self.recent.maxlen and rolling >= self.cfg.advance_at
        timed_out = now - self.stage_started > self.cfg.stage_minutes * 60
        if self.stage < self.n_stages - 1 and measuring and (passed or timed_out):
            self.history.append({"stage": self.stage, "ended_step": step, "minutes": round(now / 60, 2),
                                 "train_seq_acc": round(rolling, 3)})
            self.stage += 1
            self.schedule.advance(self.stage, first_step=step + 1)
            self.stage_started = now
            self.recent.clear()
        if now - self.last_eval > self.cfg.eval_every_minutes * 60:
            self.last_eval = now
            if acc.is_main_process:
                scores = self.evaluate(trainer.trained_model)
                trainer.log({"step": step, "minutes": round(now / 60, 2), "eval": scores})
            control.save = True

    def on_train_end(self, trainer: Trainer, metrics: dict) -> None:
        if trainer.accelerator.is_main_process:
            self.final_scores = self.evaluate(trainer.trained_model)
            trainer.evaluation["reader_heldout"] = self.final_scores

    def state_dict(self) -> dict:
        return {"stage": self.stage, "recent": list(self.recent), "stage_started": self.stage_started,
                "last_eval": self.last_eval, "history": self.history, "schedule": self.schedule.starts}

    def load_state_dict(self, state: dict) -> None:
        self.stage, self.stage_started, self.last_eval = state["stage"], state["stage_started"], state["last_eval"]
        self.recent = deque(state["recent"], maxlen=self.cfg.advance_window)
        self.history = state["history"]
        self.schedule.starts = [tuple(s) for s in state["schedule"]]


@torch.no_grad()
def evaluate_reader(model, collator: Collator, syn: SyntheticConfig, n: int = 100, seed: int = 1234) -> dict:
    """Held-out 4-line pages: transcription character accuracy, page exact match and question EM,
    decoded through `deepsynth.models.generate.generate_with_stats` like every other evaluation."""
    train_values, heldout = split_values(syn)
    rng = random.Random(seed)
    preset = RenderConfig.from_preset("tiny")
    docs = [make_document(rng, syn, heldout) for _ in range(n)]
    # The same questions about new pages whose values do occur in training: separates finding the
    # line (both) from reading a digit pair never seen before (held-out only).
    seen = [make_document(rng, syn, train_values) for _ in range(n)]
    asked = [rng.choice(facts) for _, facts in docs]
    asked_seen = [rng.choice(facts) for _, facts in seen]

    def render(documents):
        return [[render_text(text, preset)[0].image] for text, _ in documents]

    def questions(facts):
        return [syn.question_templates[0].format(key=k) for k, _ in facts], [v for _, v in facts]

    pages = render(docs)
    out = {}
    for kind, page_lists, (instructions, golds) in (
        ("read", pages, ([TRANSCRIBE_INSTRUCTION] * n, [t for t, _ in docs])),
        ("question", pages, questions(asked)),
        ("question_seen_values", render(seen), questions(asked_seen)),
    ):
        settings = GenerationSettings(max_new_tokens=48 if kind == "read" else 6)
        rows = generate_with_stats(model, collator, page_lists, instructions, settings, batch_size=25)
        preds = [row["answer"] for row in rows]
        exact = sum(p.strip() == g for p, g in zip(preds, golds)) / n
        chars = sum(sum(a == b for a, b in zip(p, g)) / max(len(g), 1) for p, g in zip(preds, golds)) / n
        out[f"{kind}_em"], out[f"{kind}_char_acc"] = exact, chars
    return out


def render_fingerprint(preset: str = "tiny") -> str:
    """Hash of a reference page in the reader's preset; the reader is only valid for pages drawn this way."""
    page = render_text("alpha: 07\nbravo: 42", RenderConfig.from_preset(preset))[0].image
    return hashlib.sha256(page.tobytes()).hexdigest()[:16]


def earlier_phases(init_from: str) -> tuple[list[dict], list[Path]]:
    """The phases (metadata, logs) of the reader a run continues from, so the full history ships."""
    info = Path(init_from) / "reader_pretrain.json" if init_from else None
    if info is None or not info.exists():
        return [], []
    phases = json.loads(info.read_text())["phases"]
    logs = [Path(init_from) / f"reader_pretrain.phase{i + 1}.log.jsonl" for i in range(len(phases))]
    return phases, logs


def save_reader(final_model: Path, out: Path, meta: dict, log_path: Path, init_from: str = "",
                preset: str = "tiny", recipe: str = "make form-reader (deepsynth.training.reader_pretrain)") -> None:
    """The reader folder, whole or not at all (`atomic_dir`): the Trainer's final model bundle, and
    every phase's metadata (reader_pretrain.json) and log (reader_pretrain.phase{N}.log.jsonl)."""
    phases, logs = earlier_phases(init_from)
    with atomic_dir(out) as tmp:
        shutil.copytree(final_model, tmp, dirs_exist_ok=True)
        info = {"phases": [*phases, meta], "render_fingerprint": render_fingerprint(preset)}
        (tmp / "reader_pretrain.json").write_text(json.dumps(info, indent=2))
        for n, src in enumerate([*logs, log_path], start=1):
            shutil.copyfile(src, tmp / f"reader_pretrain.phase{n}.log.jsonl")
        spec = read_spec(tmp)
        if spec is not None:
            # The reader's recipe is all its phases, not only the last one's trainer settings.
            spec.training = {"recipe": recipe,
                             "phases": [p["config"] for p in info["phases"]], "trainer": spec.training}
            write_spec(tmp, spec)


def trainer_config(cfg: PretrainConfig, run_dir: Path) -> TrainerConfig:
    """The reader phase's Trainer settings: the tiny preset, its pages and the transcription prompt."""
    # the shipped reader's layout (its deepsynth.json), so that `make form-reader` re-creates it
    return cfg.trainer_config(run_dir, model="tiny", render_preset="tiny", instruction=TRANSCRIBE_INSTRUCTION,
                              prompt_layout="raw")


def pretrain(cfg: PretrainConfig, clock: Callable[[], float] = time.monotonic) -> dict:
    """Run one phase on the Trainer; returns the phase's metadata (also in reader_pretrain.json)."""
    syn = SyntheticConfig(seed=cfg.seed, layout=cfg.layout)
    train_values, _ = split_values(syn)
    stream = CurriculumStream(cfg, syn, train_values, StageSchedule(cfg.start_stage))
    return run_phase(cfg, stream, StageGate(cfg, syn, stream), trainer_config(cfg, cfg.run_folder()), clock)


def run_phase(cfg: PhaseConfig, stream: CurriculumStream, gate: StageGate, settings: TrainerConfig,
              clock: Callable[[], float], **save) -> dict:
    """Trains one phase on the Trainer (its example stream, its stage gate), appends the phase's
    metadata to the run's metrics.jsonl and saves the reader (`save`: `save_reader`'s options);
    returns the metadata."""
    metrics, _ = Trainer(settings, clock=clock, callbacks=[gate]).train(stream)
    meta = {"config": asdict(cfg), "step": metrics["train_steps"], "minutes": round(metrics["train_seconds"] / 60, 2),
            "stages": gate.history, "final_stage": gate.stage, "eval": gate.final_scores,
            "tokens_per_s": metrics["tokens_per_s"], "peak_memory_mb": metrics["peak_memory_mb"]}
    log_path = Path(settings.output_dir) / "metrics.jsonl"
    with log_path.open("a") as log:
        log.write(json.dumps({"final": meta}) + "\n")
    save_reader(Path(metrics["final_model"]), Path(cfg.out), meta, log_path, cfg.init_from, **save)
    return meta


def main() -> None:
    config = PretrainConfig.from_command_line(__doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(json.dumps(pretrain(config), indent=2))


if __name__ == "__main__":
    main()
