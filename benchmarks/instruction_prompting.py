"""Benchmark: the instruction-prompting design document's two tables, on the project's code paths.

1. Memory by configuration at real size, from `deepsynth.models.memory.estimate_memory` (what
   `deepsynth estimate-memory` prints), beside the figures the design document states. Its rows are
   mapped to our options as its own examples configure them: the vision tower frozen (its
   architecture keeps it frozen), bf16, batch 4 (its Q&A example) for the three full fine-tuning
   rows, LoRA r16 with batch 6 (its LoRA example) for the last; the text encoder is its
   Qwen/Qwen2.5-7B-Instruct. Each row is estimated for DeepSeek-OCR (v1, the document's model) and
   DeepSeek-OCR-2, with and without the encoder, so the table splits the total into the
   vision-language model's part and the encoder's part as the document does. Estimates, not
   measurements (docs/memory.md: +-25%; the real-size check measures them on a GPU).
2. Training tokens/s with the instruction as prompt text ("vision only": no text encoder), through
   a frozen text encoder and through a trainable one, on the tiny DeepSeek-OCR-2 class, with the
   one Trainer (`deepsynth train`'s loop) on the same pre-rendered examples. Encoders: the tiny
   Qwen2 class (the document's encoder family, 2 layers) and the real all-MiniLM-L6-v2 (offline
   package). The configurations run interleaved for several rounds in one process; each reports
   the trainer's own tokens/s (non-pad decoder input tokens per second of drawing batches and
   stepping), and the ratios to vision only are taken per round, then the median. The machine's
   load average is recorded: the cores are shared, so compare the ratios, not the absolute rates.

    python benchmarks/instruction_prompting.py [--out benchmarks/instruction_prompting_report.json]
                                               [--steps 30] [--rounds 3] [--batch-size 8] [--skip-memory]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

from deepsynth.data.instruction_dataset import InstructionDataset  # noqa: E402
from deepsynth.data.synthetic import SyntheticConfig, generate  # noqa: E402
from deepsynth.models.memory import estimate_memory  # noqa: E402
from deepsynth.models.text_encoder import DEFAULT_TEXT_ENCODER, MINILM  # noqa: E402
from deepsynth.render import RenderConfig, render_text  # noqa: E402
from deepsynth.training.config import TrainerConfig  # noqa: E402
from deepsynth.training.trainer import Trainer  # noqa: E402

# The design document's memory table, in the GB it states (vision-language model, encoder, total).
DOCUMENT_MEMORY = {
    "no text encoder": {"model_gb": 16, "encoder_gb": None, "total_gb": 16},
    "frozen text encoder": {"model_gb": 16, "encoder_gb": 7, "total_gb": 23},
    "trainable text encoder": {"model_gb": 16, "encoder_gb": 14, "total_gb": 30},
    "LoRA + frozen text encoder": {"model_gb": 8, "encoder_gb": 7, "total_gb": 15},
}
# Its speed table: tokens/s and the overhead it derives from them (baseline / rate - 1).
DOCUMENT_SPEED = {"vision only": 15, "frozen text encoder": 14, "trainable text encoder": 12}

MEMORY_ROWS = {  # row -> (estimate_memory options without the encoder, encoder trainable or None)
    "no text encoder": (dict(freeze_vision=True, batch_size=4), None),
    "frozen text encoder": (dict(freeze_vision=True, batch_size=4), False),
    "trainable text encoder": (dict(freeze_vision=True, batch_size=4), True),
    "LoRA + frozen text encoder": (dict(lora=True, lora_rank=16, batch_size=6), False),
}
MEMORY_MODELS = ("deepseek-ocr", "deepseek-ocr-2")

SPEED_RUNS = {  # name -> (text encoder or None, trainable)
    "vision only": (None, False),
    "frozen text encoder (tiny Qwen2)": ("tiny-qwen2", False),
    "trainable text encoder (tiny Qwen2)": ("tiny-qwen2", True),
    "frozen text encoder (all-MiniLM-L6-v2)": (MINILM, False),
    "trainable text encoder (all-MiniLM-L6-v2)": (MINILM, True),
}


def memory_table() -> list[dict]:
    rows = []
    for model in MEMORY_MODELS:
        for row, (options, trainable) in MEMORY_ROWS.items():
            bare = estimate_memory(model, precision="bf16", **options)
            full = bare if trainable is None else estimate_memory(
                model, precision="bf16", text_encoder=DEFAULT_TEXT_ENCODER, text_encoder_trainable=trainable,
                **options)
            rows.append({
                "model": model, "configuration": row, "options": options,
                "text_encoder": None if trainable is None else DEFAULT_TEXT_ENCODER,
                "model_gib": bare.total_gib, "encoder_gib": None if trainable is None else
                round(full.total_gib - bare.total_gib, 2),
                "total_gib": full.total_gib, "trainable_parameters": full.trainable_parameters,
                "seq_len": full.seq_len, "document": DOCUMENT_MEMORY[row],
            })
    return rows


def speed_data(n: int) -> InstructionDataset:
    """Synthetic key/value Q&A on tiny pages, rendered once so every run reads the same pixels."""
    examples = generate(SyntheticConfig(facts_per_doc=4), n, "train")
    config = RenderConfig.from_preset("tiny")
    pages = [[p.image for p in render_text(ex.text, config)] for ex in examples]
    return InstructionDataset(examples, config, pages=pages)


def one_run(name: str, data: InstructionDataset, steps: int, batch_size: int, root: Path) -> dict:
    encoder, trainable = SPEED_RUNS[name]
    config = TrainerConfig(model_name="tiny", output_dir=str(root / name.replace(" ", "_")), batch_size=batch_size,
                           max_steps=steps, learning_rate=1e-3, log_interval=steps, render_preset="tiny", seed=0,
                           use_text_encoder=encoder is not None, text_encoder_model=encoder,
                           text_encoder_trainable=trainable)
    trainer = Trainer(config)
    trainable_params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    metrics, _ = trainer.train(data)
    return {"tokens_per_s": metrics["tokens_per_s"], "step_seconds": metrics["step_seconds"],
            "examples_per_s": round(steps * batch_size / metrics["step_seconds"], 2),
            "tokens": metrics["tokens"], "trainable_parameters": trainable_params}


def speed_table(steps: int, rounds: int, batch_size: int) -> dict:
    data = speed_data(max(64, steps * batch_size))
    runs: dict[str, list[dict]] = {name: [] for name in SPEED_RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name in SPEED_RUNS:
                result = one_run(name, data, steps, batch_size, Path(tmp) / f"round{r}")
                runs[name].append(result)
                print(f"round {r + 1}/{rounds} {name}: {result['tokens_per_s']} tokens/s", file=sys.stderr)
    base = runs["vision only"]
    table = {}
    for name, results in runs.items():
        ratios = [res["tokens_per_s"] / b["tokens_per_s"] for res, b in zip(results, base)]
        ratio = statistics.median(ratios)
        table[name] = {
            "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in results),
            "examples_per_s_median": statistics.median(r["examples_per_s"] for r in results),
            "ratio_to_vision_only": round(ratio, 3),
            "overhead": round(1 / ratio - 1, 3),  # the document's measure: baseline rate / rate - 1
            "trainable_parameters": results[0]["trainable_parameters"],
            "runs": results,
        }
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("instruction_prompting_report.json"))
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all configurations")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--skip-memory", action="store_true", help="only the tokens/s table")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)  # the cores are shared; one thread keeps the runs comparable
    started = time.time()
    report = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "load_average_start": os.getloadavg()},
        "settings": {"steps": args.steps, "rounds": args.rounds, "batch_size": args.batch_size, "model": "tiny"},
        "document_speed_tokens_per_s": DOCUMENT_SPEED,
    }
    if not args.skip_memory:
        report["memory"] = memory_table()
    report["speed"] = speed_table(args.steps, args.rounds, args.batch_size)
    report["machine"]["load_average_end"] = os.getloadavg()
    report["seconds"] = round(time.time() - started, 1)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, row in report["speed"].items():
        print(f"{name}: {row['tokens_per_s_median']} tokens/s, x{row['ratio_to_vision_only']} of vision only "
              f"(overhead {row['overhead']:+.0%})")
    for row in report.get("memory", []):
        doc = row["document"]
        print(f"{row['model']} {row['configuration']}: {row['total_gib']:.1f} GiB "
              f"(model {row['model_gib']:.1f} + encoder {row['encoder_gib'] or 0:.1f}); document: {doc['total_gb']} GB")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
