"""``deepsynth predict``: plain batch inference, one prediction per example, as the model is served.

    deepsynth predict DATA -m MODEL -o OUT.jsonl [--batch-size N] [--preset P] [--max-new-tokens N]
                      [--engine ray [--address A] [--replicas R] [--gpus-per-replica G]
                                    [--decode vllm --dtype D]]
                      [--engine vllm [--dtype D]]

DATA is what `evaluate` reads (a .jsonl/.json/.parquet file of records or a folder written by
``deepsynth prepare``). OUT gets one JSON line per example, in DATA's order, with the fields of
`evaluate`'s predictions: ``id, instruction, prediction, answer, stopped, new_tokens,
prompt_tokens``. With ``--engine ray`` replicas of the model answer on a Ray cluster
(`deepsynth.evaluation.ray_inference`); the lines are the same. With ``--engine vllm`` (from the
vLLM environment) the vLLM engine of ``serve --engine vllm`` answers, in ``--dtype``; with
``--engine ray --decode vllm`` (from the vLLM environment too) each Ray replica holds one.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from typing import Optional

import typer

from deepsynth import storage
from deepsynth.cluster import ClusterError, RaySettings, check_engine, require_ray
from deepsynth.inference.engines import ENGINES, check_dtype

logger = logging.getLogger(__name__)

__all__ = ["predict", "register"]


def predict(data: str | os.PathLike, model: str, out: str | os.PathLike | None = None, *,
            preset: str | None = None, max_new_tokens: int | None = None, batch_size: int = 16,
            engine: str = "local", replicas=None, ray_settings: RaySettings | None = None,
            dtype: str = "auto", decode: str = "hf") -> list[dict]:
    """Answer every example of ``data`` with ``model`` (its bundle's pages, prompt and decoding;
    ``preset`` / ``max_new_tokens`` override them with a warning). Returns the prediction records
    and writes them as JSON lines to ``out`` when given (atomically: the file appears whole).

    engine: ``local`` (this process, ``batch_size`` examples per `generate` call), ``ray``
            (``replicas``: a `ReplicaSettings`; ``ray_settings``: which Ray instance; ``decode``:
            the engine each replica decodes with, "hf" or "vllm" in ``dtype``) or ``vllm`` (the
            vLLM engine, weights in ``dtype``; see `deepsynth.inference.engines.make_engine`)."""
    from deepsynth.data.instruction_dataset import open_examples
    from deepsynth.models.bundle import resolve_render

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: must be >= 1")
    if engine not in ("local", "ray", "vllm"):
        raise ValueError(f"engine={engine!r}: choose one of local, ray, vllm")
    if engine != "ray" and decode != "hf":
        raise ValueError(f"decode={decode!r} is for engine 'ray' (engine 'vllm' decodes with vLLM in this process)")
    if storage.is_uri(model) and engine != "ray":  # Ray replicas copy it on their own nodes
        model = str(storage.local_input(model, what="model"))
    if engine == "vllm":
        from deepsynth.inference.engines import make_engine

        served = make_engine(model, "vllm", dtype=dtype, render_preset=preset)
        try:
            settings = served.settings(None, max_new_tokens=max_new_tokens) if max_new_tokens else None
            dataset = open_examples(data, served.render_config, served.spec.default_instruction)
            records = _decode(served, dataset, settings, batch_size)
        finally:
            served.close()
    elif check_engine(engine) == "ray":
        from dataclasses import replace

        from deepsynth.evaluation.ray_inference import ReplicaSettings, bundle_spec, decode_on_ray
        from deepsynth.inference.engines import replica_decoder

        require_ray()
        decoder = replica_decoder(decode, dtype)
        spec = bundle_spec(model)
        render = resolve_render(spec, preset)
        dataset = open_examples(data, render, spec.default_instruction)
        layout = replace(replicas or ReplicaSettings(), batch_size=batch_size)
        records = decode_on_ray(model, dataset, (None,), max_new_tokens=max_new_tokens, replicas=layout,
                                settings=ray_settings, decoder=decoder)[0]
    else:
        from deepsynth.models.bundle import load_bundle, resolve_generation

        loaded = load_bundle(model)
        render = resolve_render(loaded.spec, preset)
        dataset = open_examples(data, render, loaded.spec.default_instruction)
        settings = resolve_generation(loaded.model, max_new_tokens=max_new_tokens) if max_new_tokens else None
        records = _decode(loaded.decoder(settings), dataset, None, batch_size)
    from deepsynth.evaluation.run import attach_tasks

    attach_tasks(records, dataset.examples)  # the task each is scored as, as in evaluate's records
    if out is not None:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        storage.write_text(out, lines)  # atomic on disk; one whole object on object storage
    return records


def _decode(decoder, dataset, settings, batch_size: int) -> list[dict]:
    """Prediction records of a dataset; one batch of pages in memory at a time (`evaluate`'s batches)."""
    from deepsynth.evaluation.run import decode_items

    records = []
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(len(dataset), start + batch_size))]
        records += decode_items(decoder, items, settings, None, batch_size)
    return records


