"""Pre-training of the page reader: a tiny DeepSeek-OCR-2 (the "tiny-page" preset) that reads pages
of small type ("reader" render preset: 14 lines of 30 characters on 256 px) and answers about them.

The curriculum grows the page one rung at a time: one random character in 96 px type, 1 to 3 in
64 px, a few words on one line in 32 px, in 20 px, then in the preset's 13 px, one full line,
then up to 3, 6, 10 and 14 lines of dictionary words, real prose, names, numbers and punctuation
in mixed case (`deepsynth.data.reading`), transcribed with DeepSeek-OCR's prompt `Free OCR.`;
from the seventh rung on, a share of examples are questions about facts in sentences, about
`key: value` forms in any line order and about short invoices. Every training page is moved by
up to `jitter` pixels, so the reader does not learn where lines start, only what they say.

It runs on the one Trainer through the curriculum machinery of
`deepsynth.training.reader_pretrain` (stream, stage gate, checkpoints, `--resume latest`); a
stage ends when the rolling teacher-forced token accuracy passes `advance_at` or after
`stage_minutes`. Held-out evaluation (`evaluate_page_reader`) scores pages and questions that
use only held-out paragraphs, names and values (`deepsynth.data.reading.is_heldout`).

    python -m deepsynth.training.page_reader --out runs/page-reader/phase1 --minutes 120
"""

from __future__ import annotations

import difflib
import json
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from deepsynth.data.reading import TRANSCRIBE, ReadingTask, make_task
from deepsynth.data.synthetic import SyntheticConfig
from deepsynth.models.generate import GenerationSettings, generate_with_stats
from deepsynth.render import RenderConfig, render_text
from deepsynth.training.config import TrainerConfig
from deepsynth.training.reader_pretrain import (CurriculumStream, PhaseConfig, StageGate, StageSchedule, run_phase,
                                                shifted)

logger = logging.getLogger(__name__)

PRESET = "reader"  # render preset the reader reads
MODEL_PRESET = "tiny-page"  # model preset a fresh run starts from
LINE_CHARS = 30  # characters of the preset's widest line of monospace type
TRANSCRIBE_KINDS = ("words", "prose", "mixed")
QUESTION_KINDS = ("prose_qa", "form_qa", "invoice_qa")


@dataclass
class PageStage:
    """One rung of the page curriculum."""

    max_lines: int  # transcription pages hold 1 to max_lines lines
    line_chars: int  # characters per written line (the renderer wraps at the page width)
    question_share: float  # share of examples that are questions (rest: transcription)
    max_pages: int = 1  # pages per document (longer texts are cut to this many pages)
    font_size: int = 0  # type size in px (0 = the render preset's)
    kinds: tuple[str, ...] = TRANSCRIBE_KINDS  # transcription kinds drawn (deepsynth.data.reading)


# A fresh reader starts on one random character in 96 px type: on lines of words in smaller type
# its vision tower's output soon stops depending on the page and the decoder learns the text
# prior alone, where a lone big glyph is read from the first hundred steps
# (benchmarks/page_reader_diagnostic.py; README, "The page reader"). The type then shrinks.
PAGE_STAGES = (
    PageStage(max_lines=1, line_chars=1, question_share=0.0, font_size=96, kinds=("codes",)),
    PageStage(max_lines=1, line_chars=3, question_share=0.0, font_size=64, kinds=("codes",)),
    PageStage(max_lines=1, line_chars=12, question_share=0.0, font_size=32),
    PageStage(max_lines=1, line_chars=12, question_share=0.0, font_size=20),
    PageStage(max_lines=1, line_chars=12, question_share=0.0),
    PageStage(max_lines=1, line_chars=LINE_CHARS, question_share=0.0),
    PageStage(max_lines=3, line_chars=LINE_CHARS, question_share=0.15),
    PageStage(max_lines=6, line_chars=LINE_CHARS, question_share=0.25),
    PageStage(max_lines=10, line_chars=LINE_CHARS, question_share=0.3),
    PageStage(max_lines=14, line_chars=LINE_CHARS, question_share=0.3),
    PageStage(max_lines=14, line_chars=LINE_CHARS, question_share=0.3, max_pages=2),
)
FULL_PAGE = PAGE_STAGES[-2]  # the last one-page rung: what held-out pages look like


