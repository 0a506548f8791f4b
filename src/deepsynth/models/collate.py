"""Prompt building and collation: pages + instruction (+ answer) -> model inputs.

Layout of one example (the native instruction channel, docs/architecture.md), "plain":
    <bos> <image tokens of page 1> ... <image tokens of page n> "\\n" instruction | answer <eos>
token for token what DeepSeek-OCR's and DeepSeek-OCR-2's own code feeds their models (their "plain"
conversation template: the text split on `<image>`, each piece encoded without special tokens, the
BOS id put in front by the code, not by the tokenizer). "raw" is the layout this project used first
(`<image>...\\n{instruction}\\n`, BOS only where the tokenizer adds one); models trained on it (the
shipped tiny reader) keep it through their bundle. Chat VLMs (Qwen2-VL, Idefics3, ...) get their
processor's chat template instead (a user turn with the pages and the instruction, then the
assistant header). `default_prompt_builder` chooses per processor where no bundle says.
The processor owns image preprocessing and the number of image tokens per page; this module only
places the text around them and masks the labels so that the loss falls on answer + EOS alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image

IGNORE_INDEX = -100


def build_prompt(num_pages: int, instruction: str, image_token: str = "<image>") -> str:
    """Text of a raw-layout prompt for `num_pages` pages and an instruction (processor expands each
    image token)."""
    if num_pages < 1:
        raise ValueError(f"an example needs at least one page, got {num_pages}")
    return image_token * num_pages + "\n" + instruction + "\n"


def build_plain_prompt(num_pages: int, instruction: str, image_token: str = "<image>") -> str:
    """Text of a plain-layout prompt (the BOS id is not text: `PromptBuilder.encode` puts it in front).
    No newline after the instruction: in DeepSeek's plain template the answer follows it directly,
    and with byte-level BPE a trailing "\\n" could also merge into the instruction's last token."""
    if num_pages < 1:
        raise ValueError(f"an example needs at least one page, got {num_pages}")
    return image_token * num_pages + "\n" + instruction


@dataclass(frozen=True)
class PromptBuilder:
    """How one backend family turns (pages, instruction) into prompt text, and which processor
    outputs reach the model.

    text:          (processor, num_pages, instruction) -> prompt text with one image placeholder per
                   page (the processor expands each placeholder into that page's image tokens).
    pass_through:  False: the batch keeps `pixel_values` only (DeepSeek-OCR). True: every other
                   processor output goes to the model too: per-token ones (`mm_token_type_ids`,
                   shaped like `input_ids`) are padded with the ids (0 on answer and padding
                   positions), the rest (`image_grid_thw`, `pixel_attention_mask`) as they are.
    bos:           True: the prompt starts with the tokenizer's BOS id, put there by `encode` (the
                   text is tokenized without special tokens), so there is exactly one whether or not
                   the tokenizer adds it by itself. False: the tokenizer's own special tokens.
    page_text:     (num_pages, instruction, image token string) -> text, for layouts whose text is
                   fixed around the pages (raw, plain): lets the decoder put pre-computed page
                   features in place of the pages (`Decoder.encodes_pages`). None for templates.
    """

    name: str
    text: Callable[[object, int, str], str]
    pass_through: bool = False
    bos: bool = False
    page_text: Callable[[int, str, str], str] | None = None

    def __call__(self, processor, num_pages: int, instruction: str) -> str:
        return self.text(processor, num_pages, instruction)

    def tokenizer_kwargs(self) -> dict:
        """Keyword arguments for the tokenizer (or processor) call on this layout's text."""
        return {"add_special_tokens": False} if self.bos else {}

    def with_bos(self, tokenizer, ids: list[int]) -> list[int]:
        """`ids` (tokenized with `tokenizer_kwargs`) with this layout's BOS in front."""
        if not self.bos:
            return list(ids)
        bos = tokenizer.bos_token_id
        if bos is None:
            raise ValueError(f"the {self.name!r} prompt layout starts with a BOS token, but the tokenizer "
                             f"({type(tokenizer).__name__}) has no bos_token; set one or use another layout")
        if bos == tokenizer.pad_token_id:
            # padding and the text-encoder placeholders are found by the pad id
            raise ValueError(f"the {self.name!r} prompt layout needs a BOS token distinct from the pad token "
                             f"(both are id {bos}); give the tokenizer its own bos_token")
        return [bos, *ids]

    def encode(self, tokenizer, text: str) -> list[int]:
        """Token ids of a prompt text of this layout (image placeholders as the text has them)."""
        return self.with_bos(tokenizer, tokenizer(text, **self.tokenizer_kwargs())["input_ids"])


def _raw_text(processor, num_pages: int, instruction: str) -> str:
    return build_prompt(num_pages, instruction, processor.image_token)