def predict_command(
    data: str = typer.Argument(..., help="Examples (.jsonl/.json/.parquet) or a prepared folder; local or an "
                                         "object-storage URI (s3://..., gs://...)."),
    model: str = typer.Option(..., "--model", "-m", help="Model directory (local or a URI), preset or hub id."),
    out: str = typer.Option(..., "--out", "-o", help="Predictions, one JSON line per example (.jsonl); local or a URI."),
    preset: Optional[str] = typer.Option(None, help="Render preset override (default: the model's bundle)."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Decoding override (default: the model's bundle)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Examples per generate call."),
    engine: str = typer.Option("local", "--engine", help="local (this process), ray (model replicas as Ray "
                                                         "actors; needs the cluster extra) or vllm (needs the "
                                                         "vLLM environment of `make vllm-env`)."),
    dtype: str = typer.Option("auto", callback=check_dtype,
                              help="vLLM engine (--engine vllm, or --engine ray --decode vllm): weights' dtype "
                                   "(auto: vLLM's own choice; float32: the local engine's answers)."),
    decode: str = typer.Option("hf", "--decode", help="Ray engine: what each replica decodes with: hf "
                                                      "(transformers) or vllm (one vLLM engine per replica; "
                                                      "needs the vLLM environment of `make vllm-env`)."),
    address: Optional[str] = typer.Option(None, "--address", help="Ray engine: 'auto' or ray://HOST:10001 "
                                                                  "(default: RAY_ADDRESS, else a local instance)."),
    replicas: int = typer.Option(1, "--replicas", min=1, help="Ray engine: model replicas (actors)."),
    gpus_per_replica: float = typer.Option(0.0, "--gpus-per-replica", min=0.0,
                                           help="Ray engine: GPUs each replica reserves (0: CPU)."),
) -> None:
    """Answer every example of DATA with a model; one JSON line per example in OUT."""
    from deepsynth.data.pipeline import PrepareError

    if decode not in ENGINES:
        raise typer.BadParameter(f"{decode!r}: choose one of {', '.join(ENGINES)}", param_hint="'--decode'")
    if engine != "vllm" and decode != "vllm" and dtype != "auto":
        raise typer.BadParameter("--dtype is for --engine vllm and --engine ray --decode vllm (the local and "
                                 "Ray HF engines use the checkpoint's)", param_hint="'--dtype'")
    if engine != "ray" and (address is not None or replicas != 1 or gpus_per_replica or decode != "hf"):
        raise typer.BadParameter("--address, --replicas, --gpus-per-replica and --decode are for --engine ray",
                                 param_hint="'--engine'")
    try:
        layout = None
        if engine == "ray":
            from deepsynth.evaluation.ray_inference import ReplicaSettings

            layout = ReplicaSettings(replicas=replicas, num_gpus=gpus_per_replica, batch_size=batch_size)
        records = predict(data, model, out, preset=preset, max_new_tokens=max_new_tokens, batch_size=batch_size,
                          engine=engine, replicas=layout, dtype=dtype, decode=decode,
                          ray_settings=RaySettings(address=address) if engine == "ray" else None)
    except (ClusterError, PrepareError, OSError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=1) from None
    stops = Counter(r["stopped"] for r in records)
    typer.echo(json.dumps({"n": len(records), "out": str(out), "stopped": dict(sorted(stops.items()))}, indent=2))


def register(app: typer.Typer) -> None:
    app.command("predict")(predict_command)
