"""vLLM general plugin: lets vLLM serve the project's DeepSeek-OCR-2 checkpoints.

Registered as the entry point `vllm.general_plugins: deepsynth = deepsynth.vllm:register`,
so vLLM calls `register()` in every process it starts (front end, engine core, workers). The
vLLM engine (`deepsynth.vllm.engine`) calls it too, and so does `deepsynth.vllm.checkpoint.resolve_model`
before it loads a processor.

What it does (each step is idempotent and needed only where transformers lacks it):

* model types: imports `deepsynth.models` (which registers `deepseek_ocr2_patches` with
  transformers' AutoConfig, its conditional-generation class and key conversions), registers the
  base-model class of that type with `AutoModel` (vLLM's Transformers backend builds the model
  with `AutoModel.from_config`), and exposes the architecture name of its config.json on the
  `transformers` module, where vLLM looks architectures up;
* vision readout: `DeepseekOcr2Model.__init__` applies the config's `vision_readout`, so a model
  that vLLM builds reads image tokens at the patch positions as our checkpoints were trained to.
  Without it vLLM still runs, with the stock readout, and answers garbage (the tests check this);
* pages: every `DeepseekOcr2Processor` loaded with `from_pretrained` draws pages by DeepSeek's rules (`use_page_rules`: the
  no-crop view stretched up to 768 px, padded above), as the project's loaders make theirs draw
  them; vLLM's copy, built from the checkpoint, would otherwise pad every page (transformers'
  stock image processor), and non-square pages would read differently in the two engines;
* processor: `_get_num_multimodal_tokens` (how many tokens and pixel rows an image of a given
  size takes: vLLM needs it to profile memory and to split the image fields per image), and, on
  transformers releases whose `DeepseekOcr2Processor` still expands image tokens in its own
  `__call__`, the expansion through `ProcessorMixin` (`replace_image_token`), which reports the
  placeholder offsets vLLM locates images by, and the processor-level `images_kwargs` defaults
  that the project's crop mode sets (`deepsynth.models.deepseek_ocr2.set_crop_mode`).
"""

from __future__ import annotations

import logging
import math

logger = logging.getLogger(__name__)

_DONE = False


def register() -> None:
    """Entry point of the plugin (see the module docstring)."""
    global _DONE
    if _DONE:
        return
    _register_models()
    _patch_processor()
    _DONE = True


def _register_models() -> None:
    import transformers
    from transformers import AutoModel
    from transformers.models.deepseek_ocr2 import modeling_deepseek_ocr2 as modeling

    from deepsynth.models import deepseek_ocr2 as ours  # registers the config type and the Auto class

    base_init = modeling.DeepseekOcr2Model.__init__
    if not getattr(base_init, "_deepsynth_readout", False):
        def __init__(self, config, *args, **kwargs):
            base_init(self, config, *args, **kwargs)
            readout = getattr(config, "vision_readout", "queries")
            if readout not in ours.READOUTS:
                raise ValueError(f"config.vision_readout must be one of {ours.READOUTS}, got {readout!r}")
            if readout == "patches":
                self.vision_tower.__class__ = ours.PatchReadoutVisionModel

        __init__._deepsynth_readout = True
        modeling.DeepseekOcr2Model.__init__ = __init__

    class DeepseekOcr2PatchReadoutModel(modeling.DeepseekOcr2Model):
        """The base model of `deepseek_ocr2_patches` checkpoints (what `AutoModel` builds)."""

        config_class = ours.DeepseekOcr2PatchReadoutConfig

        def __init__(self, config) -> None:
            config.vision_readout = "patches"
            super().__init__(config)

    try:
        AutoModel.register(ours.DeepseekOcr2PatchReadoutConfig, DeepseekOcr2PatchReadoutModel)
    except ValueError:  # registered by an earlier call in this process
        logger.debug("AutoModel already maps %s", ours.PATCH_READOUT_TYPE)
    cls = ours.DeepseekOcr2PatchReadoutForConditionalGeneration
    if getattr(transformers, cls.__name__, None) is None:
        setattr(transformers, cls.__name__, cls)


