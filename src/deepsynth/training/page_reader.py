"""Pre-training of the page reader: a tiny DeepSeek-OCR-2 (the "tiny-page" preset) that reads 256 px
pages of text and answers about them. `--preset` chooses the page: "reader-large" (26 px type, 7
lines of 15 characters: one row of image tokens per line, two characters per token; the recipe's)
or "reader" (13 px type, 14 lines of 30: eight characters per token, read far less well).

Two losses train it, and a third may. The answer's (teacher-forced next-token loss); the
character-slot loss (`CharSlots`): a linear probe on the image tokens the decoder reads must tell
which character lies in each part of each token, so the vision tower learns to see characters from
the first steps instead of leaving the decoder to guess from the text prior; and, when `gaze_loss`
is above 0, the gaze loss: where the answer is drawn on the page, the last decoder layer's last
heads must attend, at each answer character, to the image token holding it, so the decoder copies
from the page rather than from its memory of the training prose.

The curriculum grows the page a few lines at a time, all in the preset's type: 1 to 3 full lines,
then up to 6, 10 and 14 (capped at what the page holds), then documents of two pages; dictionary words, real prose, names,
numbers and punctuation in mixed case (`deepsynth.data.reading`), transcribed with DeepSeek-OCR's
prompt `Free OCR.`; from the second rung on, a share of examples are questions about facts in
sentences, about `key: value` forms in any line order and about short invoices. The first rungs'
pages sit where the renderer draws them; later ones move by up to 2, 4, then 6 px (`--jitter`
caps it), so the reader does not learn where lines start, only what they say.

It runs on the one Trainer through the curriculum machinery of
`deepsynth.training.reader_pretrain` (stream, stage gate, checkpoints, `--resume latest`); a
stage ends when the rolling teacher-forced token accuracy passes `advance_at` or after
`stage_minutes`. Held-out evaluation (`evaluate_page_reader`) scores pages and questions that
use only held-out paragraphs, names and values (`deepsynth.data.reading.is_heldout`).

    python -m deepsynth.training.page_reader --out runs/page-reader/phase1 --minutes 120
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.models.deepseek_ocr2.modeling_deepseek_ocr2 import apply_rotary_pos_emb

from deepsynth.atomic import atomic_dir
from deepsynth.data.reading import TRANSCRIBE, ReadingTask, make_task
from deepsynth.data.synthetic import SyntheticConfig
from deepsynth.models import load_model
from deepsynth.models.collate import IGNORE_INDEX
from deepsynth.models.deepseek_ocr2 import grow_decoder
from deepsynth.models.generate import GenerationSettings, generate_with_stats
from deepsynth.render import RenderConfig, render_text
from deepsynth.render.renderer import layout, load_font
from deepsynth.training.config import TrainerConfig
from deepsynth.training.reader_pretrain import (CurriculumStream, PhaseConfig, StageGate, StageSchedule, run_phase,
                                                shifted)

logger = logging.getLogger(__name__)

PRESET = "reader"  # render preset the reader reads
READER_PRESETS = ("reader", "reader-large")  # render presets a page reader may be trained on (--preset)
MODEL_PRESET = "tiny-page"  # model preset a fresh run starts from
LINE_CHARS = 30  # characters of the preset's widest line of monospace type
PROBE_FILE = "char_slot_probe.safetensors"  # the character-slot probe, saved beside a phase's reader
ANSWER_AFTER = "\nAnswer: "  # a read-first reader's answer follows its reading of the pages after this
READ_FIRST_TOKENS = 1024  # decoding budget a read-first reader saves (the reading of its pages, then the answer)
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
    jitter: int = 6  # pages move by up to this many px (capped by the phase's --jitter)
    documents: float = 0.0  # share of transcriptions that are multi-page prose (`document_task`), cut to max_pages
    locate: float = 0.0  # share of questions that ask for the words after a quoted phrase ("locate_qa")
    read_first: bool = False  # a question's answer is the pages' text, ANSWER_AFTER, then the answer


# The reader learns to see characters from the character-slot loss (`CharSlots`) on pages that sit
# where the renderer draws them (each 8 px character column is one SAM patch), then on pages moved
# further and further: on pages moved by up to 6 px from the start its vision tower learned the
# characters several times slower (README, "The page reader"). The page grows a few lines at a time.
PAGE_STAGES = (
    PageStage(max_lines=3, line_chars=LINE_CHARS, question_share=0.0, jitter=0),
    PageStage(max_lines=6, line_chars=LINE_CHARS, question_share=0.1, jitter=0),
    PageStage(max_lines=10, line_chars=LINE_CHARS, question_share=0.2, jitter=2),
    PageStage(max_lines=14, line_chars=LINE_CHARS, question_share=0.25, jitter=4),
    PageStage(max_lines=14, line_chars=LINE_CHARS, question_share=0.3, jitter=6),
    PageStage(max_lines=14, line_chars=LINE_CHARS, question_share=0.3, max_pages=2, jitter=6),
)
FULL_PAGE = PAGE_STAGES[-2]  # the last one-page rung: what held-out pages look like
QUESTION_LINES = 8  # held-out questions' documents: 1 to this many facts or form lines


@functools.cache
def page_capacity(preset: str) -> tuple[int, int]:
    """(lines, characters per line) that one page of the render preset holds, as the renderer lays
    them out (monospace type: every line holds as many)."""
    render = RenderConfig.from_preset(preset)
    placed = layout("\n".join(["M" * 400] * 400), render)[0]
    return len(placed), len(placed[0][0].text)


def fitted(stage: PageStage, preset: str) -> PageStage:
    """`stage` on a page of `preset`: its line count and line length capped at what the page holds
    (the rungs are written for the "reader" page, the largest)."""
    lines, chars = page_capacity(preset)
    return replace(stage, max_lines=min(stage.max_lines, lines), line_chars=min(stage.line_chars, chars))


@dataclass
class PageReaderConfig(PhaseConfig):
    """One phase of page-reader pre-training (the fields are `PhaseConfig`'s, with this phase's
    defaults, and the character-slot loss's; start_stage -1 = where the init_from reader's last
    phase ended)."""

    out: str = "runs/page-reader/phase1"
    preset: str = ""  # render preset of the pages (READER_PRESETS); "" = the --init-from reader's, else "reader"
    minutes: float = 120.0
    batch_size: int = 8
    planned_steps: int = 20_000
    advance_at: float = 0.9  # rolling training token accuracy
    stage_minutes: float = 40.0
    eval_every_minutes: float = 20.0
    eval_examples: int = 24
    jitter: int = 6  # cap on every stage's page movement
    threads: int = 0  # torch CPU threads (0 = torch's default)
    slot_loss: float = 1.0  # weight of the character-slot loss on the image tokens (0 = off)
    blank_weight: float = 0.1  # weight of the blank slots in it relative to the characters
    gaze_loss: float = 0.0  # weight of the gaze loss on the decoder's last attention layer (0 = off)
    gaze_heads: int = 2  # heads of that layer the gaze loss trains (its last ones)
    documents: float = -1.0  # overrides every rung's share of prose documents (`document_task`) when >= 0
    locate: float = -1.0  # overrides every rung's share of questions that quote a phrase ("locate_qa") when >= 0
    read_first: bool = False  # questions are answered by writing out the pages first (`render_task`); the
    # saved reader's decoding settings say so (GenerationSettings.answer_after), so every engine returns
    # the answer alone
    kinds: str = ""  # overrides every rung's transcription kinds: comma-separated (deepsynth.data.reading), "" = the rung's
    max_pages: int = 0  # overrides every rung's pages per document when > 0 (a longer text is cut to this many pages)
    decoder_layers: int = 0  # with init_from: first grow its decoder to this many layers (`grow_decoder`; 0 = as is)
    decoder_width: int = 0  # ... to this hidden size, with heads of the same size added (0 = as is)
    decoder_mlp: int = 0  # ... to MLPs this wide (0 = as is)

    def __post_init__(self) -> None:
        check = self.checked("page_reader")
        check("start_stage", -1 <= self.start_stage < len(PAGE_STAGES) and (self.start_stage >= 0 or self.init_from),
              f"in [0, {len(PAGE_STAGES) - 1}], or -1 with --init-from (the stage the reader ended at)")
        check("preset", self.preset in ("", *READER_PRESETS), f"one of {READER_PRESETS}, or empty")
        margin = RenderConfig.from_preset(self.preset or PRESET).margin
        check("jitter", 0 <= self.jitter <= margin, f"in [0, {margin}] (the preset's margin: more would cut text off)")
        check("threads", self.threads >= 0, ">= 0")
        check("slot_loss", self.slot_loss >= 0, ">= 0")
        check("blank_weight", 0 < self.blank_weight <= 1, "in (0, 1]")
        check("gaze_loss", self.gaze_loss >= 0, ">= 0")
        check("gaze_heads", self.gaze_heads >= 1, ">= 1")
        check("documents", self.documents == -1.0 or 0 <= self.documents <= 1, "-1 or in [0, 1]")
        check("locate", self.locate == -1.0 or 0 <= self.locate <= 1, "-1 or in [0, 1]")
        check("max_pages", 0 <= self.max_pages <= 8, "in [0, 8] (0 = the rung's)")
        check("kinds", all(k in (*TRANSCRIBE_KINDS, "codes") for k in self.kind_list()),
              f"comma-separated kinds among {(*TRANSCRIBE_KINDS, 'codes')}, or empty")
        for name in ("decoder_layers", "decoder_width", "decoder_mlp"):
            value = getattr(self, name)
            check(name, value == 0 or (value > 0 and self.init_from), "0, or > 0 with --init-from (the reader it grows)")

    def kind_list(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.kinds.split(",") if k.strip())


@dataclass(frozen=True)
class CharSlots:
    """Where each drawn character lies on the reader's image-token grid: the targets of the
    character-slot loss, a training-only objective that makes the vision tower see characters.

    Every image token stands for a `cell` x `cell` px square of the page; it has `rows` x `cols`
    slots (sub-squares), and a slot's target is the token id of the character whose centre lies in
    it, or `blank` (the space's id). A linear probe (`CharSlotProbe`) on the image embeddings the
    decoder reads must tell every slot's character: from a loss on the answer alone a fresh reader's
    vision output stopped depending on the page within a few dozen steps on small type.
    """

    cell: int  # px per image-token side
    grid: int  # image tokens per page side
    rows: int  # slot rows per token (text lines a token spans)
    cols: int  # slot columns per token (characters a token spans per line)
    char_ids: dict  # character -> token id
    blank: int  # the target of a slot without a character

    @classmethod
    def for_reader(cls, processor, render: RenderConfig) -> "CharSlots":
        """The slots of a reader's processor (patch size x downsampling = token cell) on `render`'s
        pages: as many rows as lines fit in a cell, as many columns as characters."""
        cell = processor.patch_size * processor.downsample_ratio
        side = render.page_width
        if render.page_height != side or side % cell:
            raise ValueError(f"the character slots need a square page divisible by the {cell} px token cell, "
                             f"got {render.page_width} x {render.page_height}")
        placed = layout("M\nM", render)[0]
        pitch = placed[1][1] - placed[0][1]
        advance = load_font(placed[0][0].style.font_path, placed[0][0].style.size).getlength("M")
        tok = processor.tokenizer
        vocab = tok.get_vocab()
        return cls(cell=cell, grid=side // cell, rows=max(1, round(cell / pitch)), cols=max(1, round(cell / advance)),
                   char_ids={ch: i for ch, i in vocab.items() if len(ch) == 1}, blank=vocab[" "])

    @property
    def per_token(self) -> int:
        return self.rows * self.cols

    def places(self, placed: list, render: RenderConfig, dx: int = 0, dy: int = 0) -> list[tuple[int, int] | None]:
        """Where each character of one page's text (its lines joined by line breaks) lies on the
        page moved by (dx, dy) px: (token, slot), or None for spaces, line breaks and characters
        moved off the page."""
        out: list[tuple[int, int] | None] = []
        side = self.grid * self.cell
        for i, (line, baseline) in enumerate(placed):
            if i:
                out.append(None)  # the line break
            font = load_font(line.style.font_path, line.style.size)
            x = render.margin + line.indent + dx
            cy = baseline - 0.35 * line.style.size + dy  # the middle of a lower-case letter
            row = int(cy // self.cell) * self.grid
            slot_row = int((cy % self.cell) * self.rows // self.cell) * self.cols
            for ch in line.text:
                width = font.getlength(ch)
                cx = x + width / 2
                x += width
                seen = ch != " " and 0 <= cy < side and 0 <= cx < side
                out.append((row + int(cx // self.cell), slot_row + int((cx % self.cell) * self.cols // self.cell))
                           if seen else None)
        return out

    def labels(self, placed: list, render: RenderConfig, dx: int = 0, dy: int = 0) -> torch.Tensor:
        """(grid * grid, rows * cols) targets of one page laid out as `placed` (`layout`'s lines and
        baselines) and moved by (dx, dy) px; characters of unknown or missing glyphs stay blank."""
        out = torch.full((self.grid * self.grid, self.per_token), self.blank, dtype=torch.long)
        text = "\n".join(line.text for line, _ in placed)
        for ch, place in zip(text, self.places(placed, render, dx, dy)):
            target = self.char_ids.get(ch)
            if place is not None and target is not None:
                out[place] = target
        return out

    def gaze(self, answer: str, pages: list[list], render: RenderConfig, moves: list[tuple[int, int]]) -> torch.Tensor:
        """The gaze loss's targets (`gaze_loss`): (pages, len(answer)), the image token of page p
        that holds answer character k, IGNORE_INDEX elsewhere. The answer is found in the text the
        pages draw (all of it for a transcription, the value for a question, also across a line
        the renderer wrapped); an answer the pages do not draw word for word gets no targets."""
        out = torch.full((len(pages), len(answer)), IGNORE_INDEX, dtype=torch.long)
        drawn, where = [], []
        for p, (placed, (dx, dy)) in enumerate(zip(pages, moves)):
            if p:
                drawn.append("\n")
                where.append(None)
            drawn.append("\n".join(line.text for line, _ in placed))
            where += [None if place is None else (p, place[0]) for place in self.places(placed, render, dx, dy)]
        # A line break stands where the renderer wrapped at a space: an answer may span it.
        start = "".join(drawn).replace("\n", " ").find(answer.replace("\n", " ")) if answer else -1
        if start >= 0:
            for k, place in enumerate(where[start:start + len(answer)]):
                if place is not None:
                    out[place[0], k] = place[1]
        return out


class CharSlotProbe(nn.Module):
    """The linear probe of the character-slot loss: image embedding -> every slot's character.
    Trained beside the reader (`PageGate.training_modules`), never part of it."""

    def __init__(self, hidden: int, slots: CharSlots, vocab: int) -> None:
        super().__init__()
        self.slots, self.vocab = slots, vocab
        self.proj = nn.Linear(hidden, slots.per_token * vocab)

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(pages, tokens, hidden) -> (pages, tokens, slots, vocab) logits."""
        return self.proj(embeddings).unflatten(-1, (self.slots.per_token, self.vocab))

    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor, blank_weight: float) -> tuple[torch.Tensor, float]:
        """(the character-slot loss: cross-entropy with blank slots weighted `blank_weight`, the share
        of character slots predicted right). Blank slots are most of a page: at full weight the
        probe's first lesson is "blank everywhere", and the characters came several times slower."""
        logits = self(embeddings)
        weight = torch.ones(self.vocab, device=logits.device)
        weight[self.slots.blank] = blank_weight
        labels = labels.to(logits.device)
        loss = F.cross_entropy(logits.flatten(0, 2), labels.flatten(), weight=weight)
        chars = labels != self.slots.blank
        hits = (logits.detach().argmax(-1) == labels) & chars
        return loss, hits.sum().item() / max(chars.sum().item(), 1)