@dataclass
class PageReaderConfig(PhaseConfig):
    """One phase of page-reader pre-training (the fields are `PhaseConfig`'s, with this phase's
    defaults; start_stage -1 = where the init_from reader's last phase ended)."""

    out: str = "runs/page-reader/phase1"
    minutes: float = 120.0
    batch_size: int = 8
    planned_steps: int = 20_000
    advance_at: float = 0.9  # rolling training token accuracy
    stage_minutes: float = 40.0
    eval_every_minutes: float = 20.0
    eval_examples: int = 24
    jitter: int = 6
    threads: int = 0  # torch CPU threads (0 = torch's default)

    def __post_init__(self) -> None:
        check = self.checked("page_reader")
        check("start_stage", -1 <= self.start_stage < len(PAGE_STAGES) and (self.start_stage >= 0 or self.init_from),
              f"in [0, {len(PAGE_STAGES) - 1}], or -1 with --init-from (the stage the reader ended at)")
        check("jitter", 0 <= self.jitter <= RenderConfig.from_preset(PRESET).margin,
              f"in [0, {RenderConfig.from_preset(PRESET).margin}] (the preset's margin: more would cut text off)")
        check("threads", self.threads >= 0, ">= 0")


def render_task(task: ReadingTask, max_pages: int, render: RenderConfig) -> tuple[list, str]:
    """(page images, answer): a transcription's answer is the text drawn on the pages kept."""
    pages = render_text(task.text, render)[:max_pages]
    answer = task.answer if task.instruction != TRANSCRIBE else "\n".join(p.text for p in pages)
    return [p.image for p in pages], answer


