"""Batched answer generation shared by evaluation, training-time eval and the inference engine."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

from deepsynth.models.collate import Collator


@dataclass
class GenerationSettings:
    """Decoding settings with guards against generation loops.

    max_new_tokens:        hard cap on answer length.
    do_sample/temperature/top_p: greedy by default; sampling when do_sample is True.
    repetition_penalty:    >1 discourages repeating tokens (1.0 = off).
    no_repeat_ngram_size:  forbids any n-gram from repeating (0 = off); the usual cure for pages
                           of repeated text.
    """

    max_new_tokens: int = 64
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= 8192:
            raise ValueError(f"max_new_tokens must be in [1, 8192], got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def kwargs(self) -> dict:
        out = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, **self.extra}
        if self.do_sample:
            out.update(temperature=self.temperature, top_p=self.top_p)
        if self.repetition_penalty != 1.0:
            out["repetition_penalty"] = self.repetition_penalty
        if self.no_repeat_ngram_size:
            out["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        return out


def generate_answers(
    model,
    collator: Collator,
    pages: Sequence[Sequence[Image.Image]],
    instructions: Sequence[str],
    settings: GenerationSettings | None = None,
    batch_size: int = 16,
) -> list[str]:
    """Answer each (pages, instruction) pair; returns decoded answers without special tokens."""
    return [r["answer"] for r in generate_with_stats(model, collator, pages, instructions, settings, batch_size)]


@torch.no_grad()
def generate_with_stats(
    model,
    collator: Collator,
    pages: Sequence[Sequence[Image.Image]],
    instructions: Sequence[str],
    settings: GenerationSettings | None = None,
    batch_size: int = 16,
) -> list[dict]:
    """Like `generate_answers`, with per-example counts: {"answer", "prompt_tokens",
    "visual_tokens", "new_tokens", "stopped"} where stopped is "eos" or "max_new_tokens"."""
    settings = settings or GenerationSettings()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tok = collator.tokenizer
    image_id = model.config.image_token_id
    results: list[dict] = []
    for i in range(0, len(pages), batch_size):
        batch = collator.prompt_batch(pages[i:i + batch_size], instructions[i:i + batch_size])
        batch = {k: v.to(device) for k, v in batch.items()}
        out = model.generate(**batch, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, **settings.kwargs())
        new = out[:, batch["input_ids"].shape[1]:]
        for row, ids, mask in zip(new, batch["input_ids"], batch["attention_mask"]):
            ended = (row == tok.eos_token_id).nonzero()
            n_new = int(ended[0]) if len(ended) else int((row != tok.pad_token_id).sum())
            results.append({
                "answer": tok.decode(row, skip_special_tokens=True).strip(),
                "prompt_tokens": int(mask.sum()),
                "visual_tokens": int((ids[mask.bool()] == image_id).sum()),
                "new_tokens": n_new,
                "stopped": "eos" if len(ended) else "max_new_tokens",
            })
    if was_training:
        model.train()
    return results
