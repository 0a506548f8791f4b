"""Batch answers of a model on a data set, as the library's `predict` and `evaluate`.

    from deepsynth import evaluate, predict

    records = predict("dev.jsonl", "runs/qa/final", "preds.jsonl", batch_size=8)
    report = evaluate("dev.jsonl", "runs/qa/final", engine="vllm", dtype="float32")

Both take one `BatchOptions` (or its fields as keywords) and open the model and the data through
one step, `open_run`: the model is resolved once (`deepsynth.models.bundle.resolve_source`: its
spec says which pages and instruction to use), the data are opened with those pages
(`open_examples`) before any weights load, and then the engine is started: ``hf`` (transformers
in this process), ``vllm`` (the vLLM engine of ``serve --engine vllm``, in this process) or
``ray`` (model replicas as Ray actors, `deepsynth.evaluation.ray_inference`). Every engine answers
the same batches of ``batch_size`` examples, each batch drawn once for all the passes
(`decode_dataset`), so `evaluate`'s two passes (with and without the instruction) render each page
once. The commands ``deepsynth predict`` (`deepsynth.inference.predict`) and ``deepsynth evaluate``
(`deepsynth.evaluation.cli`) are thin wrappers over these functions.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from deepsynth import storage
from deepsynth.cluster import RaySettings
from deepsynth.inference.engines import DTYPES, ENGINES

logger = logging.getLogger(__name__)

__all__ = ["BATCH_ENGINES", "BatchOptions", "Run", "evaluate", "metric_names", "open_run", "predict"]

#: Who answers a batch job: the two engines of `make_engine` in this process, or replicas on Ray.
BATCH_ENGINES = ("hf", "vllm", "ray")
#: Earlier names of engines, accepted with a FutureWarning (`predict`/`evaluate --engine local`).
DEPRECATED_ENGINES = {"local": "hf"}


@dataclass
class BatchOptions:
    """How `predict` and `evaluate` open a model and answer (the commands' flags, one field each)."""

    # Who answers: "hf" (transformers, this process), "vllm" (the vLLM engine, this process; needs
    # the vLLM environment of `make vllm-env`) or "ray" (model replicas as Ray actors). "local" is
    # the deprecated name of "hf".
    engine: str = "hf"
    # Weights' dtype of a vLLM engine (engine "vllm", or "ray" with decode "vllm"), one of DTYPES;
    # "auto" is vLLM's own choice. The HF engine always uses the checkpoint's.
    dtype: str = "auto"
    # Examples per `generate` call; every engine answers the same batches, so the same answers.
    batch_size: int = 16
    # Most new tokens per answer (None: the bundle's decoding default; a different value warns).
    max_new_tokens: int | None = None
    # Render preset of the pages drawn from text (None: the bundle's; a different one warns).
    preset: str | None = None
    # Ray engine: what each replica decodes with, "hf" or "vllm".
    decode: str = "hf"
    # Ray engine: the replicas' layout (`ReplicaSettings`; None: one CPU replica); its batch size
    # is `batch_size`.
    replicas: Any = None
    # Ray engine: which Ray instance (None: RAY_ADDRESS, else a local one for the command).
    ray_settings: RaySettings | None = None

    def __post_init__(self) -> None:
        if self.engine in DEPRECATED_ENGINES:
            new = DEPRECATED_ENGINES[self.engine]
            warnings.warn(f"engine {self.engine!r} is the old name of {new!r} (transformers in this process); "
                          f"use {new!r}", FutureWarning, stacklevel=3)
            self.engine = new
        if self.engine not in BATCH_ENGINES:
            raise ValueError(f"engine {self.engine!r}: choose one of {', '.join(BATCH_ENGINES)}")
        if self.decode not in ENGINES:
            raise ValueError(f"decode {self.decode!r}: choose one of {', '.join(ENGINES)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r}: must be an integer >= 1")
        if self.max_new_tokens is not None and (not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r}: must be an integer >= 1 (or None: the "
                             "model's default)")
        if self.engine != "ray" and (self.decode != "hf" or self.replicas is not None or self.ray_settings is not None):
            raise ValueError("--decode, --replicas, --gpus-per-replica and --address (decode, replicas, "
                             f"ray_settings) are for --engine ray, not {self.engine!r}")
        if self.dtype != "auto" and not self.uses_vllm:
            raise ValueError("--dtype is for --engine vllm and --engine ray --decode vllm (the HF engine, in this "
                             "process or on Ray, uses the checkpoint's)")

    @property
    def uses_vllm(self) -> bool:
        """Whether a vLLM engine answers (here or in each Ray replica)."""
        return self.engine == "vllm" or (self.engine == "ray" and self.decode == "vllm")


def _options(options: BatchOptions | None, changes: dict) -> BatchOptions:
    known = {f.name for f in fields(BatchOptions)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown}: BatchOptions has {sorted(known)}")
    if options is None:
        return BatchOptions(**changes)
    return dataclasses.replace(options, **changes) if changes else options


@dataclass
class Run:
    """A model opened for batch answers and the data it answers (`open_run`)."""

    # The model as resolved (spec read once, backend, where the weights are).
    source: Any
    # The examples, with the pages the model reads (`open_examples`).
    dataset: Any
    # The options it was opened with.
    options: BatchOptions
    # The model name as given: what Ray replicas load (a URI is copied on each replica's node).
    model: str
    # What answers in this process: the bundle's `Decoder` (hf) or a `VLLMEngine` (vllm); None on Ray.
    decoder: Any = None
    # Decoding settings of the vLLM engine (None: its defaults; the HF decoder holds its own).
    settings: Any = None
    # Ray: what each replica decodes with (`replica_decoder`: None is the bundle's HF decoder).
    replica_decoder: Any = None

    def answer(self, instructions: Sequence[str | None] = (None,)) -> list[list[dict]]:
        """Prediction records of every example, once per entry of `instructions` (None: each
        example's own; "": none, the ablation), one list per entry in the data's order."""
        options = self.options
        if options.engine == "ray":
            from deepsynth.evaluation.ray_inference import ReplicaSettings, decode_on_ray

            layout = dataclasses.replace(options.replicas or ReplicaSettings(), batch_size=options.batch_size)
            return decode_on_ray(self.model, self.dataset, tuple(instructions), max_new_tokens=options.max_new_tokens,
                                 replicas=layout, settings=options.ray_settings, decoder=self.replica_decoder)
        from deepsynth.training.validation import decode_dataset

        return decode_dataset(self.decoder, self.dataset, tuple(instructions), self.settings, options.batch_size)


@contextlib.contextmanager
def open_run(data: str | os.PathLike, model: str | os.PathLike, options: BatchOptions | None = None) -> Iterator[Run]:
    """Open `model` and `data` for `options` (the one step of `predict` and `evaluate`).

    Order, so that bad input fails before any weights load: the engine's environment (Ray, vLLM),
    the model's name (`resolve_source`: a bad name is "cannot load model ..."), the data, opened
    with the bundle's pages and default instruction (or `options.preset`), then the engine. The
    vLLM engine is closed on leaving."""
    from deepsynth.data.instruction_dataset import open_examples
    from deepsynth.inference.engines import make_engine, replica_decoder, require_vllm
    from deepsynth.models.bundle import load_bundle, resolve_generation, resolve_render, resolve_source

    options = options or BatchOptions()
    model = str(model)
    replica = None
    if options.engine == "ray":
        from deepsynth.cluster import require_ray

        require_ray()
        replica = replica_decoder(options.decode, options.dtype)
    elif options.engine == "vllm":
        require_vllm()
    try:
        source = resolve_source(model)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot load model {model!r}: {exc}") from exc
    render = resolve_render(source.spec, options.preset)
    dataset = open_examples(data, render, source.spec.default_instruction)
    run = Run(source, dataset, options, model, replica_decoder=replica)
    if options.engine == "ray":
        yield run
        return
    if options.engine == "vllm":
        # the source resolved above: the engine resolves nothing again (a URI's local copy, the spec
        # the data were opened with)
        served = make_engine(source, "vllm", dtype=options.dtype)
        try:
            run.decoder = served
            if options.max_new_tokens is not None:
                run.settings = served.settings(None, max_new_tokens=options.max_new_tokens)
            yield run
        finally:
            served.close()
        return
    loaded = load_bundle(source)
    settings = (resolve_generation(loaded.model, max_new_tokens=options.max_new_tokens)
                if options.max_new_tokens is not None else None)
    run.decoder = loaded.decoder(settings)
    yield run


def predict(data: str | os.PathLike, model: str | os.PathLike, out: str | os.PathLike | None = None, *,
            options: BatchOptions | None = None, **option_fields) -> list[dict]:
    """Answer every example of `data` with `model` (its bundle's pages, prompt and decoding;
    `preset` / `max_new_tokens` override them with a warning). Returns one prediction record per
    example, in `data`'s order: ``id, instruction, prediction, answer, stopped, new_tokens,
    prompt_tokens, task``; writes them as JSON lines to `out` when given (atomically; a local path
    or an object-storage URI).

    data:    a .jsonl/.json/.parquet file of records or a folder written by `deepsynth prepare`.
    model:   a preset, alias, shipped reader, hub id, model directory or object-storage URI.
    options: a `BatchOptions`; its fields may also be given as keywords (engine="vllm",
             batch_size=8, ...), which replace those of `options`.
    """
    from deepsynth.data.metrics import attach_tasks

    options = _options(options, option_fields)
    with open_run(data, model, options) as run:
        records = run.answer((None,))[0]
        attach_tasks(records, run.dataset.examples)  # the task each is scored as, as in evaluate's records
    if out is not None:
        storage.write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return records


def evaluate(data: str | os.PathLike, model: str | os.PathLike, out: str | os.PathLike | None = None, *,
             options: BatchOptions | None = None, metrics: str | Sequence[str] | None = None, chance: float = 0.0,
             ablation: bool = True, record: bool = True, **option_fields) -> dict:
    """Score `model` on `data` with and without the instruction (the ablation), as it is served.

    Returns the report ``deepsynth evaluate`` writes (and writes it to `out` when given): ``n``,
    ``metrics``, ``scores`` (each example by its task: EM/F1, ROUGE-1/2/L, per task in
    ``by_task``), ``scores_no_instruction``, ``ablation`` (the drop against `chance`),
    ``predictions`` and ``predictions_no_instruction``.

    ablation: also answer every example without its instruction (a model that reads the
             instruction must fall towards `chance`); False answers once, and the report's three
             fields of that run are None.

    metrics: names (or one comma-separated string) of metrics for every example (em, f1, rouge1,
             rouge2, rougeL, rougeLsum, rouge); None scores each example by its task.
    record:  add the scores to the model folder's deepsynth.json (a local folder with a bundle
             only; the entry is named after the data's file or folder).
    options, option_fields: as in `predict`.
    """
    from deepsynth.evaluation.run import ablation_report, scored
    from deepsynth.models.bundle import record_evaluation

    options = _options(options, option_fields)
    names = metric_names(metrics)
    with open_run(data, model, options) as run:
        answered = run.answer((None, "") if ablation else (None,))
    examples = run.dataset.examples
    ablated = scored(answered[1], examples, names) if ablation else None
    report = ablation_report(scored(answered[0], examples, names), ablated, chance, out)
    folder = str(model)
    # a model in object storage is read from a cached copy: its bundle is not rewritten
    if record and not storage.is_uri(folder) and Path(folder).is_dir():
        record_evaluation(folder, str(data).rstrip("/").rsplit("/", 1)[-1],
                          {"scores": report["scores"], "scores_no_instruction": report["scores_no_instruction"]},
                          spec=run.source.spec if run.source.has_bundle else None)
    return report


def metric_names(metrics: str | Sequence[str] | None) -> tuple[str, ...] | None:
    """`evaluate`'s metrics as a tuple of checked names (None: each example by its task)."""
    from deepsynth.data.metrics import SUPPORTED_METRICS

    if metrics is None:
        return None
    names = tuple(m.strip() for m in (metrics.split(",") if isinstance(metrics, str) else metrics) if m.strip())
    for name in names:
        if name not in SUPPORTED_METRICS + ("rouge",):
            raise ValueError(f"unknown metric {name!r}; choose from {', '.join(SUPPORTED_METRICS)}, rouge")
    return names or None
