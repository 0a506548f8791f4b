"""The one decoding path: evaluation, training-time validation, the inference engine and the server
all turn (pages, instruction) into an answer through `Decoder.run`.

A model's decoding defaults live in its `generation_config.json` (`GenerationSettings.from_model` /
`GenerationSettings.write_to`) and its loop guard in the bundle (docs/architecture.md), so a score
reported for a model is a score of what `deepsynth ask` and `deepsynth serve` return.

Loop guards (see `deepsynth.models.loops`): n-gram blocking while decoding, `LoopStop` ending a row
whose answer ends in a repeated cycle (the answer then keeps one copy and says `stopped="loop"`).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from transformers import LogitsProcessorList, StoppingCriteriaList
from transformers.modeling_outputs import BaseModelOutputWithPooling

from deepsynth.models.collate import Collator
from deepsynth.models.loops import CancelStop, LoopPolicy, LoopStop, trim_loop
from deepsynth.models.structured import JsonSchemaLogitsProcessor, TokenizerData, check_schema

# Fields of GenerationSettings that are stored in generation_config.json.
_CONFIG_FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_p", "repetition_penalty", "no_repeat_ngram_size",
                  "answer_after")


@dataclass
class GenerationSettings:
    """Decoding settings with guards against generation loops.

    max_new_tokens:        hard cap on answer length.
    do_sample/temperature/top_p: greedy by default; sampling when do_sample is True.
    repetition_penalty:    >1 discourages repeating tokens (1.0 = off). Off by default: answers copy
                           numbers, names and words from the page, and penalising every reused token
                           distorts those copies.
    no_repeat_ngram_size:  forbids any n-gram of this length from repeating (0 = off); the usual cure
                           for pages of repeated text. DeepSeek-OCR's own serving recipe blocks
                           repeats of 30 tokens; shorter cycles are caught by the loop stop.
    answer_after:          for a model that writes something before its answer (a reader trained to
                           write out the pages it reads, then the answer): the answer is the text
                           after the last occurrence of this string ("" = the whole output; an
                           output without it is returned whole; off under a JSON schema).
    """

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 30
    answer_after: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 1 <= self.max_new_tokens <= 8192:
            raise ValueError(f"max_new_tokens must be in [1, 8192], got {self.max_new_tokens}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")

    def kwargs(self) -> dict:
        out = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, **self.extra}
        if self.do_sample:
            out.update(temperature=self.temperature, top_p=self.top_p)
        # Always passed: `generate` would otherwise take the model's generation_config value.
        out["repetition_penalty"] = self.repetition_penalty
        out["no_repeat_ngram_size"] = self.no_repeat_ngram_size
        return out

    def replace(self, **overrides) -> "GenerationSettings":
        return dataclasses.replace(self, **overrides) if overrides else self

    @classmethod
    def from_model(cls, model) -> "GenerationSettings":
        """The decoding defaults stored in the model's generation_config (written by `write_to`);
        fields it leaves unset (None in transformers' GenerationConfig) keep this class's defaults."""
        config = getattr(model, "generation_config", None)
        values = {}
        for name in _CONFIG_FIELDS:
            value = getattr(config, name, None) if config is not None else None
            if value is not None:
                values[name] = value
        return cls(**values)

    def write_to(self, model) -> None:
        """Store these settings in the model's generation_config (saved as generation_config.json)."""
        config = model.generation_config
        for name in _CONFIG_FIELDS:
            setattr(config, name, getattr(self, name))
        if self.answer_after:
            # transformers reads no field of its own from a generation config marked as derived from
            # the model's config, and answer_after is not one of its fields
            config._from_model_config = False


def _answer_row(new: list[int], tokenizer, policy: LoopPolicy, cancelled: bool,
                constraint: JsonSchemaLogitsProcessor | None = None, answer_after: str = "") -> dict:
    """Decoded answer and why it stopped, from one row's new token ids.

    With a schema `constraint` no loop is trimmed (that would cut the JSON) and an answer the
    budget ended unclosed is closed. With `answer_after` (`GenerationSettings.answer_after`) and no
    constraint, the answer is what follows its last occurrence."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ended = eos in new
    if ended:
        new = new[:new.index(eos)]
    else:
        while new and new[-1] == pad:
            new.pop()
    n_new = len(new)
    looped = False
    if not ended and constraint is None:
        new, looped = trim_loop(new, policy)
    stopped = "eos" if ended else "loop" if looped else "cancelled" if cancelled else "max_new_tokens"
    text = tokenizer.decode(new, skip_special_tokens=True)
    if constraint is not None and not ended:
        text = constraint.complete(new, text)
    if answer_after and constraint is None:
        text = text.rsplit(answer_after, 1)[-1]
    return {"answer": text.strip(), "new_tokens": n_new, "stopped": stopped}


class Decoder:
    """Generates answers for (pages, instruction) pairs with one model and one set of guards.

    model / collator: the model and the collator that builds its prompts (instruction channel and
                      prompt layout included).
    settings:         default decoding settings (usually `GenerationSettings.from_model(model)`).
    loop_policy:      when a repeated tail counts as a loop.
    encodes_pages:    the model takes pre-computed page features (`mm_encoder_outputs`): pages go
                      through the vision tower once, in `encode_pages`, and a caller may keep the
                      features to skip the tower for the next question about the same pages.
    """

    def __init__(self, model, collator: Collator, settings: GenerationSettings | None = None,
                 loop_policy: LoopPolicy = LoopPolicy(), encodes_pages: bool = False) -> None:
        self.model = model
        self.collator = collator
        self.tokenizer = collator.tokenizer
        self.settings = settings or GenerationSettings.from_model(model)
        self.loop_policy = loop_policy
        self.image_token_id = getattr(model.config, "image_token_id", None)
        self.encodes_pages = (
            encodes_pages and collator.instruction_tokenizer is None and collator.prompt_builder.page_text is not None
            and hasattr(model, "_supports_mm_encoder_outputs") and model._supports_mm_encoder_outputs()
        )
        # Soft-prompt models (text-encoder channel) generate from inputs_embeds: the ids that
        # stopping criteria see hold the new tokens only.
        self._ids_hold_prompt = getattr(model, "text_encoder", None) is None
        self._tokenizer_data: TokenizerData | None = None

    def tokenizer_data(self) -> TokenizerData:
        """The vocabulary as the constrained-decoding library sees it (built on first use)."""
        if self._tokenizer_data is None:
            self._tokenizer_data = TokenizerData(self.tokenizer)
        return self._tokenizer_data

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode_pages(self, pages: Sequence[Image.Image], chunk: int = 16) -> list[torch.Tensor]:
        """Vision-tower features of each page, one (tokens, hidden) tensor per page."""
        processor = self.collator.processor
        out: list[torch.Tensor] = []
        for start in range(0, len(pages), chunk):
            # The processor's call-time image settings (its crop mode, see deepseek_ocr2.set_crop_mode)
            # override the image processor's own, here as in the collator's processor call.
            enc = processor.image_processor(images=list(pages[start:start + chunk]), return_tensors="pt",
                                            **dict(getattr(processor, "images_kwargs", None) or {}))
            kwargs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in enc.items()
                      if k in ("pixel_values", "pixel_values_local", "num_local_patches")}
            for key in ("pixel_values", "pixel_values_local"):
                if kwargs.get(key) is not None:
                    kwargs[key] = kwargs[key].to(self.model.dtype)
            out.extend(self.model.get_image_features(**kwargs, return_dict=True).pooler_output)
        return out

    def _feature_inputs(self, features: Sequence[Sequence[torch.Tensor]], instructions: Sequence[str]) -> dict:
        image_token = self.collator.processor.image_token
        builder = self.collator.prompt_builder
        prompts = []
        for page_features, instruction in zip(features, instructions):
            tokens = "".join(image_token * int(f.shape[0]) for f in page_features)
            # The collator's layout with every page's image tokens in place of the page placeholders.
            prompts.append(builder.encode(self.tokenizer, builder.page_text(1, instruction, tokens)))
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        return {
            "input_ids": torch.tensor([[pad] * (width - len(p)) + p for p in prompts]),
            "attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts]),
            "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(
                pooler_output=[f for page_features in features for f in page_features])},
        }

    def prepare_inputs(self, pages: Sequence[Sequence[Image.Image]], instructions: Sequence[str],
                       features: Sequence[Sequence[torch.Tensor]] | None = None) -> dict:
        """Left-padded model inputs for a batch (page features when the model takes them)."""
        if self.encodes_pages:
            if features is None:
                features = [self.encode_pages(doc) for doc in pages]
            return self._feature_inputs(features, instructions)
        return self.collator.prompt_batch(pages, instructions)

    @torch.no_grad()
    def run(self, pages: Sequence[Sequence[Image.Image]], instructions: Sequence[str],
            settings: GenerationSettings | None = None, features: Sequence[Sequence[torch.Tensor]] | None = None,
            streamer=None, cancel: threading.Event | None = None, inputs: dict | None = None,
            json_schema: dict | None = None) -> list[dict]:
        """One `generate` call for a batch. Rows: {"answer", "prompt_tokens", "visual_tokens",
        "new_tokens", "stopped"}; stopped is "eos", "max_new_tokens", "loop" or "cancelled".

        json_schema: constrain every answer of the batch to this JSON schema (structured output,
        `deepsynth.models.structured`): each answer parses and validates, even when the budget
        ends it (the loop stop is off then: cutting a repeated tail would cut the JSON; the
        budget closes it instead). Raises `SchemaError` for a schema that cannot be enforced."""
        settings = settings or self.settings
        if json_schema is not None:
            check_schema(json_schema, settings.max_new_tokens)
        tok = self.tokenizer
        if inputs is None:
            inputs = self.prepare_inputs(pages, instructions, features)
        mask, input_ids = inputs["attention_mask"], inputs["input_ids"]
        width = input_ids.shape[1]
        inputs = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        prompt_width = width if self._ids_hold_prompt else 0
        constraint = None
        if json_schema is None:
            criteria = StoppingCriteriaList([LoopStop(prompt_width, self.loop_policy)])
        else:
            criteria = StoppingCriteriaList()
            constraint = JsonSchemaLogitsProcessor(json_schema, self.tokenizer_data(), prompt_width,
                                                   settings.max_new_tokens)
        canceller = CancelStop(cancel) if cancel is not None else None
        if canceller is not None:
            criteria.append(canceller)
        kwargs = settings.kwargs()
        if constraint is not None:
            kwargs["logits_processor"] = LogitsProcessorList([*kwargs.get("logits_processor", []), constraint])
        if self.image_token_id is not None:  # an answer never holds image tokens
            kwargs.setdefault("suppress_tokens", [self.image_token_id])
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(**inputs, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                      stopping_criteria=criteria, streamer=streamer, **kwargs)
        finally:
            if was_training:
                self.model.train()
        cancelled = canceller is not None and canceller.fired
        rows = []
        for ids, m, new in zip(input_ids, mask, out[:, width:].tolist()):
            row = _answer_row(new, tok, self.loop_policy, cancelled, constraint, settings.answer_after)
            row["prompt_tokens"] = int(m.sum())
            row["visual_tokens"] = (int((ids[m.bool()] == self.image_token_id).sum())
                                    if self.image_token_id is not None else 0)
            rows.append(row)
        return rows

    def run_all(self, pages: Sequence[Sequence[Image.Image]], instructions: Sequence[str],
                settings: GenerationSettings | None = None, batch_size: int = 16) -> list[dict]:
        """`run` over any number of pairs, `batch_size` per `generate` call."""
        if len(pages) != len(instructions):
            raise ValueError(f"{len(pages)} page lists but {len(instructions)} instructions")
        rows: list[dict] = []
        for i in range(0, len(pages), batch_size):
            rows += self.run(pages[i:i + batch_size], instructions[i:i + batch_size], settings)
        return rows


def generate_with_stats(model, collator: Collator, pages: Sequence[Sequence[Image.Image]],
                        instructions: Sequence[str], settings: GenerationSettings | None = None,
                        batch_size: int = 16, loop_policy: LoopPolicy = LoopPolicy(),
                        encodes_pages: bool = False) -> list[dict]:
    """Answer each (pages, instruction) pair through `Decoder`; rows as in `Decoder.run`."""
    return Decoder(model, collator, settings, loop_policy, encodes_pages).run_all(pages, instructions, settings,
                                                                                  batch_size)


def generate_answers(model, collator: Collator, pages: Sequence[Sequence[Image.Image]], instructions: Sequence[str],
                     settings: GenerationSettings | None = None, batch_size: int = 16) -> list[str]:
    """Answers only (see `generate_with_stats`)."""
    return [r["answer"] for r in generate_with_stats(model, collator, pages, instructions, settings, batch_size)]