def _plain_text(processor, num_pages: int, instruction: str) -> str:
    return build_plain_prompt(num_pages, instruction, processor.image_token)


def chat_messages(num_pages: int, instruction: str) -> list[dict]:
    """One user turn: the pages as images, then the instruction."""
    if num_pages < 1:
        raise ValueError(f"an example needs at least one page, got {num_pages}")
    return [{"role": "user", "content": [{"type": "image"}] * num_pages + [{"type": "text", "text": instruction}]}]


def _chat_text(processor, num_pages: int, instruction: str) -> str:
    return processor.apply_chat_template(chat_messages(num_pages, instruction), tokenize=False,
                                         add_generation_prompt=True)


# BOS + `<image>...\n{instruction}`: DeepSeek-OCR's and DeepSeek-OCR-2's own prompt (their "plain"
# template); the default of DeepSeek checkpoints and presets without a bundle.
PLAIN_PROMPT = PromptBuilder("plain", _plain_text, bos=True, page_text=build_plain_prompt)
# `<image>...\n{instruction}\n` with the tokenizer's own special tokens: the project's first layout,
# kept for the models trained on it (the shipped tiny reader; bundles written before "plain").
RAW_PROMPT = PromptBuilder("raw", _raw_text, page_text=build_prompt)
# The processor's chat template with add_generation_prompt: what chat VLMs (Qwen2-VL, Idefics3,
# SmolVLM, ...) were instruction-tuned on; the answer follows the assistant header.
CHAT_TEMPLATE_PROMPT = PromptBuilder("chat-template", _chat_text, pass_through=True)
# Processor classes of DeepSeek-OCR models: they get DeepSeek's plain layout, whatever chat template
# they carry (the name predates "plain"; family modules add their processors here).
RAW_PROMPT_PROCESSORS: set[str] = {"DeepseekOcr2Processor"}


def default_prompt_builder(processor) -> PromptBuilder:
    """The layout of a model without a bundle: plain for DeepSeek-OCR processors, raw for other
    processors without a chat template, the chat template for every other processor. A model with a
    bundle gets the bundle's (`deepsynth.models.bundle.make_collator`)."""
    if type(processor).__name__ in RAW_PROMPT_PROCESSORS:
        return PLAIN_PROMPT
    if not getattr(processor, "chat_template", None):
        return RAW_PROMPT
    return CHAT_TEMPLATE_PROMPT


#: Batch entries that are training targets beside the labels (`Collator.__call__`), never model inputs.
AUX_PREFIX = "aux_"


