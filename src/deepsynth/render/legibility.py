"""Legibility check: read rendered pages back with an independent OCR and score word recall.

The OCR is PP-OCR (detection + recognition ONNX models) run by ``rapidocr`` on ``onnxruntime``;
its models ship inside the ``rapidocr`` wheel, so the check runs offline. Both are the optional
``ocr`` extra (``pip install 'deepsynth[ocr]'``). It is not the model that will read the pages:
a page the OCR reads well is drawn large and clean enough to be read, which is what choosing the
densest preset needs; it does not promise what a given model reads.

Word recall of a page: the share of the words drawn on it (``Page.text``) that the OCR read,
matched as a multiset (each read word counts once, order ignored). Words are compared after
Unicode NFKC normalisation with punctuation stripped from both ends ("licence." matches
"licence"; curly and straight quotes do not matter); words that are only punctuation are left
out. Case is kept. Two words the OCR runs together count as missed.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

logger = logging.getLogger(__name__)

OCR_EXTRA = "pip install 'deepsynth[ocr]'"
_EDGE_PUNCT = re.compile(r"^[\W_]+|[\W_]+$")
#: Missed words listed per page (the rest are counted).
MAX_MISSED_SHOWN = 20

#: A page reader: page image -> the text read from it.
Reader = Callable[[Any], str]


def ocr_unavailable() -> str | None:
    """Why the OCR cannot run here (the extra is missing), or None when it can."""
    missing = []
    for module in ("rapidocr", "onnxruntime"):
        try:
            __import__(module)
        except ImportError as exc:
            missing.append(f"{module} ({exc})")
    if missing:
        return f"the OCR extra is not installed: cannot import {', '.join(missing)}; {OCR_EXTRA}"
    return None


@lru_cache(maxsize=1)
def _engine():
    reason = ocr_unavailable()
    if reason:
        raise RuntimeError(reason)
    from rapidocr import RapidOCR

    # rendered pages are never rotated, so the text-direction classifier is skipped
    return RapidOCR(params={"Global.log_level": "warning", "Global.use_cls": False})


def ocr_name() -> str:
    """The OCR's name and version, for reports."""
    from importlib.metadata import version

    return f"rapidocr {version('rapidocr')} (PP-OCR, onnxruntime {version('onnxruntime')})"


def read_page(image: Any) -> str:
    """Text the OCR reads on a page image (PIL image), one detected line per output line."""
    import numpy as np

    result = _engine()(np.asarray(image.convert("RGB")))
    return "\n".join(result.txts or ())


def _words(text: str) -> list[str]:
    out = []
    for word in unicodedata.normalize("NFKC", text).split():
        word = _EDGE_PUNCT.sub("", word)
        if word:
            out.append(word)
    return out


def word_recall(expected: str, read: str) -> dict[str, Any]:
    """How many of the words of ``expected`` are in ``read`` (see the module docstring)."""
    want = _words(expected)
    have = Counter(_words(read))
    missed = []
    for word in want:
        if have[word] > 0:
            have[word] -= 1
        else:
            missed.append(word)
    found = len(want) - len(missed)
    return {"words": len(want), "found": found, "recall": found / len(want) if want else 1.0,
            "missed": missed[:MAX_MISSED_SHOWN]}


def check_pages(pages: Sequence[Any], reader: Reader | None = None) -> dict[str, Any]:
    """Read every page back and score it: {"ocr", "recall" (over all words), "pages": [per page:
    index, words, found, recall, missed (the first few)]}. ``reader`` replaces the OCR (tests)."""
    if reader is None:
        reason = ocr_unavailable()
        if reason:
            raise RuntimeError(reason)
    read = reader or read_page
    rows = []
    for page in pages:
        score = word_recall(page.text, read(page.image))
        rows.append({"index": page.index, **score})
        logger.info("page %d: recall %.3f (%d of %d words)", page.index + 1, score["recall"], score["found"],
                    score["words"])
    words = sum(r["words"] for r in rows)
    found = sum(r["found"] for r in rows)
    return {"ocr": "custom reader" if reader else ocr_name(), "recall": found / words if words else 1.0,
            "words": words, "found": found, "pages": rows}