def gaze_loss(attention: nn.Module, hidden: torch.Tensor, position_embeddings: tuple, input_ids: torch.Tensor,
              labels: torch.Tensor, targets: torch.Tensor, image_token_id: int, tokens_per_page: int,
              heads: int) -> tuple[torch.Tensor, float]:
    """The gaze loss of a batch and the share of its targets hit.

    `attention` is a decoder layer's self-attention and `hidden`, `position_embeddings` its inputs;
    its last `heads` heads' attention is recomputed at every position that predicts an answer
    character with a target (`CharSlots.gaze`, one row per page, concatenated over the batch) and
    trained by cross-entropy to fall on the image token that holds that character. Hit: the heads'
    mean attention is strongest there. `tokens_per_page`: image tokens of a page in the prompt (its
    grid and the view separator)."""
    batch, length, _ = hidden.shape
    split = (batch, length, -1, attention.head_dim)
    query = attention.q_proj(hidden).view(split).transpose(1, 2)[:, -heads:]
    key = attention.k_proj(hidden).view(split).transpose(1, 2)[:, -heads:]
    query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
    positions = torch.arange(length, device=hidden.device)
    losses, hits, row = [], 0, 0
    for i in range(batch):
        images = (input_ids[i] == image_token_id).nonzero().flatten()
        pages = images.numel() // tokens_per_page
        answer = (labels[i] != IGNORE_INDEX).nonzero().flatten()
        rows = targets[row:row + pages, :answer.numel() - 1].to(hidden.device)  # the EOS has no target
        row += pages
        page, char = (rows != IGNORE_INDEX).nonzero(as_tuple=True)
        if not char.numel():
            continue
        wanted = images[page * tokens_per_page + rows[page, char]]
        asking = answer[0] + char - 1  # the position whose output is character `char`
        logits = query[i][:, asking] @ key[i].transpose(-1, -2) * attention.scaling
        logits = logits.masked_fill(positions > asking[:, None], float("-inf"))
        logp = logits.log_softmax(-1)
        picked = torch.arange(char.numel(), device=hidden.device)
        losses.append(-logp[:, picked, wanted])
        hits += (logp.exp().mean(0).argmax(-1) == wanted).sum().item()
    if row != targets.shape[0]:
        raise ValueError(f"the batch's prompts hold {row} pages of {tokens_per_page} image tokens, "
                         f"but its gaze targets have {targets.shape[0]} rows")
    if not losses:
        return hidden.sum() * 0.0, 0.0
    losses = torch.cat(losses, dim=1)
    return losses.mean(), hits / losses.shape[1]


