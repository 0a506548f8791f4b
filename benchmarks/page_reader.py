"""Held-out scores of a page reader (the issue "A reader that reads", points 1 to 4).

* transcription with `Free OCR.` of held-out pages of the reader's preset (one line to a full page:
  1 to 14 lines on "reader", 1 to 7 on "reader-large"; dictionary words, real prose
  never shown in training, held-out names and numbers, punctuation, mixed case): mean character
  similarity (difflib) and share of exact pages, by line count; the same pages moved by up to
  6 px; wrapped paragraphs over 3 pages;
* questions about facts in prose, `key: value` forms (unpadded, any line order) and invoices,
  with held-out names and values, in several phrasings: exact match, and exact match with the
  instruction left out;
* the 3-line invoice of the issue and 20 variants of it, asked "What is the total amount due?"
  through the engine `deepsynth ask` uses (counted right when the answer is `4,250 euros` or
  `4,250`).

    python benchmarks/page_reader.py --model runs/page-reader/phase1 --n 100 --out benchmarks/page_reader_report.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from deepsynth.data.reading import INVOICE_ANSWERS, INVOICE_QUESTION, invoice_variants
from deepsynth.inference.engines import make_engine
from deepsynth.models import load_model
from deepsynth.models.collate import Collator
from deepsynth.models.registry import resolve
from deepsynth.training.page_reader import evaluate_page_reader, reader_preset

def invoice_check(model: str) -> dict:
    engine = make_engine(model)
    docs = invoice_variants()
    answers = [a.answer.strip() for a in engine.ask_batch(docs, [INVOICE_QUESTION] * len(docs))]
    return {"model": model, "right": sum(a in INVOICE_ANSWERS for a in answers), "of": len(docs),
            "answers": answers[:5]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="page reader folder (or a preset/checkpoint name)")
    parser.add_argument("--n", type=int, default=100, help="held-out examples per set")
    parser.add_argument("--baseline", default="form-reader", help="also ask the invoice questions of this model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--scores-from-phase", action="store_true",
                        help="report the held-out scores of the reader's last phase (its final evaluation in "
                             "reader_pretrain.json: the same sets, eval_examples each) instead of scoring again")
    parser.add_argument("--out", default="benchmarks/page_reader_report.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.monotonic()
    if args.scores_from_phase:
        phase = json.loads((Path(args.model) / "reader_pretrain.json").read_text())["phases"][-1]
        scores, n = phase["eval"], phase["config"]["eval_examples"]
        trained = {k: phase[k] for k in ("step", "minutes", "stages", "final_stage", "tokens_per_s")}
    else:
        model, processor = load_model(args.model)
        model.eval()
        preset = reader_preset(str(resolve(args.model)))  # the held-out pages are drawn as the reader reads
        scores, n = evaluate_page_reader(model, Collator(processor, max_length=4096), n=args.n, preset=preset), args.n
        trained = None
    report = {"model": args.model, "last_phase": trained, "n_per_set": n, "heldout": scores,
              "invoice": invoice_check(args.model),
              "invoice_baseline": invoice_check(args.baseline) if args.baseline else None,
              "seconds": round(time.monotonic() - start, 1)}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
