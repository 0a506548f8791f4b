"""``deepsynth evaluate``: score a model with and without the instruction, as it is served.

    deepsynth evaluate DATA -m MODEL [-o OUT] [--metrics em,f1,rouge] [--preset P] [--max-new-tokens N]
                       [--engine ray [--address A] [--replicas R] [--gpus-per-replica G]
                                     [--decode vllm --dtype D]]
                       [--engine vllm [--dtype D]]

DATA is a .jsonl/.json/.parquet file of records or a folder written by ``deepsynth prepare`` (its
pages are used as they are). Pages, prompt and decoding come from the model's bundle; --preset and
--max-new-tokens override them with a warning. Scores are recorded in the model's bundle.
With --engine ray, replicas of the model on a Ray cluster answer (`deepsynth.evaluation.ray_inference`);
the report is the one the local run writes. With --engine vllm (run from the vLLM environment of
`make vllm-env`), the vLLM engine that `serve --engine vllm` uses answers: the score of what that
server returns (in --dtype float32, the local report itself). With --engine ray --decode vllm (from
the vLLM environment too), each Ray replica answers with one such vLLM engine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from deepsynth.inference.engines import ENGINES, check_dtype


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
    preset: Optional[str] = typer.Option(None, help="Render preset override (default: the model's bundle)."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Decoding override (default: the model's bundle)."),
    chance: float = typer.Option(0.0, help="Chance level reported beside the ablation."),
    record: bool = typer.Option(True, help="Record the scores in the model directory's bundle."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Examples per generate call."),
    engine: str = typer.Option("local", "--engine", help="local (this process), ray (model replicas as Ray "
                                                         "actors; needs the cluster extra) or vllm (the vLLM "
                                                         "engine `serve --engine vllm` answers with; needs the "
                                                         "vLLM environment of `make vllm-env`). Same report."),
    dtype: str = typer.Option("auto", callback=check_dtype,
                              help="vLLM engine (--engine vllm, or --engine ray --decode vllm): weights' dtype "
                                   "(auto: vLLM's own choice, what `serve --engine vllm` uses by default; float32: "
                                   "the local engine's answers)."),
    decode: str = typer.Option("hf", "--decode", help="Ray engine: what each replica decodes with: hf "
                                                      "(transformers) or vllm (one vLLM engine per replica; "
                                                      "needs the vLLM environment of `make vllm-env`)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray engine: 'auto' or ray://HOST:10001 "
                                                                  "(default: RAY_ADDRESS, else a local instance)."),
    replicas: int = typer.Option(1, "--replicas", min=1, help="Ray engine: model replicas (actors)."),
    gpus_per_replica: float = typer.Option(0.0, "--gpus-per-replica", min=0.0,
                                           help="Ray engine: GPUs each replica reserves (0: CPU)."),
) -> None:
    """Score a model (each example by its task: EM/F1, ROUGE-1/2/L) with and without the instruction."""
    from deepsynth import storage
    from deepsynth.evaluation.metrics import SUPPORTED_METRICS
    from deepsynth.models.bundle import record_evaluation

    names = tuple(m.strip() for m in metrics.split(",") if m.strip()) if metrics else None
    for name in names or ():
        if name not in SUPPORTED_METRICS + ("rouge",):
            raise typer.BadParameter(f"unknown metric {name!r}; choose from {', '.join(SUPPORTED_METRICS)}, rouge",
                                     param_hint="'--metrics'")
    if decode not in ENGINES:
        raise typer.BadParameter(f"{decode!r}: choose one of {', '.join(ENGINES)}", param_hint="'--decode'")
    if engine != "vllm" and decode != "vllm" and dtype != "auto":
        raise typer.BadParameter("--dtype is for --engine vllm and --engine ray --decode vllm (the local and "
                                 "Ray HF engines use the checkpoint's)", param_hint="'--dtype'")
    if engine != "ray" and decode != "hf":
        raise typer.BadParameter("--decode is for --engine ray (--engine vllm decodes with vLLM in this process)",
                                 param_hint="'--decode'")
    remote_model = storage.is_uri(model)
    if remote_model and engine != "ray":  # Ray replicas copy it on their own nodes
        try:
            model = str(storage.local_input(model, what="model"))
        except (OSError, ValueError) as exc:
            raise typer.BadParameter(f"cannot load model {model!r}: {exc}", param_hint="'--model'") from None
    if engine == "vllm":
        if address is not None or replicas != 1 or gpus_per_replica:
            raise typer.BadParameter("--address, --replicas and --gpus-per-replica are for --engine ray",
                                     param_hint="'--engine'")
        report = _evaluate_with_vllm(data, model, out, names, preset, max_new_tokens, chance, batch_size, dtype)
    elif engine == "ray":
        report = _evaluate_on_ray(data, model, out, names, preset, max_new_tokens, chance, batch_size, address,
                                  replicas, gpus_per_replica, decode, dtype)
    elif engine == "local":
        if address is not None or replicas != 1 or gpus_per_replica:
            raise typer.BadParameter("--address, --replicas and --gpus-per-replica are for --engine ray",
                                     param_hint="'--engine'")
        report = _evaluate_locally(data, model, out, names, preset, max_new_tokens, chance, batch_size)
    else:
        raise typer.BadParameter(f"{engine!r}: choose local, ray or vllm", param_hint="'--engine'")
    summary = {k: report[k] for k in ("n", "metrics", "scores", "scores_no_instruction", "ablation")}
    # a model in object storage is read from a cached copy: its bundle is not rewritten
    if record and not remote_model and Path(model).is_dir():
        record_evaluation(model, data.rstrip("/").rsplit("/", 1)[-1], {"scores": report["scores"],
                                             "scores_no_instruction": report["scores_no_instruction"]})
    typer.echo(json.dumps(summary, indent=2))


def _open_data(data: str, render, default_instruction: str):
    from deepsynth.data.instruction_dataset import open_examples

    try:
        return open_examples(data, render, default_instruction)
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="DATA") from None


def _evaluate_locally(data, model, out, names, preset, max_new_tokens, chance, batch_size) -> dict:
    from deepsynth.evaluation.run import evaluate_with_ablation
    from deepsynth.models.bundle import load_bundle, resolve_generation, resolve_render

    try:
        loaded = load_bundle(model)
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise typer.BadParameter(f"cannot load model {model!r}: {exc}", param_hint="'--model'") from None
    render = resolve_render(loaded.spec, preset)
    dataset = _open_data(data, render, loaded.spec.default_instruction)
    settings = resolve_generation(loaded.model, max_new_tokens=max_new_tokens) if max_new_tokens else None
    return evaluate_with_ablation(loaded.decoder(settings), dataset, render, chance, out_path=out, metrics=names,
                                  batch_size=batch_size)


def _evaluate_with_vllm(data, model, out, names, preset, max_new_tokens, chance, batch_size, dtype) -> dict:
    from deepsynth.evaluation.run import evaluate_with_ablation
    from deepsynth.inference.engines import make_engine

    try:
        engine = make_engine(model, "vllm", dtype=dtype, render_preset=preset)
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise typer.BadParameter(f"cannot load model {model!r}: {exc}", param_hint="'--model'") from None
    try:
        dataset = _open_data(data, engine.render_config, engine.spec.default_instruction)
        settings = engine.settings(None, max_new_tokens=max_new_tokens) if max_new_tokens else None
        return evaluate_with_ablation(engine, dataset, engine.render_config, chance, settings=settings,
                                      out_path=out, metrics=names, batch_size=batch_size)
    finally:
        engine.close()


def _evaluate_on_ray(data, model, out, names, preset, max_new_tokens, chance, batch_size, address, replicas,
                     gpus_per_replica, decode, dtype) -> dict:
    from deepsynth.cluster import ClusterError, RaySettings, require_ray
    from deepsynth.evaluation.ray_inference import ReplicaSettings, bundle_spec, evaluate_on_ray
    from deepsynth.inference.engines import replica_decoder
    from deepsynth.models.bundle import resolve_render

    try:
        require_ray()
        layout = ReplicaSettings(replicas=replicas, num_gpus=gpus_per_replica, batch_size=batch_size)
        ray_settings = RaySettings(address=address)
    except ClusterError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    try:
        decoder = replica_decoder(decode, dtype)
    except ValueError as exc:  # vLLM absent from this environment
        raise typer.BadParameter(str(exc), param_hint="'--decode'") from None
    try:
        spec = bundle_spec(model)
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise typer.BadParameter(f"cannot load model {model!r}: {exc}", param_hint="'--model'") from None
    render = resolve_render(spec, preset)
    dataset = _open_data(data, render, spec.default_instruction)
    return evaluate_on_ray(model, dataset, chance, out, names, max_new_tokens=max_new_tokens, replicas=layout,
                           settings=ray_settings, decoder=decoder)


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_command)
