"""Does a fresh page reader look at the page? A short diagnostic per setting ("arm").

Trains a fresh tiny DeepSeek-OCR-2 (the real class) on one-line pages for a few minutes on one
CPU thread and measures, every `--eval-every` steps, on a fixed evaluation set:

* the teacher-forced loss with the right pages and with every example given another example's
  page (the pages rolled by one in the batch): a reader that ignores the page scores the same
  on both; one that reads scores worse on the wrong pages;
* the accuracy of the first answer character (teacher-forced argmax), which only the page can
  tell, against the prior (the share of the most frequent first character of the set);
* the teacher-forced token accuracy.

With `--fixed N` the training set is N fixed pages and the evaluation set is the same pages (a
memorisation test: can the reader use the page at all?); with `--fixed 0` training draws fresh
pages every step and evaluation uses 32 held-out pages (does it read?). At initialisation every
arm also records the RMS of the image embeddings (after the projector) and of the text
embeddings the decoder sees, the relative distance between the image embeddings of two pages,
and the gradient norm of each part of the model on one batch.

An arm is a model geometry (the `tiny-page` preset with 4 or 8 px SAM patches, or the old `tiny`
preset on its own 32 px pages), a type size on the page reader's 256 px page, what the lines say
(`words`: up to 12 characters of words, prose, names and numbers; `codes`: random letters and digits that
no prefix predicts) and the learning rate of the vision tower and projector relative to the rest.

    python benchmarks/page_reader_diagnostic.py --arms base4,patch8 --max-minutes 6 \
        --out benchmarks/page_reader_diagnostic_report.json
"""

from __future__ import annotations

import argparse
import json
import random
import string
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace

import torch

from deepsynth.data.reading import TRANSCRIBE
from deepsynth.models.collate import Collator
from deepsynth.models.deepseek_ocr2 import (DeepseekOcr2PatchReadoutForConditionalGeneration, build_tiny,
                                            build_tiny_page, tiny_config, tiny_processor)
from deepsynth.render import RenderConfig, render_text
from deepsynth.training.page_reader import (LINE_CHARS, PRESET, CharSlotProbe, CharSlots, PageStage,
                                            make_page_example, token_accuracy)
from deepsynth.training.reader_pretrain import shifted

CODE_ALPHABET = string.ascii_uppercase + string.digits
SHORT_LINE = PageStage(max_lines=1, line_chars=12, question_share=0.0)  # a line of up to 12 characters


@dataclass
class Arm:
    """One setting under test."""

    model: str = "tiny-page"  # "tiny-page" (the page reader's preset) or "tiny" (the old reader's, its own pages)
    patch_size: int = 4  # SAM patch size of tiny-page (4: 256 tokens of 16 px; 8: 64 tokens of 32 px)
    font_size: int = 0  # type size on the reader page (0 = the preset's 13 px)
    text: str = "words"  # "words": the first curriculum rung; "codes": random letters and digits
    code_chars: int = 6  # characters of a code line
    vision_lr_mult: float = 1.0  # learning rate of vision tower + projector relative to the decoder's
    sam_width: int = 0  # SAM hidden size of tiny-page (0 = the preset's)
    neck: int = 0  # SAM neck channels of tiny-page (0 = the preset's)
    global_attn: bool = False  # SAM's second layer attends globally (as the tiny preset's does)
    max_lines: int = 1  # lines per page (more fills the page with ink)
    switch_step: int = 0  # from this step on (0 = never) pages use `switch_font_size` (train and evaluation)
    switch_font_size: int = 0  # the type size after switch_step (0 = the preset's 13 px)
    pages: str = ""  # render preset of the pages ("" = the model's own: "reader" for tiny-page, "tiny" for tiny)
    slot_loss: float = 0.0  # weight of the character-slot loss (page_reader.CharSlots; 0 = off)
    blank_weight: float = 1.0  # weight of blank slots in it
    jitter: int = -1  # pages move by up to this many px (-1 = --jitter)


