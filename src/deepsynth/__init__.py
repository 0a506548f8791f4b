"""DeepSynth: teach document vision-language models to follow instructions about rendered pages."""

import logging
import warnings

__version__ = "0.1.0"
__all__ = ["evaluate", "predict", "quiet_known_warnings"]



def __getattr__(name: str):
    """The library's batch entry points (`deepsynth.inference.batch`), imported on first use:
    `import deepsynth` stays light and imports no stage."""
    if name == "evaluate":
        from deepsynth.inference.batch import evaluate

        return evaluate
    if name == "predict":
        from deepsynth.inference.batch import predict

        return predict
    raise AttributeError(f"module 'deepsynth' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"evaluate", "predict"})


def quiet_known_warnings() -> None:
    """Ignore the libraries' warnings about paths DeepSynth takes on purpose, each matched by its
    message, category and emitting module, so that any other warning still shows (tests/test_quiet.py
    runs the commands with warnings as errors). Called on import; calling again re-asserts them
    ahead of filters set since (e.g. `warnings.simplefilter("error")`)."""
    # Soft-prompt models (SoftPromptModel.generate) decode from inputs_embeds, so the ids
    # transformers' n-gram blocking / repetition penalty see are the answer's alone. That is the
    # intent: the guards are against loops in the answer (LoopStop is given a prompt width of 0
    # there too), and the prompt's instruction is no text the answer must avoid repeating.
    warnings.filterwarnings(
        "ignore", message=r"Passing `(no_repeat_ngram_size|repetition_penalty)` with `inputs_embeds`",
        category=UserWarning, module=r"transformers\.generation\.utils")
    # peft's get_peft_model reads the model's `is_gradient_checkpointing`, an alias transformers
    # deprecated in favour of `is_activation_checkpointing`; the value is the same, and nothing of
    # ours reads the alias.
    warnings.filterwarnings(
        "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning,
        module=r"transformers\.modeling_utils")
    # Ray Data's own DataContext() assigns its deprecated fields' defaults in __init__, and its
    # __setattr__ warns on any assignment of them: every Ray Data run warns without our setting one.
    warnings.filterwarnings(
        "ignore", message=r"`(use_push_based_shuffle|use_polars|use_arrow_tensor_v2)` is deprecated",
        category=DeprecationWarning, module=r"ray\.data\.context")
    # Ray announces, as a logged WARNING, that a local instance it starts has token authentication
    # on (Ray's default for a new local instance; the token is written under ~/.ray). The instance deepsynth starts
    # is private to the command, and the announcement asks nothing of the user.
    ray_auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _DropMessage) for f in ray_auth.filters):
        ray_auth.addFilter(_DropMessage("Token authentication is enabled for this Ray cluster."))


class _DropMessage(logging.Filter):
    """Drops the log records whose message starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


quiet_known_warnings()
