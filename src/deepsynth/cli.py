"""`deepsynth` command line: every stage of the pipeline, calling the library's own functions."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer

from deepsynth.cli_errors import DEBUG_ENV, DEBUG_META, ErrorReportingGroup
from deepsynth.data.cli import register as register_data
from deepsynth.evaluation.cli import register as register_evaluate
from deepsynth.inference.cli import register as register_ask
from deepsynth.inference.predict import register as register_predict
from deepsynth.models.cli import register as register_models
from deepsynth.models.push import register as register_push
from deepsynth.render.cli import register as register_render
from deepsynth.serve.cli import register as register_serve
from deepsynth.training.cli import register as register_training
from deepsynth.vllm.cli import register as register_vllm

# Failures are one line on stderr (deepsynth.cli_errors); --debug shows Python's own traceback,
# which typer's pretty tracebacks would replace with a multi-screen panel.
app = typer.Typer(help="DeepSynth: teach document vision-language models to follow instructions.",
                  no_args_is_help=True, add_completion=False, cls=ErrorReportingGroup, pretty_exceptions_enable=False)
register_render(app)
register_data(app)
register_evaluate(app)
register_predict(app)
register_ask(app)
register_serve(app)
register_vllm(app)
register_models(app)
register_training(app)
register_push(app)


@app.callback()
def main(ctx: typer.Context,
         verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress details."),
         debug: bool = typer.Option(False, "--debug", help=f"Show the full traceback of a failure (also {DEBUG_ENV}=1) "
                                                           "instead of one line.")) -> None:
    ctx.meta[DEBUG_META] = debug
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Run directory."),
    minutes: float = typer.Option(12.0, help="Fine-tuning budget (wall-clock minutes)."),
    model: str = typer.Option("tiny-reader", help="Starting model."),
    n_eval: int = typer.Option(200, help="Held-out examples."),
    text_encoder: str = typer.Option(
        "sentence-transformers/all-MiniLM-L6-v2",
        help="Send the instruction through this text encoder (a new skill for the reader); 'none' sends it as "
             "prompt text (the task the reader was pre-trained on)."),
    text_encoder_trainable: bool = typer.Option(False, help="Fine-tune the text encoder too."),
    layout: str = typer.Option("form", help="Synthetic page layout: a fixed-order 'form' or 'shuffled' keys."),
) -> None:
    """Fine-tune the tiny reader to answer questions about pages, evaluate, ablate, answer one."""
    from deepsynth.demo import DemoConfig, format_table, run_demo

    encoder = None if text_encoder.lower() == "none" else text_encoder
    report = run_demo(DemoConfig(out=str(out), minutes=minutes, model=model, n_eval=n_eval, text_encoder=encoder,
                                 text_encoder_trainable=text_encoder_trainable, layout=layout))
    typer.echo(format_table(report))
    typer.echo(f"\nreport: {out / 'report.json'}   curves: {out / 'train' / 'curves.png'}")


@app.command()
def train(
    # str, not Path, for every path: pathlib would turn s3://bucket/x into the local path s3:/bucket/x
    recipe: str = typer.Argument(..., help="YAML recipe of TrainerConfig fields (local or an s3://, gs://... URI)."),
    train_path: str = typer.Option(
        ..., "--train",
        help="Training examples: a .jsonl/.json/.parquet file, or a folder written by `deepsynth prepare` "
             "(its rendered pages are used as they are); local or an object-storage URI (s3://..., gs://...)."),
    eval_path: Optional[str] = typer.Option(None, "--eval",
                                            help="Evaluation examples (same forms as --train)."),
    overrides: Optional[list[str]] = typer.Option(
        None, "--set", metavar="KEY=VALUE",
        help="Override a recipe field, e.g. --set max_steps=5 --set use_lora=true (repeatable)."),
    output_dir: Optional[str] = typer.Option(None, help="Override the recipe's output_dir (local or a URI: "
                                                          "checkpoints are uploaded as they are written)."),
    resume: Optional[str] = typer.Option(None, help="Checkpoint directory or 'latest'."),
) -> None:
    """Train a model from a recipe on instruction examples or prepared folders."""
    from dataclasses import asdict

    from deepsynth import storage
    from deepsynth.data.instruction_dataset import open_examples
    from deepsynth.data.prepared_folder import PrepareError
    from deepsynth.render import RenderConfig
    from deepsynth.training.config import TrainerConfig
    from deepsynth.training.overrides import parse_overrides
    from deepsynth.training.trainer import Trainer

    try:
        fields = parse_overrides(overrides or [], TrainerConfig)
        fields.update({k: v for k, v in {"output_dir": output_dir, "resume_from_checkpoint": resume}.items() if v})
        config = TrainerConfig.from_yaml(storage.local_input(recipe, what="recipe"), **fields)
        asked = RenderConfig.from_preset(config.render_preset)
    except (ValueError, OSError) as exc:
        raise typer.BadParameter(str(exc), param_hint="'RECIPE' / '--set'") from exc

    def open_data(path: str, option: str):
        try:
            return open_examples(path, asked, config.instruction_prompt)
        except (ValueError, OSError, PrepareError) as exc:
            raise typer.BadParameter(str(exc), param_hint=f"'{option}'") from exc

    train_dataset = open_data(train_path, "--train")
    eval_dataset = open_data(eval_path, "--eval") if eval_path else None
    if eval_dataset is not None and eval_dataset.render_config != train_dataset.render_config:
        logging.getLogger(__name__).warning(
            "--eval pages are drawn with %s but --train pages with %s: the scores are on pages unlike the "
            "training ones", eval_dataset.render_config, train_dataset.render_config)
    trainer = Trainer(config)
    # Records without stored pages are evaluated on pages drawn as the training pages were drawn.
    trainer.render_config = train_dataset.render_config
    metrics, checkpoints = trainer.train(train_dataset, eval_examples=eval_dataset)
    typer.echo(json.dumps({"metrics": metrics, "checkpoints": checkpoints,
                           "render_config": asdict(train_dataset.render_config)}, indent=2))


if __name__ == "__main__":
    app()
