"""One-time pre-training of the tiny reader: a transcription curriculum, as OCR models are made.

A tiny model trained on answers alone learns to ignore the page (DESIGN.md). Dense supervision
fixes that: the model first learns to transcribe ("read" -> every line) big digits, then key/value
lines, one more line per stage, with a share of key questions so that it also learns to take a
prompt. A stage ends when the teacher-forced sequence accuracy of recent training batches passes
`advance_at`, or after `stage_minutes`. Only training values (synthetic.split_values) are used,
so held-out evaluation values are never seen here.

    python -m deepsynth.training.reader_pretrain --out runs/reader/phase1 --minutes 60

A later phase continues from a saved reader (`--init-from DIR --start-stage 5`), e.g. key
questions on the fixed-order form layout (`--layout form --question-share 0.9`); `make reader`
runs the phases that made the shipped checkpoint. The result is a normal `save_pretrained`
directory (config.json + model.safetensors + processor files) that `deepsynth.models.load_model`
reads like any checkpoint, plus every phase's metadata and log.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import random
import shutil
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image

from deepsynth.data.synthetic import TRANSCRIBE_INSTRUCTION, SyntheticConfig, make_document, split_values
from deepsynth.models.collate import Collator
from deepsynth.models.deepseek_ocr2 import build_tiny
from deepsynth.models.registry import load_model
from deepsynth.render import RenderConfig, render_text
from deepsynth.render.renderer import PRESETS

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


@dataclass
class PretrainConfig:
    out: str = "src/deepsynth/models/checkpoints/tiny-reader"
    minutes: float = 60.0  # wall-clock budget; the run stops and saves when it is spent
    batch_size: int = 16
    lr: float = 1e-3
    lr_min: float = 1e-4
    warmup_steps: int = 100
    planned_steps: int = 9_000  # length of the cosine schedule (the run may stop before)
    advance_at: float = 0.8  # rolling training sequence accuracy that ends a stage
    stage_minutes: float = 15.0  # safety cap: a stage ends after this long even below advance_at
    eval_every_minutes: float = 5.0
    eval_examples: int = 100  # held-out 4-line pages per evaluation
    seed: int = 0
    init_from: str = ""  # continue from a saved reader instead of a fresh tiny model
    start_stage: int = 0  # curriculum stage to start at (with init_from)
    question_share: float = -1.0  # overrides every stage's share of key questions when >= 0
    layout: str = "shuffled"  # synthetic page layout: "shuffled" or "form" (fixed key order)
    jitter: int = 0  # move each training page by up to this many pixels in x and y (evaluation pages stay put)


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


@torch.no_grad()
def evaluate_reader(model, collator: Collator, syn: SyntheticConfig, n: int = 100, seed: int = 1234) -> dict:
    """Held-out 4-line pages: transcription character accuracy, page exact match and question EM."""
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
    model.eval()
    out = {}
    for kind, page_lists, (instructions, golds) in (
        ("read", pages, ([TRANSCRIBE_INSTRUCTION] * n, [t for t, _ in docs])),
        ("question", pages, questions(asked)),
        ("question_seen_values", render(seen), questions(asked_seen)),
    ):
        preds = []
        for i in range(0, n, 25):
            batch = collator.prompt_batch(page_lists[i:i + 25], instructions[i:i + 25])
            gen = model.generate(**batch, max_new_tokens=48 if kind == "read" else 6, do_sample=False)
            preds += collator.tokenizer.batch_decode(gen[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        exact = sum(p.strip() == g for p, g in zip(preds, golds)) / n
        chars = sum(sum(a == b for a, b in zip(p, g)) / max(len(g), 1) for p, g in zip(preds, golds)) / n
        out[f"{kind}_em"], out[f"{kind}_char_acc"] = exact, chars
    model.train()
    return out


def render_fingerprint() -> str:
    """Hash of a reference page in the tiny preset; the reader is only valid for pages drawn this way."""
    page = render_text("alpha: 07\nbravo: 42", RenderConfig.from_preset("tiny"))[0].image
    return hashlib.sha256(page.tobytes()).hexdigest()[:16]


def earlier_phases(init_from: str) -> tuple[list[dict], list[Path]]:
    """The phases (metadata, logs) of the reader a run continues from, so the full history ships."""
    info = Path(init_from) / "reader_pretrain.json" if init_from else None
    if info is None or not info.exists():
        return [], []
    phases = json.loads(info.read_text())["phases"]
    logs = [Path(init_from) / f"reader_pretrain.phase{i + 1}.log.jsonl" for i in range(len(phases))]
    return phases, logs


def save_atomic(model, processor, out: Path, meta: dict, log_path: Path, init_from: str = "") -> None:
    """Write the reader to a temp dir, then rename: config, weights, processor, and every phase's
    metadata (reader_pretrain.json) and log (reader_pretrain.phase{N}.log.jsonl)."""
    phases, logs = earlier_phases(init_from)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    info = {"phases": [*phases, meta], "render_fingerprint": render_fingerprint()}
    (tmp / "reader_pretrain.json").write_text(json.dumps(info, indent=2))
    for n, src in enumerate([*logs, log_path], start=1):
        shutil.copyfile(src, tmp / f"reader_pretrain.phase{n}.log.jsonl")
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def pretrain(cfg: PretrainConfig) -> dict:
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    syn = SyntheticConfig(seed=cfg.seed, layout=cfg.layout)
    train_values, _ = split_values(syn)
    if cfg.init_from:
        model, processor = load_model(cfg.init_from)
    else:
        model, processor = build_tiny(seed=cfg.seed)
    collator = Collator(processor)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)

    def lr_at(step: int) -> float:
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.planned_steps - cfg.warmup_steps))
        return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * progress))

    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    log_path = out.with_name(out.name + ".log.jsonl")
    log = log_path.open("w")
    start = stage_start = last_eval = time.time()
    stage_idx, step, recent = cfg.start_stage, 0, deque(maxlen=50)
    history = []
    model.train()
    while time.time() - start < cfg.minutes * 60:
        stage = STAGES[stage_idx]
        if cfg.question_share >= 0:
            stage = Stage(stage.lines, stage.font_size, cfg.question_share)
        batch = collator([make_example(rng, stage, syn, train_values, cfg.jitter) for _ in range(cfg.batch_size)])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        outputs = model(**batch)
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        recent.append(sequence_accuracy(outputs.logits.detach(), batch["labels"]))
        step += 1
        elapsed = time.time() - start
        if step % 25 == 0:
            rec = {"step": step, "minutes": round(elapsed / 60, 2), "stage": stage_idx, "loss": round(outputs.loss.item(), 4),
                   "train_seq_acc": round(sum(recent) / len(recent), 3), "lr": lr_at(step)}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            logger.info("%s", rec)
        stage_done = len(recent) == recent.maxlen and sum(recent) / len(recent) >= cfg.advance_at
        if stage_idx < len(STAGES) - 1 and (stage_done or time.time() - stage_start > cfg.stage_minutes * 60):
            history.append({"stage": stage_idx, "ended_step": step, "minutes": round(elapsed / 60, 2),
                            "train_seq_acc": round(sum(recent) / len(recent), 3)})
            stage_idx, stage_start = stage_idx + 1, time.time()
            recent.clear()
        if time.time() - last_eval > cfg.eval_every_minutes * 60:
            last_eval = time.time()
            scores = evaluate_reader(model, collator, syn, n=cfg.eval_examples)
            rec = {"step": step, "minutes": round(elapsed / 60, 2), "eval": scores}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            logger.info("%s", rec)
            save_atomic(model, processor, out, {"config": asdict(cfg), "step": step, "stages": history, "eval": scores},
                        log_path, cfg.init_from)
    scores = evaluate_reader(model, collator, syn, n=cfg.eval_examples)
    meta = {"config": asdict(cfg), "step": step, "minutes": round((time.time() - start) / 60, 2),
            "stages": history, "final_stage": stage_idx, "eval": scores}
    log.write(json.dumps({"final": meta}) + "\n")
    log.close()
    save_atomic(model, processor, out, meta, log_path, cfg.init_from)
    return meta


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in asdict(PretrainConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    print(json.dumps(pretrain(PretrainConfig(**vars(args))), indent=2))


if __name__ == "__main__":
    main()
