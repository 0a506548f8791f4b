"""Engine selection: `make_engine(model, engine="hf" | "vllm", ...)`.

Both engines implement `deepsynth.inference.interface.Engine` and give the same answer fields;
"hf" is `InstructionEngine` (transformers `generate`, the project's environment), "vllm" is
`VLLMEngine` (vLLM's offline engine; needs the vLLM environment made by `make vllm-env`).
"""

from __future__ import annotations

import dataclasses
import functools

ENGINES = ("hf", "vllm")


DTYPES = ("auto", "float32", "bfloat16", "float16")


def check_dtype(value: str) -> str:
    """The commands' --dtype check (a typer callback): `value` if it is one of DTYPES."""
    import typer

    if value not in DTYPES:
        raise typer.BadParameter(f"{value!r}: choose one of {', '.join(DTYPES)}")
    return value


def make_engine(model="tiny-reader", engine: str = "hf", dtype: str = "auto", **kwargs):
    """The engine named `engine` for `model`; keyword arguments go to its constructor (an
    `adapter` is merged by "hf" and served as a LoRA module by "vllm").

    model: a name (preset, alias, hub id, directory, URI) or, for "vllm", the `ModelSource` that
    `deepsynth.models.bundle.resolve_source` gave (resolved once by the caller).

    dtype: the weights' dtype, one of DTYPES. "auto" is each engine's own default: the checkpoint's
    dtype for "hf"; for "vllm" the checkpoint's too, except that vLLM turns float32 into a 16-bit
    type (answers then drift from the HF engine's after a few dozen tokens).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {DTYPES}")
    if engine == "hf":
        import torch

        from deepsynth.inference.engine import InstructionEngine

        return InstructionEngine(model, dtype=None if dtype == "auto" else getattr(torch, dtype), **kwargs)
    if engine == "vllm":
        require_vllm()
        from deepsynth.vllm.engine import VLLMEngine, VLLMOptions

        options = kwargs.pop("options", None) or VLLMOptions()
        if dtype != "auto":
            options = dataclasses.replace(options, dtype=dtype)
        return VLLMEngine(model, options=options, **kwargs)
    raise ValueError(f"engine {engine!r}: choose one of {ENGINES}")


def require_vllm() -> None:
    """ValueError saying how to get vLLM, when this environment has none (checked before a model loads)."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        raise ValueError("engine 'vllm' needs vLLM, which is not installed in this environment: run "
                         "`make vllm-env` and start the command with .venv-vllm/bin/python -m deepsynth.cli "
                         "(or .venv-vllm/bin/deepsynth)") from None


def replica_decoder(engine: str = "hf", dtype: str = "auto"):
    """What each Ray replica of `evaluate/predict --engine ray` decodes with (``--decode``): None
    for "hf" (the replica builds the bundle's own decoder) or, for "vllm", a picklable callable
    ``(model directory, max_new_tokens) -> (decoder, settings)`` that starts one `VLLMEngine` in
    ``dtype``. vLLM is checked here, in the driver: Ray starts the replicas in the driver's
    environment (a remote cluster's nodes need the vLLM environment too)."""
    if engine not in ENGINES:
        raise ValueError(f"decode={engine!r}: choose one of {', '.join(ENGINES)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: choose one of {DTYPES}")
    if engine == "hf":
        if dtype != "auto":
            raise ValueError(f"dtype={dtype!r} is for the vLLM engine (the HF replicas use the checkpoint's)")
        return None
    require_vllm()
    return functools.partial(_vllm_replica, dtype=dtype)


def _vllm_replica(model: str, max_new_tokens: int | None, *, dtype: str):
    engine = make_engine(model, "vllm", dtype=dtype)
    # the same settings `evaluate/predict --engine vllm` decode with
    return engine, engine.settings(None, max_new_tokens=max_new_tokens) if max_new_tokens else None
