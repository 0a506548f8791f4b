"""`deepsynth estimate-memory`: parameters and training memory of a configuration, without weights.
(`deepsynth check-real-size`, which trains, is registered by `deepsynth.training.cli`.)"""

from __future__ import annotations

import json
from typing import Optional

import typer


def estimate_memory_command(
    model: str = typer.Option(..., "--model", "-m", help="Preset, alias (deepseek-ocr-2), hub id or local directory."),
    lora: bool = typer.Option(False, "--lora", help="LoRA adapters on the decoder (base frozen)."),
    qlora: bool = typer.Option(False, "--qlora", help="LoRA on a 4-bit (NF4) decoder."),
    text_encoder: Optional[str] = typer.Option(None, "--text-encoder",
                                               help="Text encoder id (Qwen/Qwen2.5-7B, all-MiniLM-L6-v2, ...)."),
    text_encoder_trainable: bool = typer.Option(False, "--text-encoder-trainable", help="Fine-tune the text encoder."),
    batch_size: int = typer.Option(1, "--batch-size", "-b", help="Examples per GPU per step."),
    precision: str = typer.Option("bf16", "--precision", help="bf16, fp16 or fp32."),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="Tokens per example (default: one page + 512)."),
    page_size: int = typer.Option(1024, "--page-size", help="Page side in pixels (dynamic-resolution models)."),
    freeze_vision: bool = typer.Option(False, "--freeze-vision", help="Vision tower frozen (full fine-tune)."),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="Recompute activations."),
    lora_rank: int = typer.Option(16, "--lora-rank", help="LoRA rank r."),
    crops: str = typer.Option("off", "--crops", help="on: pages in crop mode 'tiles' (global view + local crops, "
                                                     "DeepSeek-OCR-2: 833 tokens per 1024 px page); off: one view."),
    lora_experts: str = typer.Option("on", "--lora-experts",
                                     help="on: LoRA reaches the routed experts too (TrainerConfig.lora_experts)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Parameters, trainable parameters and per-GPU memory (weights, gradients, AdamW, activations),
    built on the meta device from the real config: nothing is downloaded or allocated."""
    from deepsynth.models.memory import estimate_memory, format_table

    try:
        estimate = estimate_memory(model, lora=lora, qlora=qlora, text_encoder=text_encoder, batch_size=batch_size,
                                   precision=precision, seq_len=seq_len, lora_rank=lora_rank,
                                   freeze_vision=freeze_vision, text_encoder_trainable=text_encoder_trainable,
                                   gradient_checkpointing=gradient_checkpointing, page_size=page_size,
                                   crops=on_off(crops, "--crops"), lora_experts=on_off(lora_experts, "--lora-experts"))
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    if as_json:
        typer.echo(json.dumps(estimate.to_dict(), indent=2))
        return
    typer.echo(format_table([estimate]))
    for note in estimate.notes:
        typer.echo(f"note: {note}")
    typer.echo("Estimates (+-25%), per GPU without sharding; add ~1 GiB for the CUDA context. See docs/memory.md.")


def on_off(value: str, option: str) -> bool:
    if value.lower() not in ("on", "off"):
        raise typer.BadParameter(f"{option} takes 'on' or 'off', got {value!r}")
    return value.lower() == "on"


def register(app: typer.Typer) -> None:
    """Add `estimate-memory` to the `deepsynth` CLI."""
    app.command("estimate-memory")(estimate_memory_command)
