"""Text -> page images: pixel-accurate layout, multi-page, shipped fonts, presets, reflow, stats."""

from .modes import MODES, OcrMode, vision_tokens
from .reflow import reflow_text
from .renderer import (
    PRESET_ALIASES,
    PRESET_MODES,
    PRESETS,
    SHIPPED_FONTS,
    Page,
    RenderConfig,
    describe_preset,
    join_pages,
    render_stats,
    render_text,
)

__all__ = ["MODES", "OcrMode", "PRESET_ALIASES", "PRESET_MODES", "PRESETS", "SHIPPED_FONTS", "Page", "RenderConfig",
           "describe_preset", "join_pages", "reflow_text", "render_stats", "render_text", "vision_tokens"]
