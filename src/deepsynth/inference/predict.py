"""``deepsynth predict``: plain batch inference, one prediction per example, as the model is served.

    deepsynth predict DATA -m MODEL -o OUT.jsonl [--batch-size N] [--preset P] [--max-new-tokens N]
                      [--engine hf | vllm [--dtype D] | ray [--address A] [--replicas R] [--gpus-per-replica G]
                                                            [--decode vllm --dtype D]]

DATA is what `evaluate` reads (a .jsonl/.json/.parquet file of records or a folder written by
``deepsynth prepare``). OUT gets one JSON line per example, in DATA's order, with the fields of
`evaluate`'s predictions: ``id, instruction, prediction, answer, stopped, new_tokens,
prompt_tokens``. The default engine, ``hf``, is transformers in this process (``local`` is its
deprecated name). With ``--engine ray`` replicas of the model answer on a Ray cluster
(`deepsynth.evaluation.ray_inference`); the lines are the same. With ``--engine vllm`` (from the
vLLM environment) the vLLM engine of ``serve --engine vllm`` answers, in ``--dtype``; with
``--engine ray --decode vllm`` (from the vLLM environment too) each Ray replica holds one.

The command is a thin wrapper over the library's `deepsynth.predict` (`deepsynth.inference.batch`),
which `deepsynth evaluate` shares its options and its model-and-data step with; `batch_options`
turns the flags both commands share into `BatchOptions`.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from typing import Annotated, Optional

import typer

from deepsynth.inference.batch import BatchOptions, predict
from deepsynth.inference.engines import check_dtype

logger = logging.getLogger(__name__)

__all__ = ["batch_options", "predict", "register"]

ENGINE_HELP = ("hf (transformers in this process; 'local' is its deprecated name), vllm (the vLLM engine of "
               "`serve --engine vllm`; needs the vLLM environment of `make vllm-env`) or ray (model replicas as "
               "Ray actors; needs the cluster extra).")
DTYPE_HELP = ("vLLM engine (--engine vllm, or --engine ray --decode vllm): weights' dtype (auto: vLLM's own "
              "choice, what `serve --engine vllm` uses by default; float32: the HF engine's answers).")
DECODE_HELP = ("Ray engine: what each replica decodes with: hf (transformers) or vllm (one vLLM engine per "
               "replica; needs the vLLM environment of `make vllm-env`).")
ADDRESS_HELP = "Ray engine: 'auto' or ray://HOST:10001 (default: RAY_ADDRESS, else a local instance)."

# The flags of `batch_options` but --engine (whose help each command words), declared once for both commands.
PresetFlag = Annotated[Optional[str], typer.Option(help="Render preset override (default: the model's bundle).")]
MaxNewTokensFlag = Annotated[Optional[int], typer.Option(help="Decoding override (default: the model's bundle).")]
BatchSizeFlag = Annotated[int, typer.Option("--batch-size", min=1, help="Examples per generate call.")]
DtypeFlag = Annotated[str, typer.Option(callback=check_dtype, help=DTYPE_HELP)]
DecodeFlag = Annotated[str, typer.Option("--decode", help=DECODE_HELP)]
AddressFlag = Annotated[Optional[str], typer.Option("--address", help=ADDRESS_HELP)]
ReplicasFlag = Annotated[int, typer.Option("--replicas", min=1, help="Ray engine: model replicas (actors).")]
GpusPerReplicaFlag = Annotated[float, typer.Option("--gpus-per-replica", min=0.0,
                                                   help="Ray engine: GPUs each replica reserves (0: CPU).")]


def batch_options(engine: str, dtype: str, batch_size: int, max_new_tokens: int | None, preset: str | None,
                  decode: str, address: str | None, replicas: int, gpus_per_replica: float) -> BatchOptions:
    """The flags `predict` and `evaluate` share, as `BatchOptions`; a combination that does not go
    together is a usage error (exit code 2) naming the flags."""
    from deepsynth.cluster import ClusterError, RaySettings
    from deepsynth.evaluation.ray_inference import ReplicaSettings

    try:
        ray_flags = engine == "ray" or address is not None or replicas != 1 or gpus_per_replica
        return BatchOptions(engine=engine, dtype=dtype, batch_size=batch_size, max_new_tokens=max_new_tokens,
                            preset=preset, decode=decode,
                            replicas=ReplicaSettings(replicas=replicas, num_gpus=gpus_per_replica,
                                                     batch_size=batch_size) if ray_flags else None,
                            ray_settings=RaySettings(address=address) if ray_flags else None)
    except (ClusterError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint="'--engine'") from None


def predict_command(
    data: str = typer.Argument(..., help="Examples (.jsonl/.json/.parquet) or a prepared folder; local or an "
                                         "object-storage URI (s3://..., gs://...)."),
    model: str = typer.Option(..., "--model", "-m", help="Model directory (local or a URI), preset or hub id."),
    out: str = typer.Option(..., "--out", "-o", help="Predictions, one JSON line per example (.jsonl); local or a URI."),
    preset: PresetFlag = None,
    max_new_tokens: MaxNewTokensFlag = None,
    batch_size: BatchSizeFlag = 16,
    engine: str = typer.Option("hf", "--engine", help=ENGINE_HELP),
    dtype: DtypeFlag = "auto",
    decode: DecodeFlag = "hf",
    address: AddressFlag = None,
    replicas: ReplicasFlag = 1,
    gpus_per_replica: GpusPerReplicaFlag = 0.0,
) -> None:
    """Answer every example of DATA with a model; one JSON line per example in OUT."""
    options = batch_options(engine, dtype, batch_size, max_new_tokens, preset, decode, address, replicas,
                            gpus_per_replica)
    # a bad model or data, or a missing Ray / vLLM, is one `error:` line and exit code 1 (deepsynth.cli_errors)
    records = predict(data, model, out, options=options)
    stops = Counter(r["stopped"] for r in records)
    typer.echo(json.dumps({"n": len(records), "out": str(out), "stopped": dict(sorted(stops.items()))}, indent=2))


def register(app: typer.Typer) -> None:
    app.command("predict")(predict_command)