def make_page_example(rng: random.Random, stage: PageStage, jitter: int = 0, split: str = "train",
                      render: RenderConfig | None = None) -> dict:
    """One training (or held-out) example of `stage`: pages, instruction, answer, kind."""
    render = render or RenderConfig.from_preset(PRESET)
    if stage.font_size:
        render = replace(render, font_size=stage.font_size)
    if rng.random() < stage.question_share:
        task = make_task(rng, rng.choice(QUESTION_KINDS), split, max_lines=stage.max_lines)
    else:
        task = make_task(rng, rng.choice(stage.kinds), split, max_lines=stage.max_lines,
                         line_chars=stage.line_chars)
    pages, answer = render_task(task, stage.max_pages if task.instruction == TRANSCRIBE else 3, render)
    if jitter:
        pages = [shifted(p, rng.randint(-jitter, jitter), rng.randint(-jitter, jitter)) for p in pages]
    return {"pages": pages, "instruction": task.instruction, "answer": answer, "kind": task.kind}


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of answer tokens that are the argmax under teacher forcing."""
    pred, gold = logits[:, :-1].argmax(-1), labels[:, 1:]
    mask = gold != -100
    return ((pred == gold) & mask).sum().item() / max(mask.sum().item(), 1)


def similarity(a: str, b: str) -> float:
    """Character similarity in [0, 1] (difflib's ratio, no junk heuristic)."""
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


class PageStream(CurriculumStream):
    """The curriculum stream drawing page-reader examples (resumable like its parent)."""

    def stage(self, step_index: int) -> PageStage:
        stage = PAGE_STAGES[self.schedule.at(step_index)]
        if self.cfg.question_share >= 0:
            stage = replace(stage, question_share=self.cfg.question_share)
        return stage

    def draw(self, stage: PageStage) -> dict:
        example = make_page_example(self.rng, stage, self.cfg.jitter, render=self.render_config)
        example.pop("kind")
        return example


class PageGate(StageGate):
    """The stage gate on token accuracy, with the page reader's held-out evaluation."""

    n_stages = len(PAGE_STAGES)

    def batch_accuracy(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        return token_accuracy(logits, labels)

    def evaluate(self, model) -> dict:
        return evaluate_page_reader(model, self.collator, n=self.cfg.eval_examples)


def heldout_sets(n: int, seed: int = 4321, shift: int = 6) -> dict[str, list[dict]]:
    """The held-out evaluation sets (n examples each), from held-out paragraphs, names and values:
    transcription of 1-14 line pages, the same pages moved by up to `shift` px, 2-3 page wrapped
    paragraphs, questions about prose, forms and invoices. Fixed by `seed`."""
    rng = random.Random(seed)
    render = RenderConfig.from_preset(PRESET)
    full = FULL_PAGE
    sets: dict[str, list[dict]] = {"read": [], "read_shifted": [], "read_multipage": [], "prose_qa": [],
                                   "form_qa": [], "invoice_qa": []}
    for _ in range(n):
        task = make_task(rng, rng.choice(TRANSCRIBE_KINDS), "heldout", max_lines=full.max_lines)
        pages, answer = render_task(task, 1, render)
        sets["read"].append({"pages": pages, "instruction": TRANSCRIBE, "answer": answer})
        moved = [shifted(p, rng.randint(-shift, shift), rng.randint(-shift, shift)) for p in pages]
        sets["read_shifted"].append({"pages": moved, "instruction": TRANSCRIBE, "answer": answer})
        long_task = make_task(rng, "prose", "heldout", max_lines=full.max_lines)
        long_task.text = " ".join(make_task(rng, "prose", "heldout", max_lines=14).text for _ in range(3))
        pages, answer = render_task(long_task, 3, render)
        sets["read_multipage"].append({"pages": pages, "instruction": TRANSCRIBE, "answer": answer})
        for kind in QUESTION_KINDS:
            task = make_task(rng, kind, "heldout", max_lines=8)
            pages, answer = render_task(task, 3, render)
            sets[kind].append({"pages": pages, "instruction": task.instruction, "answer": answer})
    return sets


@torch.no_grad()
def evaluate_page_reader(model, collator, n: int = 24, seed: int = 4321, ablate: bool = True) -> dict:
    """Held-out scores through `generate_with_stats` (the decoding path of ask/serve): for
    transcription sets the mean character similarity and the share of exact pages (also by
    line count), for question sets exact match, and with `ablate` exact match with the
    instruction left out (what a reader that ignores the question scores)."""
    sets = heldout_sets(n, seed)
    out: dict = {}
    for name, examples in sets.items():
        reading = name.startswith("read")
        pages = [e["pages"] for e in examples]
        golds = [e["answer"] for e in examples]
        # One token per character: room for the longest gold answer and a little more (an answer
        # longer than that is wrong already, and an untrained reader would decode to any limit).
        settings = GenerationSettings(max_new_tokens=max(len(g) for g in golds) + 16)
        instructions = [e["instruction"] for e in examples]
        preds = [r["answer"] for r in generate_with_stats(model, collator, pages, instructions, settings, batch_size=8)]
        if reading:
            sims = [similarity(p, g) for p, g in zip(preds, golds)]
            out[name] = {"char_similarity": round(sum(sims) / n, 4),
                         "exact": round(sum(p == g for p, g in zip(preds, golds)) / n, 4)}
            if name == "read":
                by_lines: dict[str, list[float]] = {}
                for s, g in zip(sims, golds):
                    lines = g.count("\n") + 1
                    by_lines.setdefault("1-2" if lines <= 2 else "3-6" if lines <= 6 else "7-14", []).append(s)
                out[name]["char_similarity_by_lines"] = {k: round(sum(v) / len(v), 4) for k, v in sorted(by_lines.items())}
            out[name]["example"] = {"gold": golds[0][:120], "pred": preds[0][:120]}
        else:
            em = sum(p.strip() == g for p, g in zip(preds, golds)) / n
            out[name] = {"em": round(em, 4), "example": {"q": instructions[0], "gold": golds[0], "pred": preds[0]}}
            if ablate:
                blank = [r["answer"] for r in generate_with_stats(model, collator, pages, [""] * n, settings,
                                                                   batch_size=8)]
                out[name]["em_no_instruction"] = round(sum(p.strip() == g for p, g in zip(blank, golds)) / n, 4)
    return out


def trainer_config(cfg: PageReaderConfig, run_dir: Path) -> TrainerConfig:
    """The page reader phase's Trainer settings: tiny-page, the reader preset's pages, `Free OCR.`"""
    return cfg.trainer_config(run_dir, model=MODEL_PRESET, render_preset=PRESET, instruction=TRANSCRIBE,
                              max_length=4096)


def ended_stage(reader: str) -> int:
    """The curriculum stage a saved page reader's last phase ended at."""
    info = Path(reader) / "reader_pretrain.json"
    if not info.is_file():
        raise ValueError(f"--start-stage -1 needs the stage {reader} ended at, but {info} is missing "
                         "(give --start-stage N)")
    return json.loads(info.read_text())["phases"][-1]["final_stage"]


def pretrain_page_reader(cfg: PageReaderConfig, clock: Callable[[], float] = time.monotonic) -> dict:
    """Run one phase on the Trainer; returns the phase's metadata (also in reader_pretrain.json)."""
    if cfg.start_stage == -1:
        cfg = replace(cfg, start_stage=ended_stage(cfg.init_from))
    syn = SyntheticConfig(seed=cfg.seed)  # unused by the page stream; the parent's signature wants one
    stream = PageStream(cfg, syn, [], StageSchedule(cfg.start_stage))
    stream.render_config = RenderConfig.from_preset(PRESET)
    return run_phase(cfg, stream, PageGate(cfg, syn, stream), trainer_config(cfg, cfg.run_folder()), clock,
                     preset=PRESET, recipe="make page-reader (deepsynth.training.page_reader)")


def main() -> None:
    config = PageReaderConfig.from_command_line(__doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if config.threads:
        torch.set_num_threads(config.threads)
    print(json.dumps(pretrain_page_reader(config), indent=2))


if __name__ == "__main__":
    main()
