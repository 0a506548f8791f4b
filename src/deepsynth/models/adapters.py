"""Loading peft LoRA adapters by name (part of the one loader, `deepsynth.models.bundle`)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from torch import nn

_ADAPTER_WEIGHT = re.compile(r"\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)(?=\.|$)")


def load_adapters(model: nn.Module, adapter_dir: str | os.PathLike, adapter_name: str = "default",
                  is_trainable: bool = False) -> nn.Module:
    """`model` with the LoRA adapters saved by peft's `save_pretrained` in `adapter_dir` (a PeftModel).

    Same result as `PeftModel.from_pretrained`, which on transformers 5 drops every adapter weight of
    a DeepSeek-OCR-2 model: peft runs the adapter keys through transformers' checkpoint-conversion
    renames, and the deepseek_ocr2 rename `(^|model\\.)layers\\.` -> `language_model.layers.` also
    matches the already-converted `language_model.layers.` (the keys become
    `language_model.language_model.layers...`, all missing, the adapters stay at their initial
    values). Here the adapters are built from adapter_config.json and the saved tensors are loaded
    by name; a missing or unexpected adapter tensor is an error.
    """
    from peft import PeftConfig, PeftModel
    from safetensors.torch import load_file

    directory = Path(adapter_dir)
    weights = directory / "adapter_model.safetensors"
    if not (directory / "adapter_config.json").is_file() or not weights.is_file():
        raise FileNotFoundError(f"{directory} is not a peft adapter directory (needs adapter_config.json and "
                                "adapter_model.safetensors)")
    config = PeftConfig.from_pretrained(str(directory))
    config.inference_mode = not is_trainable
    wrapped = PeftModel(model, config, adapter_name=adapter_name)
    saved = {_ADAPTER_WEIGHT.sub(lambda m: f".{m.group(1)}.{adapter_name}", key): value
             for key, value in load_file(str(weights)).items()}
    expected = {n for n, _ in wrapped.named_parameters() if f".{adapter_name}." in n and "lora_" in n}
    missing, unexpected = sorted(expected - set(saved)), sorted(set(saved) - expected)
    if missing or unexpected:
        raise ValueError(f"{directory}: adapter tensors do not match the model ({len(missing)} missing, e.g. "
                         f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}); was it saved "
                         "from this architecture with the same LoRA targets?")
    wrapped.load_state_dict(saved, strict=False)
    if is_trainable:
        for name, param in wrapped.named_parameters():
            param.requires_grad_(name in expected)
    return wrapped
