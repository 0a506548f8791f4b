"""`deepsynth check-real-size`: the released architecture trained, saved, reloaded and run on this machine
(`deepsynth.training.real_size`). `deepsynth train` itself is defined in `deepsynth.cli`."""

from __future__ import annotations

import json
from typing import Optional

import typer

from deepsynth.models.cli import on_off


def check_real_size_command(
    model: str = typer.Option("deepseek-ocr-2", "--model", "-m", help="deepseek-ocr-2 or deepseek-ocr (v1)."),
    crops: str = typer.Option("off", "--crops", help="on: crop mode 'tiles' (global view + 768 px crops); off: one "
                                                     "global view per page."),
    lora_experts: str = typer.Option("on", "--lora-experts", help="on: LoRA on the routed experts too."),
    lora_rank: int = typer.Option(16, "--lora-rank", help="LoRA rank r."),
    max_new_tokens: int = typer.Option(4, "--max-new-tokens", help="Tokens generated after the reload."),
    workdir: Optional[str] = typer.Option(None, "--workdir", help="Folder for the temporary adapter bundle."),
    device: str = typer.Option("cpu", "--device", help="cpu, or cuda on a GPU machine (CUDA allocator peak)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Build the released architecture from its real config with random bf16 weights (no hub), take one
    1024 px page through processor -> one LoRA training step -> adapter bundle saved and reloaded ->
    greedy generation, and report image tokens vs features, trainable parameters by group, seconds,
    peak memory and estimate-memory's figure. Needs about 7-14 GiB of RAM; exits 1 when a check fails."""
    from deepsynth.training.real_size import RealSizeSettings, check_failures, format_report, run_check

    try:
        settings = RealSizeSettings(model=model, crops=on_off(crops, "--crops"),
                                    lora_experts=on_off(lora_experts, "--lora-experts"), lora_rank=lora_rank,
                                    max_new_tokens=max_new_tokens, workdir=workdir, device=device)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    report = run_check(settings)
    typer.echo(json.dumps(report, indent=2) if as_json else format_report(report))
    if check_failures(report):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add `check-real-size` to the `deepsynth` CLI."""
    app.command("check-real-size")(check_real_size_command)