def render_task(task: ReadingTask, max_pages: int, render: RenderConfig, read_first: bool = False) -> tuple[list, str]:
    """(page images, answer): a transcription's answer is the text drawn on the pages kept; with
    `read_first` a question's answer is that text, ANSWER_AFTER and the answer (the reader copies
    the pages before it answers: copying a value out of its own text is the easier step)."""
    pages = render_text(task.text, render)[:max_pages]
    drawn = "\n".join(p.text for p in pages)
    if task.instruction == TRANSCRIBE:
        answer = drawn
    else:
        answer = drawn + ANSWER_AFTER + task.answer if read_first else task.answer
    return [p.image for p in pages], answer


def document_task(rng: random.Random, split: str = "train", lines: int = 14,
                  line_chars: int = LINE_CHARS) -> ReadingTask:
    """A transcription of prose paragraphs one after the other, about `lines` + 1 to 3 x `lines`
    full lines of `line_chars` in all: the renderer wraps them over 2 or 3 pages of `lines` lines."""
    task = make_task(rng, "prose", split, max_lines=lines, line_chars=line_chars)
    target = rng.randint(lines + 1, 3 * lines) * line_chars
    while len(task.text) < target:
        task.text += " " + make_task(rng, "prose", split, max_lines=lines, line_chars=line_chars).text
    return task


