"""Any `AutoModelForImageTextToText` + `AutoProcessor` checkpoint, plus tiny offline presets.

The generic backend serves every model type transformers maps to `AutoModelForImageTextToText`
(Qwen2-VL, Qwen2.5-VL, Idefics3, SmolVLM, LLaVA, Gemma 3, ...) through the same trainer, collator
and engine as DeepSeek-OCR-2. Prompts go through the processor's chat template
(`deepsynth.models.collate.CHAT_TEMPLATE_PROMPT`), so a checkpoint is fine-tuned on the layout it
was instruction-tuned on.

Without torchvision (this project never installs it: PyPI's build breaks beside the CPU torch) some processors cannot be built
as published: Qwen2-VL's and SmolVLM's processors insist on a video processor, and video
processors need torchvision. `load_processor` then falls back to the same processor class minus
its video slot (`image_only_processor_class`); images go through the Pillow image processor and
the saved files stay loadable by plain `AutoProcessor` where torchvision is present.

Tiny presets ("tiny-qwen2-vl", "tiny-qwen2.5-vl", "tiny-idefics3") are randomly initialised
models of the real classes with a character tokenizer carrying each family's special tokens and
the family's published chat template, for offline tests.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedTokenizerFast
from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES
from transformers.utils import is_torchvision_available

from deepsynth.models.backend import Backend
from deepsynth.models.tokenizer import CHARACTERS

logger = logging.getLogger(__name__)

# Model types served by the generic backend (DeepSeek-OCR-2 keeps its own backend, tried first).
IMAGE_TEXT_TO_TEXT_TYPES: tuple[str, ...] = tuple(sorted(MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES))


# ---- loading -----------------------------------------------------------------------------------
@functools.cache
def image_only_processor_class(base: type) -> type:
    """`base` (a ProcessorMixin subclass with a `video_processor` slot) without that slot.

    Prompt building, image-token expansion and chat templates are the base class's own code; only
    the video processor (which needs torchvision) is left out. `save_pretrained` records the base
    class name, so the directory loads with `AutoProcessor` wherever torchvision is installed.
    """
    params = inspect.signature(base.__init__).parameters
    if "video_processor" not in params:
        return base
    kept = [name for name in base.get_attributes() if name != "video_processor"]
    if kept != ["image_processor", "tokenizer"]:
        raise TypeError(f"{base.__name__} has sub-processors {kept} besides the video processor; "
                        "only image + tokenizer processors can drop their video processor")

    # Explicit parameters: ProcessorMixin reads them from __init__'s code object and signature.
    # It pairs positional sub-processors with `get_attributes()` of this class, which no longer
    # lists the video processor, so the None passed for it is dropped.
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        base.__init__(self, image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                      chat_template=chat_template, **kwargs)

    def to_dict(self) -> dict:
        out = base.to_dict(self)
        out["processor_class"] = base.__name__
        return out

    return type(f"{base.__name__}ImageOnly", (base,), {
        "__init__": __init__, "to_dict": to_dict, "__module__": __name__,
        "__doc__": f"{base.__name__} without its video processor (torchvision is not installed).",
    })


def _processor_class_name(path: str) -> str | None:
    local = Path(path)
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        file = local / name
        if file.is_file():
            found = json.loads(file.read_text()).get("processor_class")
            if found:
                return found
    config = local / "config.json"
    if config.is_file():
        return PROCESSOR_MAPPING_NAMES.get(json.loads(config.read_text()).get("model_type"))
    return None


def load_processor(path: str):
    """`AutoProcessor.from_pretrained(path)`, or, when that fails because torchvision is missing,
    the same processor class without its video processor."""
    try:
        return AutoProcessor.from_pretrained(path)
    except Exception as err:  # transformers raises ValueError/TypeError/ImportError/AttributeError here
        if is_torchvision_available():
            raise
        name = _processor_class_name(path)
        base = getattr(transformers, name, None) if name else None
        if base is None or "video_processor" not in inspect.signature(base.__init__).parameters:
            raise
        logger.info("torchvision is not installed (%s): loading %s without its video processor", err, name)
        return image_only_processor_class(base).from_pretrained(path)


def prepare_for_generation(model, processor):
    """Pad token (EOS when the tokenizer has none) and generation ids, as the collator needs them."""
    tok = processor.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.generation_config.pad_token_id = tok.pad_token_id
    if model.generation_config.eos_token_id is None:
        model.generation_config.eos_token_id = tok.eos_token_id
    return model, processor


def load_generic(path: str, dtype: torch.dtype | None = None, config: dict | None = None):
    """Backend loader: (AutoModelForImageTextToText, processor) for a local directory or hub id
    (`config`, the resolver's copy of config.json, is not needed here)."""
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype)
    return prepare_for_generation(model, load_processor(path))


# ---- tiny presets ------------------------------------------------------------------------------
def build_family_tokenizer(special_tokens: Sequence[str], *, pad: str, eos: str, unk: str | None = None,
                           bos: str | None = None, extra: dict[str, str] | None = None) -> PreTrainedTokenizerFast:
    """A character tokenizer (like `deepsynth.models.tokenizer.build_char_tokenizer`) whose special
    tokens are a model family's own: `special_tokens` get ids 0.. in order, then printable ASCII."""
    vocab = {tok: i for i, tok in enumerate(special_tokens)}
    for ch in CHARACTERS:
        vocab.setdefault(ch, len(vocab))
    unk = unk or pad
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.add_special_tokens(list(special_tokens))
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=pad, eos_token=eos, unk_token=unk, bos_token=bos,
        extra_special_tokens=extra or {}, clean_up_tokenization_spaces=False,
    )