ARMS = {
    "base4": Arm(),
    "old-tiny": Arm(model="tiny"),
    "patch8": Arm(patch_size=8),
    "codes4": Arm(text="codes"),
    "codes8": Arm(patch_size=8, text="codes"),
    "vlr4": Arm(vision_lr_mult=5.0),
    "vlr8": Arm(patch_size=8, vision_lr_mult=5.0),
    "big4": Arm(font_size=26),
    "big8": Arm(patch_size=8, font_size=26),
    "codes8-vlr": Arm(patch_size=8, text="codes", vision_lr_mult=5.0),
    "big8-codes": Arm(patch_size=8, font_size=26, text="codes"),
    "old-tiny-on-reader-pages": Arm(model="tiny", pages="reader"),
    "patch8-on-tiny-pages": Arm(patch_size=8, pages="tiny"),
    "f32-8": Arm(patch_size=8, font_size=32),
    "f32-4": Arm(font_size=32),
    "f20-8": Arm(patch_size=8, font_size=20),
    "f32-then-13-8": Arm(patch_size=8, font_size=32, switch_step=300),
    "f32-then-13-4": Arm(font_size=32, switch_step=300),
    "codes2-f32-8": Arm(patch_size=8, font_size=32, text="codes", code_chars=2),
    "codes4-f32-8": Arm(patch_size=8, font_size=32, text="codes", code_chars=4),
    "codes2-f32-8-frozen": Arm(patch_size=8, font_size=32, text="codes", code_chars=2, vision_lr_mult=0.0),
    "codes2-f32-8-slow": Arm(patch_size=8, font_size=32, text="codes", code_chars=2, vision_lr_mult=0.1),
    "codes1-f96-8": Arm(patch_size=8, font_size=96, text="codes", code_chars=1),
    "codes1-f96-8-slow": Arm(patch_size=8, font_size=96, text="codes", code_chars=1, vision_lr_mult=0.1),
    "tinysam8": Arm(patch_size=8, sam_width=128, neck=256, global_attn=True),
    "full8": Arm(patch_size=8, max_lines=14),
    "codes8-full": Arm(patch_size=8, text="codes", max_lines=14),
    # 1-3 full lines of 13 px type, with and without the character-slot loss
    "lines3-8": Arm(patch_size=8, max_lines=3),
    "slots-lines3-8": Arm(patch_size=8, max_lines=3, slot_loss=1.0),
    "slots-blank-lines3-8": Arm(patch_size=8, max_lines=3, slot_loss=1.0, blank_weight=0.1),
    "slots-blank-still-lines3-8": Arm(patch_size=8, max_lines=3, slot_loss=1.0, blank_weight=0.1, jitter=0),
}


def build(arm: Arm, seed: int):
    if arm.model == "tiny":
        return build_tiny(seed=seed)
    if arm.model != "tiny-page":
        raise ValueError(f"arm model {arm.model!r}: use 'tiny-page' or 'tiny'")
    if not (arm.sam_width or arm.neck or arm.global_attn):
        return build_tiny_page(seed=seed, patch_size=arm.patch_size)
    # the preset's construction with SAM changed (deepseek_ocr2.build_tiny_page)
    processor = tiny_processor(256, arm.patch_size)
    tok = processor.tokenizer
    config = tiny_config(vocab_size=len(tok), image_token_id=processor.image_token_id, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, image_size=256)
    sam = config.vision_config.sam_config
    sam.patch_size, sam.hidden_size, sam.mlp_dim = arm.patch_size, arm.sam_width or 64, 4 * (arm.sam_width or 64)
    sam.output_channels, sam.window_size, sam.global_attn_indexes = arm.neck or 64, 8, [1] if arm.global_attn else []
    config.vision_config.encoder_config.max_position_embeddings = 1024
    config.text_config.max_position_embeddings = 4096
    torch.manual_seed(seed)
    return DeepseekOcr2PatchReadoutForConditionalGeneration(config), processor