def _num_image_tokens(processor, height: int, width: int, settings: dict) -> tuple[int, int]:
    """(image tokens, local crops) of one height x width image under the call-time `settings`."""
    from transformers.models.deepseek_ocr2.image_processing_pil_deepseek_ocr2 import get_optimal_tiled_canvas

    ip = processor.image_processor
    size = settings.get("size") or ip.size
    side = int(size) if isinstance(size, (int, float)) else int(size["height"])
    tile = settings.get("tile_size") or ip.tile_size
    cell = processor.patch_size * processor.downsample_ratio
    crops = 0
    if settings.get("crop_to_patches", getattr(ip, "crop_to_patches", False)) and max(height, width) > tile:
        columns, rows = get_optimal_tiled_canvas((height, width), (tile, tile),
                                                 settings.get("min_patches", ip.min_patches),
                                                 settings.get("max_patches", ip.max_patches))
        crops = columns * rows
    return math.ceil(side / cell) ** 2 + crops * math.ceil(tile / cell) ** 2 + 1, crops


def _patch_processor() -> None:
    from transformers import DeepseekOcr2Processor
    from transformers.image_utils import make_flat_list_of_images
    from transformers.processing_utils import MultiModalData, ProcessorMixin

    cls = DeepseekOcr2Processor
    loader = cls.from_pretrained
    if not getattr(loader, "_deepsynth_pages", False):
        # vLLM builds its processor from the checkpoint, where the page image processor is saved as
        # transformers' own (which always pads): draw pages as the HF engine does. The loader is
        # wrapped, not __init__: ProcessorMixin passes a saved processor's settings (patch_size, ...)
        # by the names in __init__'s code object, which a wrapper's would hide.
        def from_pretrained(klass, *args, **kwargs):
            from deepsynth.models.deepseek_ocr2 import use_page_rules

            processor = loader.__func__(klass, *args, **kwargs)
            use_page_rules(processor)
            return processor

        from_pretrained._deepsynth_pages = True
        cls.from_pretrained = classmethod(from_pretrained)
    backport = "images_kwargs" not in vars(cls) and "__call__" in vars(cls)
    if backport:
        # transformers releases before the processor moved onto ProcessorMixin's expansion; the
        # defaults are those of its `DeepseekOcr2ProcessorKwargs`, kept on the class so that an
        # instance can override them (`set_crop_mode`).
        from transformers.models.deepseek_ocr2.processing_deepseek_ocr2 import DeepseekOcr2ProcessorKwargs

        cls.images_kwargs = dict(DeepseekOcr2ProcessorKwargs._defaults["images_kwargs"])
        cls.valid_processor_kwargs = DeepseekOcr2ProcessorKwargs

        def __call__(self, images=None, text=None, **kwargs):
            if images is None:
                raise ValueError("`images` are expected as arguments to a `DeepseekOcr2Processor` instance.")
            if text is None:
                raise ValueError("`text` is required for `DeepseekOcr2Processor`. Example: `'<image>\\nFree OCR.'`")
            passed = dict(kwargs.get("images_kwargs") or {})
            for key, value in (getattr(self, "images_kwargs", None) or {}).items():
                if key not in kwargs and key not in passed:
                    kwargs[key] = value
            return ProcessorMixin.__call__(self, images=images, text=text, **kwargs)

        def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
            images, text, videos, audio = ProcessorMixin.prepare_inputs_layout(
                self, images=images, text=text, videos=videos, audio=audio, **kwargs)
            if images is not None:
                images = make_flat_list_of_images(images)
            return images, text, videos, audio

        def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
            size = kwargs.get("size") or self.image_processor.size
            tile_size = kwargs.get("tile_size") or self.image_processor.tile_size
            cell = self.patch_size * self.downsample_ratio
            crops = int(image_inputs["num_local_patches"][image_idx])
            tokens = math.ceil(size["height"] / cell) ** 2 + math.ceil(tile_size / cell) ** 2 * crops + 1
            return self.image_token * tokens

        cls.__call__ = __call__
        cls.prepare_inputs_layout = prepare_inputs_layout
        cls.replace_image_token = replace_image_token

    if not hasattr(cls, "_get_num_multimodal_tokens"):
        def _get_num_multimodal_tokens(self, image_sizes=None, **kwargs):
            data = {}
            if image_sizes is not None:
                settings = {**(getattr(self, "images_kwargs", None) or {}), **kwargs}
                counts = [_num_image_tokens(self, int(h), int(w), settings) for h, w in image_sizes]
                data["num_image_tokens"] = [tokens for tokens, _ in counts]
                # one row of `pixel_values` (the global view) per image; crops go to pixel_values_local
                data["num_image_patches"] = [1] * len(counts)
            return MultiModalData(**data)

        cls._get_num_multimodal_tokens = _get_num_multimodal_tokens
    logger.debug("DeepseekOcr2Processor prepared for vLLM (expansion back-ported: %s)", backport)
