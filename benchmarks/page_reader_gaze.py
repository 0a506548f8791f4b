"""Does the gaze loss help a page reader read? Continues one trained reader with and without it.

Each arm is a short phase of `deepsynth.training.page_reader` from the same reader (`--reader`),
at the same rung, learning-rate schedule (decaying from `--lr` to `--lr-min` over the arm's steps),
seed and number of steps, with the gaze loss's weight as the only difference (the character-slot
loss stays on in every arm). After each phase this measures, on held-out pages only:

* the phase's own held-out evaluation (`evaluate_page_reader`: transcription, moved pages, 2-3
  page paragraphs, question EM with and without the instruction), `--eval-examples` per set;
* transcription character similarity and exact pages by kind of text (dictionary words, real
  prose, mixed) on 1-6 line pages, `--per-kind` pages each;
* the gaze hit rate: the share of answer characters at which the mean attention of the decoder's
  last layer's last `--gaze-heads` heads is strongest on the image token holding that character
  (what the gaze loss trains; measured in every arm, trained only where the weight is above 0).

    python benchmarks/page_reader_gaze.py --reader runs/page-reader/phase2 --stage 5 --steps 700 \
        --out benchmarks/page_reader_gaze_report.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from deepsynth.data.reading import TRANSCRIBE
from deepsynth.models import load_model
from deepsynth.models.collate import Collator, concat_rows
from deepsynth.models.generate import GenerationSettings, generate_with_stats
from deepsynth.render import RenderConfig
from deepsynth.training.page_reader import (PRESET, TRANSCRIBE_KINDS, CharSlots, PageReaderConfig, gaze_loss,
                                            heldout_transcriptions, pretrain_page_reader, similarity)


@torch.no_grad()
def gaze_hit_rate(model, processor, examples: list[dict], heads: int) -> float:
    """Share of answer characters whose last-layer heads look at the right image token (teacher forced)."""
    render = RenderConfig.from_preset(PRESET)
    slots = CharSlots.for_reader(processor, render)
    collator = Collator(processor, max_length=4096)
    text = model.config.text_config
    attention = model.get_submodule(f"model.language_model.layers.{text.num_hidden_layers - 1}.self_attn")
    kept = {}
    hook = attention.register_forward_pre_hook(
        lambda m, a, kw: kept.update(hidden=kw["hidden_states"], rope=kw["position_embeddings"]), with_kwargs=True)
    hits = total = 0
    try:
        for start in range(0, len(examples), 8):
            chunk = examples[start:start + 8]
            batch = collator([{k: e[k] for k in ("pages", "instruction", "answer")} for e in chunk])
            targets = concat_rows([slots.gaze(e["answer"], [e["placed"]], render, [(0, 0)]) for e in chunk])
            model(**batch)
            count = int((targets >= 0).sum())
            _, rate = gaze_loss(attention, kept["hidden"], kept["rope"], batch["input_ids"], batch["labels"], targets,
                                processor.image_token_id, slots.grid ** 2 + 1, heads)
            hits += rate * count
            total += count
    finally:
        hook.remove()
    return round(hits / max(total, 1), 4)


def score(model_dir: str, per_kind: int, heads: int, seed: int) -> dict:
    model, processor = load_model(model_dir)
    model.eval()
    collator = Collator(processor, max_length=4096)
    out: dict = {"by_kind": {}}
    every = []
    for i, kind in enumerate(TRANSCRIBE_KINDS):
        examples = heldout_transcriptions(per_kind, seed + i, kinds=(kind,), max_lines=6)
        every += examples
        golds = [e["answer"] for e in examples]
        settings = GenerationSettings(max_new_tokens=max(len(g) for g in golds) + 16)
        preds = [r["answer"] for r in generate_with_stats(model, collator, [e["pages"] for e in examples],
                                                          [TRANSCRIBE] * len(examples), settings, batch_size=8)]
        sims = [similarity(p, g) for p, g in zip(preds, golds)]
        out["by_kind"][kind] = {"char_similarity": round(sum(sims) / len(sims), 4),
                                "exact": round(sum(p == g for p, g in zip(preds, golds)) / len(golds), 4),
                                "example": {"gold": golds[0][:80], "pred": preds[0][:80]}}
    out["gaze_hit_rate"] = gaze_hit_rate(model, processor, every, heads)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reader", required=True, help="the trained page reader every arm continues")
    parser.add_argument("--weights", default="0,1", help="comma-separated gaze-loss weights, one arm each")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--stage", type=int, default=5, help="curriculum rung of every arm")
    parser.add_argument("--lr", type=float, default=1e-4, help="every arm's learning rate at its first step")
    parser.add_argument("--lr-min", type=float, default=1e-5, help="... and at its last (cosine decay)")
    parser.add_argument("--gaze-heads", type=int, default=2)
    parser.add_argument("--eval-examples", type=int, default=24)
    parser.add_argument("--per-kind", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="runs/gaze-ab", help="folder of the arms' readers and runs")
    parser.add_argument("--out", default="benchmarks/page_reader_gaze_report.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = {"settings": vars(args), "before": score(args.reader, args.per_kind, args.gaze_heads, seed=11),
              "arms": []}
    for weight in [float(w) for w in args.weights.split(",")]:
        out = Path(args.work) / f"gaze{weight:g}"
        cfg = PageReaderConfig(out=str(out), init_from=args.reader, start_stage=args.stage, warmup_steps=1,
                               lr=args.lr, lr_min=args.lr_min, planned_steps=args.steps, max_steps=args.steps, minutes=1e6,
                               eval_every_minutes=1e6, eval_examples=args.eval_examples, gaze_loss=weight,
                               gaze_heads=args.gaze_heads, resume="")
        start = time.monotonic()
        meta = pretrain_page_reader(cfg)
        arm = {"gaze_loss": weight, "steps": meta["step"], "train_minutes": round((time.monotonic() - start) / 60, 2),
               "eval": meta["eval"], **score(str(out), args.per_kind, args.gaze_heads, seed=11)}
        report["arms"].append(arm)
        Path(args.out).write_text(json.dumps(report, indent=2))
        print(json.dumps({k: arm[k] for k in ("gaze_loss", "by_kind", "gaze_hit_rate")}), flush=True)


if __name__ == "__main__":
    main()