# Qwen2-VL / Qwen2.5-VL's published chat template (Qwen/Qwen2-VL-7B-Instruct).
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2_VL_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                     "<|image_pad|>", "<|video_pad|>")

# Idefics3's published chat template (HuggingFaceM4/Idefics3-8B-Llama3).
IDEFICS3_CHAT_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
IDEFICS3_SPECIALS = ("<|end_of_text|>", "<|begin_of_text|>", "<end_of_utterance>", "<fake_token_around_image>",
                     "<image>", "<global-img>") + tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))


def _qwen_tokenizer() -> PreTrainedTokenizerFast:
    # Instruct checkpoints end assistant turns with <|im_end|>, which is their EOS; pad is <|endoftext|>.
    return build_family_tokenizer(QWEN2_VL_SPECIALS, pad="<|endoftext|>", eos="<|im_end|>",
                                  extra={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})


def _tiny_text(tok, **kw) -> dict:
    return dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **kw)


def build_tiny_qwen2_vl(seed: int = 0, image_size: int = 224, version: str = "2"):
    """Randomly initialised tiny Qwen2-VL (version "2") or Qwen2.5-VL ("2.5") and its processor.

    Pages are resized to `image_size` square (14 px patches, 2x2 merge: 64 image tokens at 224 px).
    """
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tok = _qwen_tokenizer()
    pixels = image_size * image_size
    image_processor = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2,
                                               temporal_patch_size=2)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN2_VL_SPECIALS}
    # Multimodal RoPE splits each head's rotary half (head_dim 16 -> 8) into t/h/w sections.
    text = _tiny_text(tok, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    if version == "2":
        from transformers import Qwen2VLConfig as Config, Qwen2VLForConditionalGeneration as Model, Qwen2VLProcessor as Proc

        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, patch_size=14, spatial_merge_size=2,
                      temporal_patch_size=2)
    elif version == "2.5":
        from transformers import (Qwen2_5_VLConfig as Config, Qwen2_5_VLForConditionalGeneration as Model,
                                  Qwen2_5_VLProcessor as Proc)

        vision = dict(depth=2, hidden_size=32, intermediate_size=64, out_hidden_size=64, num_heads=4, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1])
    else:
        raise ValueError(f"version must be '2' or '2.5', got {version!r}")
    processor = image_only_processor_class(Proc)(image_processor=image_processor, tokenizer=tok,
                                                 chat_template=QWEN2_VL_CHAT_TEMPLATE)
    config = Config(text_config=text, vision_config=vision, image_token_id=ids["<|image_pad|>"],
                    video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                    vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(seed)
    return prepare_for_generation(Model(config), processor)


def build_tiny_idefics3(seed: int = 0, image_size: int = 224):
    """Randomly initialised tiny Idefics3 and its processor: one global view per page, no
    splitting (16 px patches, pixel shuffle 2: 49 image tokens at 224 px)."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tok = build_family_tokenizer(IDEFICS3_SPECIALS, pad="<|end_of_text|>", bos="<|begin_of_text|>",
                                 eos="<end_of_utterance>")
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": image_size},
                                                max_image_size={"longest_edge": image_size}, do_image_splitting=False)
    patch, scale = 16, 2
    seq_len = (image_size // patch) ** 2 // scale**2
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=seq_len,
                                  chat_template=IDEFICS3_CHAT_TEMPLATE)
    config = Idefics3Config(
        text_config={"model_type": "llama", **_tiny_text(tok)},
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=image_size, patch_size=patch),
        image_token_id=processor.image_token_id, scale_factor=scale,
    )
    torch.manual_seed(seed)
    return prepare_for_generation(Idefics3ForConditionalGeneration(config), processor)


TINY_PRESETS: dict[str, Callable[..., tuple]] = {
    "tiny-qwen2-vl": functools.partial(build_tiny_qwen2_vl, version="2"),
    "tiny-qwen2.5-vl": functools.partial(build_tiny_qwen2_vl, version="2.5"),
    "tiny-idefics3": build_tiny_idefics3,
}


# ---- page geometry for memory estimates (deepsynth.models.memory) -------------------------------
QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")


def _one_view(crop_mode: str) -> None:
    if crop_mode != "none":
        raise ValueError(f"crop_mode={crop_mode!r}: this model family has no local crops (use 'none')")


def vision_tokens(config, stack: str, side: int = 1024, crop_mode: str = "none") -> int:
    """Vision tokens of one side x side page: Qwen-VL models keep the page's pixels (dynamic
    resolution, 2x2 merge cells); other families resize pages to their fixed input size."""
    _one_view(crop_mode)
    vision = getattr(config, "vision_config", None)
    if config.model_type in QWEN_VL_TYPES:
        cells = round(side / (vision.patch_size * vision.spatial_merge_size)) * vision.spatial_merge_size
        return cells * cells
    size, patch = getattr(vision, "image_size", 224), getattr(vision, "patch_size", 14)
    return (size // patch) ** 2


def image_tokens(config, width: int, height: int, crop_mode: str = "none") -> int:
    """Decoder tokens of one page (square pages: max(width, height) is the side)."""
    tokens = vision_tokens(config, "", max(width, height), crop_mode)
    if config.model_type in QWEN_VL_TYPES:
        return tokens // config.vision_config.spatial_merge_size ** 2
    return tokens // getattr(config, "scale_factor", 1) ** 2


BACKEND = Backend(
    # Tried after the DeepSeek backends; every other AutoModelForImageTextToText type.
    name="generic", model_types=tuple(t for t in IMAGE_TEXT_TO_TEXT_TYPES if t != "deepseek_ocr2"),
    load=load_generic, presets=TINY_PRESETS, prompt_layout="chat-template", render_preset="large",
    preset_render="tiny", encodes_pages=False, image_tokens=image_tokens, vision_tokens=vision_tokens,
)
