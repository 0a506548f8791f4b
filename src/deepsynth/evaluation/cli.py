"""``deepsynth evaluate``: score a model with and without the instruction, as it is served.

    deepsynth evaluate DATA -m MODEL [-o OUT] [--metrics em,f1,rouge] [--preset P] [--max-new-tokens N] [--no-ablation]
                       [--engine hf | vllm [--dtype D] | ray [--address A] [--replicas R] [--gpus-per-replica G]
                                                             [--decode vllm --dtype D]]

DATA is a .jsonl/.json/.parquet file of records or a folder written by ``deepsynth prepare`` (its
pages are used as they are). Pages, prompt and decoding come from the model's bundle; --preset and
--max-new-tokens override them with a warning. Scores are recorded in the model's bundle.
The default engine, hf, is transformers in this process ('local' is its deprecated name). With --engine ray, replicas of the model on a Ray cluster answer (`deepsynth.evaluation.ray_inference`);
the report is the one the local run writes. With --engine vllm (run from the vLLM environment of
`make vllm-env`), the vLLM engine that `serve --engine vllm` uses answers: the score of what that
server returns (in --dtype float32, the local report itself). With --engine ray --decode vllm (from
the vLLM environment too), each Ray replica answers with one such vLLM engine.

The command is a thin wrapper over the library's `deepsynth.evaluate` (`deepsynth.inference.batch`),
which shares its options (`BatchOptions`, from the flags by `deepsynth.inference.predict.batch_options`)
and its model-and-data step with `predict`.
"""

from __future__ import annotations

import json
from typing import Optional

import typer

from deepsynth.inference.predict import (ENGINE_HELP, AddressFlag, BatchSizeFlag, DecodeFlag, DtypeFlag,
                                        GpusPerReplicaFlag, MaxNewTokensFlag, PresetFlag, ReplicasFlag, batch_options)


def evaluate_command(
    # str, not Path: pathlib would turn s3://bucket/x into the local path s3:/bucket/x
    data: str = typer.Argument(..., help="Examples (.jsonl/.json/.parquet) or a prepared folder; local or an "
                                         "object-storage URI (s3://..., gs://...)."),
    model: str = typer.Option(..., "--model", "-m", help="Model directory (local or a URI), preset or hub id."),
    out: str = typer.Option("runs/eval.json", "--out", "-o", help="Predictions and scores (JSON); local or a URI."),
    metrics: Optional[str] = typer.Option(
        None, help="Comma-separated metrics (em, f1, rouge1, rouge2, rougeL, rougeLsum, rouge) for every example; "
                   "default: each example by its task (extractive QA: EM/F1; summaries and long free-form "
                   "answers: ROUGE-1/2/L; short free-form answers: both), reported per task."),
    preset: PresetFlag = None,
    max_new_tokens: MaxNewTokensFlag = None,
    chance: float = typer.Option(0.0, help="Chance level reported beside the ablation."),
    ablation: bool = typer.Option(True, help="Also answer without the instruction (the ablation); "
                                             "--no-ablation answers once."),
    record: bool = typer.Option(True, help="Record the scores in the model directory's bundle."),
    batch_size: BatchSizeFlag = 16,
    engine: str = typer.Option("hf", "--engine", help=ENGINE_HELP + " Same report."),
    dtype: DtypeFlag = "auto",
    decode: DecodeFlag = "hf",
    address: AddressFlag = None,
    replicas: ReplicasFlag = 1,
    gpus_per_replica: GpusPerReplicaFlag = 0.0,
) -> None:
    """Score a model (each example by its task: EM/F1, ROUGE-1/2/L) with and without the instruction."""
    from deepsynth.inference.batch import evaluate, metric_names

    try:
        names = metric_names(metrics)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="'--metrics'") from None
    options = batch_options(engine, dtype, batch_size, max_new_tokens, preset, decode, address, replicas,
                            gpus_per_replica)
    # a bad model or data, or a missing Ray / vLLM, is one `error:` line and exit code 1 (deepsynth.cli_errors)
    report = evaluate(data, model, out, options=options, metrics=names, chance=chance, ablation=ablation,
                      record=record)
    summary = {k: report[k] for k in ("n", "metrics", "scores", "scores_no_instruction", "ablation")}
    typer.echo(json.dumps(summary, indent=2))


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_command)