def make_example(rng: random.Random, arm: Arm, split: str, jitter: int, slots: CharSlots | None = None) -> dict:
    preset = arm.pages or ("tiny" if arm.model == "tiny" else PRESET)
    render = RenderConfig.from_preset(preset, **({"font_size": arm.font_size} if arm.font_size else {}))
    jitter = jitter if arm.jitter < 0 else arm.jitter
    if arm.text == "words" and preset == PRESET and not arm.font_size:
        stage = SHORT_LINE if arm.max_lines == 1 else PageStage(arm.max_lines, LINE_CHARS, 0.0)
        example = make_page_example(rng, stage, jitter, split=split, render=render, slots=slots)
        example.pop("kind")
        return example
    if arm.text == "codes":
        text = "\n".join("".join(rng.choice(CODE_ALPHABET) for _ in range(arm.code_chars))
                         for _ in range(rng.randint(1, arm.max_lines)))
    else:  # the first rung's short lines, cut to what a line of the bigger type holds
        text = make_page_example(rng, SHORT_LINE, 0, split=split)["answer"]
    page = render_text(text, render)[0]
    image = page.image
    if jitter:
        image = shifted(image, rng.randint(-jitter, jitter), rng.randint(-jitter, jitter))
    return {"pages": [image], "instruction": TRANSCRIBE, "answer": page.text}


@torch.no_grad()
def measure(model, collator, examples: list[dict], probe: CharSlotProbe | None = None) -> dict:
    model.eval()
    batch = collator(examples)
    slot_labels = batch.pop("aux_char_slots", None)
    right = model(**batch)
    wrong = model(**{**batch, "pixel_values": batch["pixel_values"].roll(1, 0)})
    labels = batch["labels"]
    first = (labels != -100).int().argmax(1)  # index of each row's first answer token
    rows = torch.arange(labels.shape[0])
    first_ok = right.logits[rows, first - 1].argmax(-1) == labels[rows, first]
    inner = model.model
    feats = inner.multi_modal_projector(inner.vision_tower(batch["pixel_values"]).last_hidden_state)
    spread = ((feats - feats.roll(1, 0)).norm() / feats.norm()).item()
    model.train()
    out = {"loss": round(right.loss.item(), 4), "loss_wrong_pages": round(wrong.loss.item(), 4),
           "first_char_acc": round(first_ok.float().mean().item(), 4),
           "token_acc": round(token_accuracy(right.logits, labels), 4),
           "image_embed_pages_rel_dist": round(spread, 4)}
    if probe is not None:
        out["slot_acc"] = round(probe.loss(feats, slot_labels, 1.0)[1], 4)
    return out


def init_probe(model, collator, examples: list[dict]) -> dict:
    """Scales and gradient norms at initialisation (before any step)."""
    inner = model.model
    batch = collator(examples)
    batch.pop("aux_char_slots", None)
    with torch.no_grad():
        feats = inner.multi_modal_projector(inner.vision_tower(batch["pixel_values"]).last_hidden_state)
        text = inner.language_model.embed_tokens(batch["input_ids"][batch["labels"] != -100])
    a, b = feats[0], feats[1]
    out = {"image_embed_rms": round(feats.pow(2).mean().sqrt().item(), 4),
           "text_embed_rms": round(text.pow(2).mean().sqrt().item(), 4),
           "image_embed_two_pages_rel_dist": round(((a - b).norm() / a.norm()).item(), 4),
           "image_embed_token_spread": round((feats - feats.mean(1, keepdim=True)).norm().item()
                                             / feats.norm().item(), 4)}
    model.zero_grad()
    model(**batch).loss.backward()
    parts = {"sam": inner.vision_tower.sam_encoder, "vision_encoder": inner.vision_tower.vision_encoder,
             "projector": inner.multi_modal_projector, "decoder": inner.language_model}
    for name, module in parts.items():
        grads = [p.grad.norm() ** 2 for p in module.parameters() if p.grad is not None]
        out[f"grad_norm_{name}"] = round(float(sum(grads) ** 0.5), 6) if grads else 0.0
    model.zero_grad()
    return out


