"""Engine selection: `make_engine(model, engine="hf" | "vllm", ...)`.

Both engines implement `deepsynth.inference.interface.Engine` and give the same answer fields;
"hf" is `InstructionEngine` (transformers `generate`, the project's environment), "vllm" is
`VLLMEngine` (vLLM's offline engine; needs the vLLM environment made by `make vllm-env`).
"""

from __future__ import annotations

ENGINES = ("hf", "vllm")


def make_engine(model: str = "tiny-reader", engine: str = "hf", **kwargs):
    """The engine named `engine` for `model`; keyword arguments go to its constructor (an
    `adapter` is merged by "hf" and served as a LoRA module by "vllm")."""
    if engine == "hf":
        from deepsynth.inference.engine import InstructionEngine

        return InstructionEngine(model, **kwargs)
    if engine == "vllm":
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise ValueError("engine 'vllm' needs vLLM, which is not installed in this environment: run "
                             "`make vllm-env` and start the command with .venv-vllm/bin/python -m deepsynth.cli "
                             "(or .venv-vllm/bin/deepsynth)") from None
        from deepsynth.inference.vllm_engine import VLLMEngine

        return VLLMEngine(model, **kwargs)
    raise ValueError(f"engine {engine!r}: choose one of {ENGINES}")