def make_page_example(rng: random.Random, stage: PageStage, jitter: int = 0, split: str = "train",
                      render: RenderConfig | None = None, slots: CharSlots | None = None,
                      targets: tuple[str, ...] = ("char_slots",)) -> dict:
    """One training (or held-out) example of `stage`: pages moved by up to min(jitter, stage.jitter)
    px, instruction, answer, kind, and with `slots` (the reader's token grid) the `targets` named,
    one row per page: "char_slots" (`CharSlots.labels`, as "aux_char_slots") and "gaze"
    (`CharSlots.gaze`, as "aux_gaze")."""
    render = render or RenderConfig.from_preset(PRESET)
    if stage.font_size:
        render = replace(render, font_size=stage.font_size)
    if rng.random() < stage.question_share:
        # (the share is drawn only where it is set, so that rungs without it draw as they always did)
        kind = "locate_qa" if stage.locate and rng.random() < stage.locate else rng.choice(QUESTION_KINDS)
        task = make_task(rng, kind, split, max_lines=stage.max_lines, line_chars=stage.line_chars)
    elif stage.documents and rng.random() < stage.documents:
        task = document_task(rng, split, stage.max_lines, stage.line_chars)
    else:
        task = make_task(rng, rng.choice(stage.kinds), split, max_lines=stage.max_lines,
                         line_chars=stage.line_chars)
    pages, answer = render_task(task, stage.max_pages if task.instruction == TRANSCRIBE else 3, render, stage.read_first)
    jitter = min(jitter, stage.jitter)
    moves = [(rng.randint(-jitter, jitter), rng.randint(-jitter, jitter)) if jitter else (0, 0) for _ in pages]
    example = {"pages": [shifted(p, dx, dy) if dx or dy else p for p, (dx, dy) in zip(pages, moves)],
               "instruction": task.instruction, "answer": answer, "kind": task.kind}
    if slots is not None and targets:
        placed = layout(task.text, render)[:len(pages)]  # the lines' positions: render_text does not return them
        if "char_slots" in targets:
            example["aux_char_slots"] = torch.stack([slots.labels(lines, render, dx, dy)
                                                     for lines, (dx, dy) in zip(placed, moves)])
        if "gaze" in targets:
            example["aux_gaze"] = slots.gaze(answer, placed, render, moves)
    return example


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of answer tokens that are the argmax under teacher forcing."""
    pred, gold = logits[:, :-1].argmax(-1), labels[:, 1:]
    mask = gold != -100
    return ((pred == gold) & mask).sum().item() / max(mask.sum().item(), 1)


def similarity(a: str, b: str) -> float:
    """Character similarity in [0, 1] (difflib's ratio, no junk heuristic)."""
    return difflib.SequenceMatcher(None, a, b, autojunk=False).ratio()


class PageStream(CurriculumStream):
    """The curriculum stream drawing page-reader examples (resumable like its parent); with `slots`
    and `targets` set (by `PageGate` when the run starts) each example carries those targets."""

    slots: CharSlots | None = None
    targets: tuple[str, ...] = ()

    def stage(self, step_index: int) -> PageStage:
        stage = fitted(PAGE_STAGES[self.schedule.at(step_index)], self.cfg.preset or PRESET)
        if self.cfg.question_share >= 0:
            stage = replace(stage, question_share=self.cfg.question_share)
        if self.cfg.documents >= 0:
            stage = replace(stage, documents=self.cfg.documents)
        if self.cfg.locate >= 0:
            stage = replace(stage, locate=self.cfg.locate)
        if self.cfg.read_first:
            stage = replace(stage, read_first=True)
        if self.cfg.kinds:
            stage = replace(stage, kinds=self.cfg.kind_list())
        if self.cfg.max_pages:
            stage = replace(stage, max_pages=self.cfg.max_pages)
        return stage

    def draw(self, stage: PageStage) -> dict:
        example = make_page_example(self.rng, stage, self.cfg.jitter, render=self.render_config, slots=self.slots,
                                    targets=self.targets)
        example.pop("kind")
        return example


class PageGate(StageGate):
    """The stage gate on token accuracy, with the page reader's held-out evaluation and its two
    training-only losses: the character-slot loss (`CharSlots`; its probe trains beside the reader
    and is saved in the run's checkpoints) and the gaze loss (`gaze_loss`). The step records carry
    `slot_accuracy` (share of character slots read right) and `gaze_accuracy` (share of answer
    characters whose trained heads look at the right image token)."""

    n_stages = len(PAGE_STAGES)

    def training_modules(self, trainer) -> list[nn.Module]:
        self.probe = None
        if not self.cfg.slot_loss:
            return []
        slots = CharSlots.for_reader(trainer.processor, self.stream.render_config)
        hidden = trainer.model.config.text_config.hidden_size
        self.probe = CharSlotProbe(hidden, slots, len(trainer.processor.tokenizer))
        earlier = Path(self.cfg.init_from) / PROBE_FILE if self.cfg.init_from else None
        if earlier is not None and earlier.is_file():
            # A fresh probe's random gradient would first pull a trained reader's image tokens about.
            self.probe.load_state_dict(load_file(earlier))
        return [self.probe]

    def on_train_begin(self, trainer) -> None:
        super().on_train_begin(trainer)
        self._records: dict[str, list[float]] = {}
        self._kept: dict = {}
        model = trainer.model
        if self.cfg.read_first:  # saved with the reader: every engine then returns the answer alone
            settings = GenerationSettings.from_model(model)
            settings.replace(answer_after=ANSWER_AFTER,
                             max_new_tokens=max(settings.max_new_tokens, READ_FIRST_TOKENS)).write_to(model)
        if self.cfg.slot_loss or self.cfg.gaze_loss:
            self.stream.slots = CharSlots.for_reader(trainer.processor, self.stream.render_config)
            self.stream.targets = (("char_slots",) if self.cfg.slot_loss else ()) + (("gaze",) if self.cfg.gaze_loss else ())
        if self.cfg.slot_loss:
            # The decoder's view of the pages: the projector's output, kept for extra_loss.
            model.get_submodule("model.multi_modal_projector").register_forward_hook(self._keep_embeddings)
        if self.cfg.gaze_loss:
            text = model.config.text_config
            if self.cfg.gaze_heads > text.num_attention_heads:
                raise ValueError(f"gaze_heads is {self.cfg.gaze_heads} but the decoder's layers have "
                                 f"{text.num_attention_heads} heads")
            self._attention = model.get_submodule(f"model.language_model.layers.{text.num_hidden_layers - 1}.self_attn")
            self._attention.register_forward_pre_hook(self._keep_attention_inputs, with_kwargs=True)
            model.register_forward_pre_hook(self._keep_batch, with_kwargs=True)
            self._tokens_per_page = self.stream.slots.grid ** 2 + 1  # the grid and the view separator

    def _keep_embeddings(self, module, args, output) -> None:
        self._kept["embeddings"] = output if module.training else None

    def _keep_attention_inputs(self, module, args, kwargs) -> None:
        if module.training:
            self._kept["hidden"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self._kept["position_embeddings"] = kwargs["position_embeddings"]

    def _keep_batch(self, module, args, kwargs) -> None:
        if module.training:
            self._kept["input_ids"], self._kept["labels"] = kwargs["input_ids"], kwargs["labels"]

    def _record(self, name: str, value: float) -> None:
        self._records.setdefault(name, []).append(value)

    def extra_loss(self, trainer, targets: dict, outputs) -> torch.Tensor | None:
        total, kept, self._kept = None, self._kept, {}
        if self.cfg.slot_loss:
            loss, accuracy = self.probe.loss(kept["embeddings"], targets["aux_char_slots"], self.cfg.blank_weight)
            self._record("slot_accuracy", accuracy)
            self._record("slot_loss", loss.item())
            total = self.cfg.slot_loss * loss
        if self.cfg.gaze_loss:
            loss, accuracy = gaze_loss(self._attention, kept["hidden"], kept["position_embeddings"],
                                       kept["input_ids"], kept["labels"], targets["aux_gaze"],
                                       trainer.processor.image_token_id, self._tokens_per_page, self.cfg.gaze_heads)
            self._record("gaze_accuracy", accuracy)
            self._record("gaze_loss", loss.item())
            total = self.cfg.gaze_loss * loss if total is None else total + self.cfg.gaze_loss * loss
        return total

    def on_step_end(self, trainer, step: int, record: dict, control) -> None:
        for name, values in self._records.items():
            record[name] = round(sum(values) / len(values), 4)
        self._records = {}
        super().on_step_end(trainer, step, record, control)

    def batch_accuracy(self, logits: torch.Tensor, labels: torch.Tensor) -> float:
        return token_accuracy(logits, labels)

    def evaluate(self, model) -> dict:
        return evaluate_page_reader(model, self.collator, n=self.cfg.eval_examples, preset=self.cfg.preset or PRESET)


def heldout_sets(n: int, seed: int = 4321, shift: int = 6, preset: str = PRESET) -> dict[str, list[dict]]:
    """The held-out evaluation sets (n examples each), from held-out paragraphs, names and values,
    drawn on pages of `preset`: transcription of pages of one line to full (1-14 lines of 30
    characters on "reader"), the same pages moved by up to `shift` px, wrapped paragraphs cut to
    3 pages, questions about prose, forms and invoices, and questions for the words after a quoted
    phrase (on the preset's full pages; their own stream). Fixed by `seed`; the questions about prose,
    forms and invoices are the same texts on every preset (their own random stream), so their scores
    compare across presets."""
    rng, asking, locating = random.Random(seed), random.Random(seed + 1), random.Random(seed + 2)
    render = RenderConfig.from_preset(preset)
    full = fitted(FULL_PAGE, preset)
    sets: dict[str, list[dict]] = {"read": [], "read_shifted": [], "read_multipage": [], "prose_qa": [],
                                   "form_qa": [], "invoice_qa": [], "locate_qa": []}
    for _ in range(n):
        task = make_task(rng, rng.choice(TRANSCRIBE_KINDS), "heldout", max_lines=full.max_lines,
                         line_chars=full.line_chars)
        pages, answer = render_task(task, 1, render)
        sets["read"].append({"pages": pages, "instruction": TRANSCRIBE, "answer": answer})
        moved = [shifted(p, rng.randint(-shift, shift), rng.randint(-shift, shift)) for p in pages]
        sets["read_shifted"].append({"pages": moved, "instruction": TRANSCRIBE, "answer": answer})
        long_task = make_task(rng, "prose", "heldout", max_lines=full.max_lines)
        long_task.text = " ".join(make_task(rng, "prose", "heldout", max_lines=14).text for _ in range(3))
        pages, answer = render_task(long_task, 3, render)
        sets["read_multipage"].append({"pages": pages, "instruction": TRANSCRIBE, "answer": answer})
        for kind in QUESTION_KINDS:
            task = make_task(asking, kind, "heldout", max_lines=QUESTION_LINES)
            pages, answer = render_task(task, 3, render)
            sets[kind].append({"pages": pages, "instruction": task.instruction, "answer": answer})
        task = make_task(locating, "locate_qa", "heldout", max_lines=full.max_lines, line_chars=full.line_chars)
        pages, answer = render_task(task, 3, render)
        sets["locate_qa"].append({"pages": pages, "instruction": task.instruction, "answer": answer})
    return sets


def heldout_transcriptions(n: int, seed: int, kinds: tuple[str, ...] = TRANSCRIBE_KINDS, max_lines: int = 0,
                           preset: str = PRESET) -> list[dict]:
    """`n` held-out one-page transcription examples of `preset` for the diagnostics, the `kinds` in
    turn, 1 to `max_lines` lines (0: up to a full page), each with its page's layout ("placed":
    `layout`'s lines and baselines, for the character slots)."""
    rng = random.Random(seed)
    render = RenderConfig.from_preset(preset)
    full = fitted(replace(FULL_PAGE, max_lines=max_lines or FULL_PAGE.max_lines), preset)
    out = []
    for i in range(n):
        task = make_task(rng, kinds[i % len(kinds)], "heldout", max_lines=full.max_lines, line_chars=full.line_chars)
        pages, answer = render_task(task, 1, render)
        out.append({"pages": pages, "instruction": TRANSCRIBE, "answer": answer,
                    "placed": layout(task.text, render)[0], "preset": preset})
    return out


@torch.no_grad()
def evaluate_page_reader(model, collator, n: int = 24, seed: int = 4321, ablate: bool = True,
                         preset: str = PRESET) -> dict:
    """Held-out scores through `generate_with_stats` (the decoding path of ask/serve) on pages of
    `preset`: for transcription sets the mean character similarity and the share of exact pages
    (also by line count), for question sets exact match, and with `ablate` exact match with the
    instruction left out (what a reader that ignores the question scores)."""
    sets = heldout_sets(n, seed, preset=preset)
    defaults = GenerationSettings.from_model(model)  # the reader's own (answer_after among them)
    lines, chars = page_capacity(preset)
    page_chars = lines * (chars + 1)
    out: dict = {}
    for name, examples in sets.items():
        reading = name.startswith("read")
        pages = [e["pages"] for e in examples]
        golds = [e["answer"] for e in examples]
        # One token per character: room for the longest gold answer and a little more (an answer
        # longer than that is wrong already, and an untrained reader would decode to any limit),
        # and for a read-first reader room to write out the pages before it.
        budget = max(len(g) for g in golds) + 16
        if defaults.answer_after and not reading:
            budget += max(len(p) for p in pages) * page_chars + len(defaults.answer_after)
        settings = defaults.replace(max_new_tokens=budget)
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
    return cfg.trainer_config(run_dir, model=MODEL_PRESET, render_preset=cfg.preset, instruction=TRANSCRIBE,
                              max_length=4096)


def ended_stage(reader: str) -> int:
    """The curriculum stage a saved page reader's last phase ended at."""
    info = Path(reader) / "reader_pretrain.json"
    if not info.is_file():
        raise ValueError(f"--start-stage -1 needs the stage {reader} ended at, but {info} is missing "
                         "(give --start-stage N)")
    return json.loads(info.read_text())["phases"][-1]["final_stage"]


def reader_preset(reader: str) -> str:
    """The render preset a saved page reader's last phase read ("reader" before presets were chosen)."""
    info = Path(reader) / "reader_pretrain.json"
    if not info.is_file():
        return PRESET
    return json.loads(info.read_text())["phases"][-1]["config"].get("preset") or PRESET


def grown(reader: str, out: Path, **sizes: int) -> Path:
    """`reader`'s folder with its decoder grown (`grow_decoder`'s `sizes`), written to `out` once (a
    resumed phase finds it there)."""
    if (out / "config.json").is_file():
        return out
    model, _ = load_model(reader)
    bigger = grow_decoder(model, **sizes)
    with atomic_dir(out) as tmp:
        shutil.copytree(reader, tmp, dirs_exist_ok=True)  # processor, bundle spec, phases, probe
        bigger.save_pretrained(tmp)
        probe = tmp / PROBE_FILE
        if probe.is_file():  # it reads the projector's output: zero weights for its new dimensions
            weights = load_file(str(probe))
            width = bigger.config.text_config.hidden_size
            weights["proj.weight"] = F.pad(weights["proj.weight"], (0, width - weights["proj.weight"].shape[1]))
            save_file(weights, str(probe))
    return out


def pretrain_page_reader(cfg: PageReaderConfig, clock: Callable[[], float] = time.monotonic) -> dict:
    """Run one phase on the Trainer; returns the phase's metadata (also in reader_pretrain.json)."""
    if cfg.decoder_layers or cfg.decoder_width or cfg.decoder_mlp:
        out = Path(cfg.out)
        start = grown(cfg.init_from, out.with_name(out.name + ".grown"), layers=cfg.decoder_layers,
                      hidden_size=cfg.decoder_width, intermediate_size=cfg.decoder_mlp)
        cfg = replace(cfg, init_from=str(start))
    if cfg.start_stage == -1:
        cfg = replace(cfg, start_stage=ended_stage(cfg.init_from))
    if not cfg.preset:
        cfg = replace(cfg, preset=reader_preset(cfg.init_from) if cfg.init_from else PRESET)
    syn = SyntheticConfig(seed=cfg.seed)  # unused by the page stream; the parent's signature wants one
    stream = PageStream(cfg, syn, [], StageSchedule(cfg.start_stage))
    stream.render_config = RenderConfig.from_preset(cfg.preset)
    gate = PageGate(cfg, syn, stream)
    meta = run_phase(cfg, stream, gate, trainer_config(cfg, cfg.run_folder()), clock,
                     preset=cfg.preset, recipe="make reader (deepsynth.training.page_reader)")
    if gate.probe is not None:  # beside the reader, for a later phase's --init-from (not part of the model)
        save_file(gate.probe.state_dict(), str(Path(cfg.out) / PROBE_FILE))
    return meta


def main() -> None:
    config = PageReaderConfig.from_command_line(__doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if config.threads:
        torch.set_num_threads(config.threads)
    print(json.dumps(pretrain_page_reader(config), indent=2))


if __name__ == "__main__":
    main()
