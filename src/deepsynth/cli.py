"""`deepsynth` command line: every stage of the pipeline, calling the library's own functions."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer

from deepsynth.data.cli import register as register_data
from deepsynth.inference.cli import register as register_ask
from deepsynth.models.cli import register as register_models
from deepsynth.render.cli import register as register_render
from deepsynth.serve.cli import register as register_serve

app = typer.Typer(help="DeepSynth: teach document vision-language models to follow instructions.",
                  no_args_is_help=True, add_completion=False)
register_render(app)
register_data(app)
register_ask(app)
register_serve(app)
register_models(app)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Run directory."),
    minutes: float = typer.Option(12.0, help="Fine-tuning budget (wall-clock minutes)."),
    model: str = typer.Option("tiny-reader", help="Starting model."),
    n_eval: int = typer.Option(200, help="Held-out examples."),
    text_encoder: Optional[str] = typer.Option(
        None, help="Send the instruction through this text encoder (e.g. sentence-transformers/all-MiniLM-L6-v2)."),
    text_encoder_trainable: bool = typer.Option(False, help="Fine-tune the text encoder too."),
    layout: str = typer.Option("form", help="Synthetic page layout: a fixed-order 'form' or 'shuffled' keys."),
) -> None:
    """Fine-tune the tiny reader to answer questions about pages, evaluate, ablate, answer one."""
    from deepsynth.demo import DemoConfig, format_table, run_demo

    report = run_demo(DemoConfig(out=str(out), minutes=minutes, model=model, n_eval=n_eval, text_encoder=text_encoder,
                                 text_encoder_trainable=text_encoder_trainable, layout=layout))
    typer.echo(format_table(report))
    typer.echo(f"\nreport: {out / 'report.json'}   curves: {out / 'train' / 'curves.png'}")


@app.command()
def train(
    recipe: Path = typer.Argument(..., exists=True, dir_okay=False, help="YAML recipe of TrainerConfig fields."),
    train_file: Path = typer.Option(..., "--train", exists=True, help="Training examples (.jsonl/.json/.parquet)."),
    eval_file: Optional[Path] = typer.Option(None, "--eval", exists=True, help="Evaluation examples."),
    output_dir: Optional[str] = typer.Option(None, help="Override the recipe's output_dir."),
    resume: Optional[str] = typer.Option(None, help="Checkpoint directory or 'latest'."),
) -> None:
    """Train a model from a recipe on instruction examples."""
    from deepsynth.data import read_examples
    from deepsynth.training.config import TrainerConfig
    from deepsynth.training.trainer import Trainer

    overrides = {k: v for k, v in {"output_dir": output_dir, "resume_from_checkpoint": resume}.items() if v}
    config = TrainerConfig.from_yaml(recipe, **overrides)
    metrics, checkpoints = Trainer(config).train(read_examples(train_file),
                                                 read_examples(eval_file) if eval_file else None)
    typer.echo(json.dumps({"metrics": metrics, "checkpoints": checkpoints}, indent=2))


@app.command()
def evaluate(
    data: Path = typer.Argument(..., exists=True, help="Examples (.jsonl/.json/.parquet)."),
    model: str = typer.Option(..., "--model", "-m", help="Model directory, preset or hub id."),
    out: Path = typer.Option(Path("runs/eval.json"), "--out", "-o", help="Predictions and scores (JSON)."),
    preset: str = typer.Option("tiny", help="Render preset the model reads."),
    max_new_tokens: int = typer.Option(32),
    chance: float = typer.Option(0.0, help="Chance level reported beside the ablation."),
) -> None:
    """Score a model (EM/F1) with and without the instruction."""
    from deepsynth.data import read_examples
    from deepsynth.evaluation.run import evaluate_with_ablation
    from deepsynth.models import load_model
    from deepsynth.models.generate import GenerationSettings
    from deepsynth.render import RenderConfig

    net, processor = load_model(model)
    report = evaluate_with_ablation(net, processor, read_examples(data), RenderConfig.from_preset(preset), chance,
                                    GenerationSettings(max_new_tokens=max_new_tokens), out_path=out)
    typer.echo(json.dumps({k: report[k] for k in ("n", "scores", "scores_no_instruction", "ablation")}, indent=2))


if __name__ == "__main__":
    app()