@dataclass
class Collator:
    """Turns (pages, instruction, answer) triples into a padded training batch.

    processor:   the model's processor (image preprocessing + tokenizer + image-token expansion).
    max_length:  longest sequence allowed; a longer example raises an error naming it rather than
                 being truncated, because cutting would drop answer tokens or image tokens.
    instruction_tokenizer: set for the text-encoder channel: the instruction is tokenized with
                 the encoder's tokenizer and the prompt holds one placeholder (the pad token) per
                 encoder token; batches then carry instruction_input_ids / _attention_mask /
                 _positions for `SoftPromptModel`.
    instruction_max_length: encoder tokens kept per instruction (longer ones are truncated by the
                 encoder tokenizer, as any encoder input would be).
    """

    processor: object
    max_length: int = 1024
    instruction_tokenizer: object | None = None
    instruction_max_length: int = 128
    # Prompt layout; None = `default_prompt_builder(processor)` (plain for DeepSeek, chat template otherwise).
    prompt_builder: PromptBuilder | None = field(default=None)

    def __post_init__(self) -> None:
        if self.prompt_builder is None:
            self.prompt_builder = default_prompt_builder(self.processor)

    @classmethod
    def for_model(cls, model, processor, max_length: int = 1024) -> "Collator":
        """The collator a model needs: with an instruction tokenizer when it reads instructions
        through a text encoder (`SoftPromptModel`), plain otherwise."""
        encoder = getattr(model, "text_encoder", None)
        return cls(processor, max_length, instruction_tokenizer=encoder.tokenizer if encoder is not None else None)

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    def encode_prompts(self, pages: Sequence[Sequence[Image.Image]], instructions: Sequence[str]) -> dict:
        """Processor call for prompts only: token ids (unpadded lists) and pixel values for all pages."""
        extra = {}
        if self.instruction_tokenizer is not None:
            ins_enc = self.instruction_tokenizer(list(instructions), padding=True, truncation=True,
                                                 max_length=self.instruction_max_length, return_tensors="pt")
            placeholder = self.tokenizer.pad_token
            instructions = [placeholder * int(n) for n in ins_enc["attention_mask"].sum(1)]
            extra = {"instruction_input_ids": ins_enc["input_ids"], "instruction_attention_mask": ins_enc["attention_mask"]}
        builder = self.prompt_builder
        prompts = [builder(self.processor, len(p), ins) for p, ins in zip(pages, instructions)]
        flat = [img for doc in pages for img in doc]
        enc = self.processor(images=flat, text=prompts, return_tensors="pt", padding=True,
                             **builder.tokenizer_kwargs())
        # Unpad the ids so that answers can be appended before the batch is padded again.
        ids = [builder.with_bos(self.tokenizer, row[mask.bool()].tolist())
               for row, mask in zip(enc["input_ids"], enc["attention_mask"])]
        if self.prompt_builder.pass_through:
            extra.update(_split_processor_outputs(enc))
        elif "pixel_values_local" in enc:
            # DeepSeek-OCR-2 in crop mode "tiles": the prompt counts the crops' tokens, so their pixels
            # and the number per page must reach the model too.
            extra["mm_inputs"] = {k: enc[k] for k in ("pixel_values_local", "num_local_patches")}
        return {"input_ids": ids, "pixel_values": enc["pixel_values"], **extra}

    def __call__(self, batch: Sequence[dict]) -> dict:
        """batch items: {"pages": [PIL images], "instruction": str, "answer": str, "id": str (optional)},
        and optionally training targets named `aux_*` (tensors with one row per page), which come out
        concatenated over the batch's pages for a training callback's `extra_loss` (rows of
        different lengths right-padded with IGNORE_INDEX)."""
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
        out = {**pad_right(ids, labels, self.tokenizer.pad_token_id), "pixel_values": enc["pixel_values"]}
        for key in [k for k in batch[0] if k.startswith(AUX_PREFIX)]:
            out[key] = concat_rows([torch.as_tensor(item[key]) for item in batch])
        out.update(_model_inputs(enc, out["input_ids"].shape[1], left=False))
        if self.instruction_tokenizer is not None:
            # Placeholders are the pad tokens of the prompt part (the answer may end in a pad-like EOS).
            pad, width = self.tokenizer.pad_token_id, out["input_ids"].shape[1]
            out["instruction_positions"] = torch.tensor(
                [[t == pad for t in p] + [False] * (width - len(p)) for p in enc["input_ids"]])
            out.update({k: v for k, v in enc.items() if k.startswith("instruction_")})
        return out

    def prompt_batch(self, pages: Sequence[Sequence[Image.Image]], instructions: Sequence[str]) -> dict:
        """Left-padded prompts for generation (new tokens are appended on the right)."""
        enc = self.encode_prompts(pages, instructions)
        width = max(len(x) for x in enc["input_ids"])
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in enc["input_ids"]])
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in enc["input_ids"]])
        out = {"input_ids": input_ids, "attention_mask": mask, "pixel_values": enc["pixel_values"]}
        out.update(_model_inputs(enc, width, left=True))
        if self.instruction_tokenizer is not None:
            out["instruction_positions"] = (input_ids == pad) & mask.bool()
            out.update({k: v for k, v in enc.items() if k.startswith("instruction_")})
        return out


def concat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """The tensors stacked along their first dimension, right-padded with IGNORE_INDEX in the last
    one where their lengths differ (per-page targets whose length follows the answer's)."""
    width = max(p.shape[-1] for p in parts)
    if any(p.dim() < 2 for p in parts) or all(p.shape[-1] == width for p in parts):
        return torch.cat(parts)
    return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[-1]), value=IGNORE_INDEX) for p in parts])


def pad_right(ids: list[list[int]], labels: list[list[int]], pad_id: int) -> dict:
    width = max(len(x) for x in ids)
    return {
        "input_ids": torch.tensor([x + [pad_id] * (width - len(x)) for x in ids]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids]),
        "labels": torch.tensor([y + [IGNORE_INDEX] * (width - len(y)) for y in labels]),
    }


_TEXT_KEYS = ("input_ids", "attention_mask", "pixel_values")


def _split_processor_outputs(enc) -> dict:
    """Processor outputs beyond ids/mask/pixels: per-token ones unpadded like the ids, the rest as is."""
    mask = enc["attention_mask"].bool()
    tokens, other = {}, {}
    for key, value in enc.items():
        if key in _TEXT_KEYS or not isinstance(value, torch.Tensor):
            continue
        if value.shape == mask.shape:
            tokens[key] = [row[m].tolist() for row, m in zip(value, mask)]
        else:
            other[key] = value
    return {"token_inputs": tokens, "mm_inputs": other}


def _model_inputs(enc: dict, width: int, left: bool) -> dict:
    """Pass-through inputs for the model: per-token ones padded to `width` with 0 (answer tokens
    are text, so they are 0 too), the others unchanged."""
    out = dict(enc.get("mm_inputs", {}))
    for key, rows in enc.get("token_inputs", {}).items():
        padded = [[0] * (width - len(r)) + r if left else r + [0] * (width - len(r)) for r in rows]
        out[key] = torch.tensor(padded)
    return out
