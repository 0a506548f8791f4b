"""Text -> page images: pixel-accurate layout, multi-page, shipped fonts, presets, stats."""

from .renderer import (
    PRESETS,
    SHIPPED_FONTS,
    Page,
    RenderConfig,
    join_pages,
    render_stats,
    render_text,
)

__all__ = ["PRESETS", "SHIPPED_FONTS", "Page", "RenderConfig", "join_pages", "render_stats", "render_text"]
