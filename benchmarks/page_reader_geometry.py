"""Which token grid can a tiny DeepSeek-OCR-2 learn to read a line of small type with?

Trains the "tiny-page" preset with 4 px SAM patches (one image token per 16 x 16 px, 256 per page)
and with 8 px patches (its default: 32 x 32 px per token, 64 per page) on the page reader's
one-line rung (`deepsynth.training.page_reader`, 30 characters of words, prose, names and numbers
in the "reader" preset, pages moved by up to 6 px) for the same wall-clock budget on one CPU
thread, and scores held-out one-line pages under teacher forcing (token accuracy) at intervals.

    python benchmarks/page_reader_geometry.py --minutes 7 --out benchmarks/page_reader_geometry_report.json
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from deepsynth.models.collate import Collator
from deepsynth.models.deepseek_ocr2 import build_tiny_page
from deepsynth.training.page_reader import PAGE_STAGES, make_page_example, token_accuracy


@torch.no_grad()
def heldout_accuracy(model, collator, examples) -> float:
    model.eval()
    accs = []
    for i in range(0, len(examples), 16):
        batch = collator(examples[i:i + 16])
        accs.append(token_accuracy(model(**batch).logits, batch["labels"]))
    model.train()
    return round(sum(accs) / len(accs), 4)


def run(patch_size: int, minutes: float, stage_index: int, batch_size: int, lr: float, seed: int) -> dict:
    model, processor = build_tiny_page(seed=seed, patch_size=patch_size)
    collator = Collator(processor, max_length=4096)
    stage = PAGE_STAGES[stage_index]
    heldout = [make_page_example(random.Random(10_000 + i), stage, 6, split="heldout") for i in range(64)]
    for e in heldout:
        e.pop("kind")
    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    start, step, curve, next_eval = time.monotonic(), 0, [], 0.0
    while True:
        elapsed = time.monotonic() - start
        if elapsed >= next_eval or elapsed >= minutes * 60:
            curve.append({"minutes": round(elapsed / 60, 2), "step": step,
                          "heldout_token_acc": heldout_accuracy(model, collator, heldout)})
            print(patch_size, curve[-1], flush=True)
            next_eval += minutes * 60 / 4
            if elapsed >= minutes * 60:
                break
        batch = [make_page_example(rng, stage, 6) for _ in range(batch_size)]
        for e in batch:
            e.pop("kind")
        warm = min(1.0, (step + 1) / 50)
        for group in opt.param_groups:
            group["lr"] = lr * warm
        loss = model(**collator(batch)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        step += 1
    image_tokens = (256 // (patch_size * 4)) ** 2
    return {"patch_size": patch_size, "image_tokens_per_page": image_tokens, "pixels_per_token": patch_size * 4,
            "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2), "steps": step,
            "seconds_per_step": round(minutes * 60 / max(step, 1), 3), "curve": curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=7.0, help="training budget per geometry")
    parser.add_argument("--stage", type=int, default=5, help="page_reader.PAGE_STAGES rung to train on")
    parser.add_argument("--patch-sizes", default="4,8", help="SAM patch sizes to compare")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="benchmarks/page_reader_geometry_report.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [run(int(p), args.minutes, args.stage, args.batch_size, args.lr, seed=0)
               for p in args.patch_sizes.split(",")]
    report = {"stage": PAGE_STAGES[args.stage].__dict__, "minutes_each": args.minutes, "threads": args.threads,
              "batch_size": args.batch_size, "lr": args.lr, "results": results}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
