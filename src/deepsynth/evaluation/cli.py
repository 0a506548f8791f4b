"""``deepsynth evaluate``: score a model with and without the instruction, as it is served.

    deepsynth evaluate DATA -m MODEL [-o OUT] [--metrics em,f1,rouge] [--preset P] [--max-new-tokens N]

DATA is a .jsonl/.json/.parquet file of records or a folder written by ``deepsynth prepare`` (its
pages are used as they are). Pages, prompt and decoding come from the model's bundle; --preset and
--max-new-tokens override them with a warning. Scores are recorded in the model's bundle.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def evaluate_command(
    data: Path = typer.Argument(..., exists=True, help="Examples (.jsonl/.json/.parquet) or a prepared folder."),
    model: str = typer.Option(..., "--model", "-m", help="Model directory, preset or hub id."),
    out: Path = typer.Option(Path("runs/eval.json"), "--out", "-o", help="Predictions and scores (JSON)."),
    metrics: Optional[str] = typer.Option(
        None, help="Comma-separated metrics (em, f1, rouge1, rouge2, rougeL, rougeLsum, rouge); default: EM/F1, "
                   "plus ROUGE-1/2/L when the data holds free-form targets (summaries)."),
    preset: Optional[str] = typer.Option(None, help="Render preset override (default: the model's bundle)."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Decoding override (default: the model's bundle)."),
    chance: float = typer.Option(0.0, help="Chance level reported beside the ablation."),
    record: bool = typer.Option(True, help="Record the scores in the model directory's bundle."),
) -> None:
    """Score a model (EM/F1, ROUGE for summaries) with and without the instruction."""
    from deepsynth.data.instruction_dataset import open_examples
    from deepsynth.evaluation.metrics import SUPPORTED_METRICS
    from deepsynth.evaluation.run import evaluate_with_ablation
    from deepsynth.models.bundle import load_bundle, record_evaluation, resolve_generation, resolve_render

    names = tuple(m.strip() for m in metrics.split(",") if m.strip()) if metrics else None
    for name in names or ():
        if name not in SUPPORTED_METRICS + ("rouge",):
            raise typer.BadParameter(f"unknown metric {name!r}; choose from {', '.join(SUPPORTED_METRICS)}, rouge",
                                     param_hint="'--metrics'")
    try:
        loaded = load_bundle(model)
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise typer.BadParameter(f"cannot load model {model!r}: {exc}", param_hint="'--model'") from None
    render = resolve_render(loaded.spec, preset)
    try:
        dataset = open_examples(data, render, loaded.spec.default_instruction)
    except (FileNotFoundError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="DATA") from None
    settings = resolve_generation(loaded.model, max_new_tokens=max_new_tokens) if max_new_tokens else None
    report = evaluate_with_ablation(loaded.decoder(settings), dataset, render, chance, out_path=out, metrics=names)
    summary = {k: report[k] for k in ("n", "metrics", "scores", "scores_no_instruction", "ablation")}
    if record and Path(model).is_dir():
        record_evaluation(model, data.name, {"scores": report["scores"],
                                             "scores_no_instruction": report["scores_no_instruction"]})
    typer.echo(json.dumps(summary, indent=2))


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_command)
