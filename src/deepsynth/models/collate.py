"""Prompt building and collation: pages + instruction (+ answer) -> model inputs.

Layout of one example (the native instruction channel, DESIGN.md):
    <image tokens of page 1> ... <image tokens of page n> "\\n" instruction "\\n" | answer <eos>
The processor owns image preprocessing and the number of image tokens per page; this module only
places the text around them and masks the labels so that the loss falls on answer + EOS alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

IGNORE_INDEX = -100


def build_prompt(num_pages: int, instruction: str, image_token: str = "<image>") -> str:
    """Text of the prompt for `num_pages` pages and an instruction (processor expands each image token)."""
    if num_pages < 1:
        raise ValueError(f"an example needs at least one page, got {num_pages}")
    return image_token * num_pages + "\n" + instruction + "\n"


@dataclass
class Collator:
    """Turns (pages, instruction, answer) triples into a padded training batch.

    processor:   the model's processor (image preprocessing + tokenizer + image-token expansion).
    max_length:  longest sequence allowed; a longer example raises an error naming it rather than
                 being truncated, because cutting would drop answer tokens or image tokens.
    """

    processor: object
    max_length: int = 1024

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def encode_prompts(self, pages: Sequence[Sequence[Image.Image]], instructions: Sequence[str]) -> dict:
        """Processor call for prompts only: token ids (unpadded lists) and pixel values for all pages."""
        prompts = [build_prompt(len(p), ins, self.processor.image_token) for p, ins in zip(pages, instructions)]
        flat = [img for doc in pages for img in doc]
        enc = self.processor(images=flat, text=prompts, return_tensors="pt", padding=True)
        # Unpad the ids so that answers can be appended before the batch is padded again.
        ids = [row[mask.bool()].tolist() for row, mask in zip(enc["input_ids"], enc["attention_mask"])]
        return {"input_ids": ids, "pixel_values": enc["pixel_values"]}

    def __call__(self, batch: Sequence[dict]) -> dict:
        """batch items: {"pages": [PIL images], "instruction": str, "answer": str, "id": str (optional)}."""
        enc = self.encode_prompts([b["pages"] for b in batch], [b["instruction"] for b in batch])
        eos = self.tokenizer.eos_token_id
        ids, labels = [], []
        for item, prompt_ids in zip(batch, enc["input_ids"]):
            answer_ids = self.tokenizer(item["answer"], add_special_tokens=False)["input_ids"] + [eos]
            total = len(prompt_ids) + len(answer_ids)
            if total > self.max_length:
                raise ValueError(
                    f"example {item.get('id', '?')!r} needs {total} tokens "
                    f"({len(prompt_ids)} prompt incl. image tokens + {len(answer_ids)} answer) "
                    f"but max_length is {self.max_length}; raise max_length or shorten the answer"
                )
            ids.append(prompt_ids + answer_ids)
            labels.append([IGNORE_INDEX] * len(prompt_ids) + answer_ids)
        return {**pad_right(ids, labels, self.tokenizer.pad_token_id), "pixel_values": enc["pixel_values"]}

    def prompt_batch(self, pages: Sequence[Sequence[Image.Image]], instructions: Sequence[str]) -> dict:
        """Left-padded prompts for generation (new tokens are appended on the right)."""
        enc = self.encode_prompts(pages, instructions)
        width = max(len(x) for x in enc["input_ids"])
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in enc["input_ids"]])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in enc["input_ids"]])
        return {"input_ids": input_ids, "attention_mask": mask, "pixel_values": enc["pixel_values"]}


def pad_right(ids: list[list[int]], labels: list[list[int]], pad_id: int) -> dict:
    width = max(len(x) for x in ids)
    return {
        "input_ids": torch.tensor([x + [pad_id] * (width - len(x)) for x in ids]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
        "labels": torch.tensor([y + [IGNORE_INDEX] * (width - len(y)) for y in labels]),
    }