def run_arm(name: str, arm: Arm, args, record: dict, save) -> None:
    """Trains one arm, filling `record`; `save()` after every evaluation keeps a stopped arm's curve."""
    torch.manual_seed(args.seed)
    model, processor = build(arm, args.seed)
    collator = Collator(processor, max_length=4096)
    rng = random.Random(args.seed)
    probe = slots = None
    if arm.slot_loss:
        slots = CharSlots.for_reader(processor, RenderConfig.from_preset(PRESET))
        probe = CharSlotProbe(model.config.text_config.hidden_size, slots, len(processor.tokenizer))
        kept = {}
        model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: kept.__setitem__("pages", out))

    def sets(arm: Arm) -> tuple[list[dict], list[dict]]:
        """(fixed training pages or [], evaluation pages), the same texts for every type size."""
        if args.fixed:
            fixed = random.Random(args.seed)
            train = [make_example(fixed, arm, "train", args.jitter, slots) for _ in range(args.fixed)]
            return train, train
        held = random.Random(10_000 + args.seed)
        return [], [make_example(held, arm, "heldout", args.jitter, slots) for _ in range(32)]

    train, evalset = sets(arm)
    switched = replace(arm, font_size=arm.switch_font_size)
    firsts = Counter(e["answer"][:1] for e in evalset)
    prior = firsts.most_common(1)[0][1] / len(evalset)
    vision = [p for n, p in model.named_parameters()
              if p.requires_grad and (".vision_tower." in n or ".multi_modal_projector." in n or "view_separator" in n)]
    ids = {id(p) for p in vision}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    groups = [{"params": rest, "mult": 1.0}, {"params": vision, "mult": arm.vision_lr_mult}]
    if probe is not None:
        groups.append({"params": list(probe.parameters()), "mult": 1.0})
    opt = torch.optim.AdamW(groups, lr=args.lr, weight_decay=0.01)
    record.update({"arm": name, **asdict(arm), "image_tokens": int((collator([evalset[0]])["input_ids"]
                                                                == processor.image_token_id).sum()),
                   "first_char_prior": round(prior, 4), "init": init_probe(model, collator, evalset[:16]), "curve": []})
    start, step = time.monotonic(), 0
    while True:
        if arm.switch_step and step == arm.switch_step:
            arm = switched
            train, evalset = sets(arm)
            record["switched_at_step"] = step
        done = step >= args.steps or time.monotonic() - start > args.max_minutes * 60
        if step % args.eval_every == 0 or done:
            point = {"step": step, "minutes": round((time.monotonic() - start) / 60, 2),
                     **measure(model, collator, evalset[:32], probe)}
            record["curve"].append(point)
            record.update(steps=step, seconds_per_step=round((time.monotonic() - start) / max(step, 1), 3))
            save()
            print(name, point, flush=True)
        if done:
            break
        batch = train if args.fixed else [make_example(rng, arm, "train", args.jitter, slots)
                                          for _ in range(args.batch_size)]
        warm = min(1.0, (step + 1) / args.warmup)
        for group in opt.param_groups:
            group["lr"] = args.lr * warm * group["mult"]
        inputs = collator(batch)
        slot_labels = inputs.pop("aux_char_slots", None)
        loss = model(**inputs).loss
        if probe is not None:
            loss = loss + arm.slot_loss * probe.loss(kept["pages"], slot_labels, arm.blank_weight)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        opt.zero_grad()
        step += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", default="base4,patch8", help=f"comma-separated, from {sorted(ARMS)}")
    parser.add_argument("--fixed", type=int, default=16, help="train on this many fixed pages (0 = fresh pages)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per step with --fixed 0")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--max-minutes", type=float, default=6.0, help="per arm (evaluations included)")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=10, help="linear warm-up steps")
    parser.add_argument("--jitter", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/page_reader_diagnostic_report.json")
    parser.add_argument("--append", action="store_true", help="add the arms to the report at --out")
    args = parser.parse_args()
    unknown = [a for a in args.arms.split(",") if a not in ARMS]
    if unknown:
        parser.error(f"--arms: unknown {unknown}; choose from {sorted(ARMS)}")
    torch.set_num_threads(args.threads)
    report = {"runs": []}
    if args.append:
        with open(args.out) as f:
            report = json.load(f)
    def save() -> None:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)

    settings = {k: v for k, v in vars(args).items() if k not in ("arms", "out", "append")}
    for name in args.arms.split(","):
        record = {"settings": settings}
        report["runs"].append(record)
        run_arm(name, ARMS[name], args, record, save)


if __name__ == "__main__":
    main()
