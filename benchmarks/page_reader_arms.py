"""Short A/Bs of page-reader phases: arms that run side by side, for the same wall-clock time, and
differ only in their own flags.

Each arm is a phase of `deepsynth.training.page_reader`: with `--reader`, one that continues that
reader at the stage it ended at, with the learning rate decaying from `--lr` to `--lr-min`; without
it, the recipe's first phase from scratch (its own learning rate and curriculum). `--arm NAME=FLAGS`
gives an arm its folder name (under `--work`) and its own page_reader flags: none = the phase as it
is; `--decoder-layers N` appends decoder layers, `--decoder-width W --decoder-mlp M` widens the
decoder (`grow_decoder`: the grown reader answers as the old one until training moves it);
`--kinds ...` changes what is transcribed; `--preset reader-large` draws the pages in larger type
(the held-out sets follow each arm's preset; the questions are the same texts on every preset).
Give each arm a `--planned-steps` of about the steps it
makes in its time, so that every arm's learning rate decays fully. The arms run one thread each,
for `--minutes`: a costlier arm makes fewer steps, so the comparison is at equal time, which is
what a recipe spends. Then each arm is scored on the held-out sets (`evaluate_page_reader`, `--n`
per set), on the issue's invoice and its 20 variants through the engine `deepsynth ask` uses, and
by `benchmarks/page_reader_errors.py`'s teacher-forced errors (60 held-out pages: how often the
decoder names the next character, and whether the reader's probe reads the characters it misses).
An arm whose folder exists is scored, not trained again.

    python benchmarks/page_reader_arms.py --reader src/deepsynth/models/checkpoints/tiny-reader \
        --arm "decoder3=--planned-steps 3600" --arm "decoder6=--decoder-layers 6 --planned-steps 2600" \
        --minutes 80 --work runs/ab --out benchmarks/page_reader_depth_report.json
    python benchmarks/page_reader_arms.py --arm "small=" --arm "large=--preset reader-large" \
        --minutes 90 --work runs/type --out benchmarks/page_reader_type_report.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from page_reader import invoice_check  # benchmarks/page_reader.py
from page_reader_errors import errors  # benchmarks/page_reader_errors.py

from deepsynth.models import load_model
from deepsynth.models.collate import Collator
from deepsynth.training.page_reader import PROBE_FILE, evaluate_page_reader, heldout_transcriptions, reader_preset


def phase_command(args, flags: str, out: Path) -> list[str]:
    start = (["--init-from", args.reader, "--start-stage", "-1", "--warmup-steps", "20", "--lr", str(args.lr),
              "--lr-min", str(args.lr_min)] if args.reader else ["--start-stage", "0"])
    return [sys.executable, "-m", "deepsynth.training.page_reader", *start,
            "--minutes", str(args.minutes), "--eval-examples", "24", "--eval-every-minutes", str(args.eval_every),
            "--threads", "1", "--out", str(out), *shlex.split(flags)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reader", default="", help="the trained page reader every arm continues (none: from scratch)")
    parser.add_argument("--arm", action="append", required=True,
                        help="NAME=FLAGS: an arm, its folder name under --work and its page_reader flags")
    parser.add_argument("--minutes", type=float, default=80)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lr-min", type=float, default=1e-5)
    parser.add_argument("--eval-every", type=float, default=30, help="minutes between an arm's own evaluations")
    parser.add_argument("--n", type=int, default=100, help="held-out examples per set")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the scoring")
    parser.add_argument("--work", default="runs/arms", help="folder of the arms' readers, runs and logs")
    parser.add_argument("--out", default="benchmarks/page_reader_arms_report.json")
    args = parser.parse_args()
    arms = []
    for arm in args.arm:
        name, sep, flags = arm.partition("=")
        if not sep or not name:
            parser.error(f"--arm takes NAME=FLAGS, got {arm!r}")
        arms.append((name, flags, Path(args.work) / name))
    Path(args.work).mkdir(parents=True, exist_ok=True)
    running = []
    for name, flags, out in arms:
        if not out.exists():
            log = (Path(args.work) / f"{name}.log").open("w")
            running.append(subprocess.Popen(phase_command(args, flags, out), stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "OMP_NUM_THREADS": "1"}))
    for process in running:
        if process.wait():
            raise SystemExit(f"an arm failed (exit {process.returncode}); see its log in {args.work}")
    torch.set_num_threads(args.threads)
    report = {"settings": vars(args), "arms": []}
    error_pages: dict[str, list[dict]] = {}  # drawn once per preset for all arms
    for name, flags, out in arms:
        phase = json.loads((out / "reader_pretrain.json").read_text())["phases"][-1]
        model, processor = load_model(str(out))
        model.eval()
        start = time.monotonic()
        preset = reader_preset(str(out))
        scores = evaluate_page_reader(model, Collator(processor, max_length=4096), n=args.n, preset=preset)
        if preset not in error_pages:
            error_pages[preset] = heldout_transcriptions(60, 77, preset=preset)
        text = model.config.text_config
        report["arms"].append({
            "arm": name, "flags": flags, "preset": preset, "decoder": {"layers": text.num_hidden_layers, "width": text.hidden_size,
                                                     "mlp": text.intermediate_size},
            "parameters": sum(p.numel() for p in model.parameters()),
            "steps": phase["step"], "train_minutes": phase["minutes"], "final_stage": phase["final_stage"],
            "heldout": scores, "invoice": invoice_check(str(out)),
            "teacher_forced": {k: v for k, v in errors(model, processor, error_pages[preset], out / PROBE_FILE).items()
                               if k != "wrong_samples"},
            "score_seconds": round(time.monotonic() - start, 1)})
        Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
