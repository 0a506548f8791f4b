"""Benchmark the page renderer against the naive approach it replaces.

Baseline (the original code): wrap every paragraph at a fixed 100 characters with ``textwrap``,
draw all lines on one tall image, then crop the first four page heights.  Whatever lies below
four pages, or to the right of the page edge, is lost.

Both run in this process, on the same documents (about 1, 3 and 8 pages of ``large``-preset text:
1024x1024, DejaVu Sans 20 px, margin 32, line height 25), with the same font, so their ratio
is meaningful even on a busy machine.  Timings cover layout + drawing in memory (no PNG
encoding).  Word loss of the baseline is computed from geometry: a word is lost when it is not
fully inside the cropped pages (below the fourth page or past the right edge).

    python benchmarks/render.py [--out benchmarks/render_report.json] [--min-seconds 1.0]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import re
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import PIL
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from deepsynth.render import RenderConfig, join_pages, render_text  # noqa: E402
from deepsynth.render.renderer import load_font, resolve_font_path  # noqa: E402

logger = logging.getLogger("benchmarks.render")

BASELINE_WRAP = 100
BASELINE_PAGES = 4


def make_corpus(n_words: int, seed: int = 0) -> str:
    """Deterministic English-like text: sentences of random words in paragraphs."""
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0, 2.0,
               1.9, 1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1]
    vocab = ["".join(rng.choices(letters, weights, k=max(1, min(14, int(rng.gauss(5, 2.5))))))
             for _ in range(5000)]
    words: list[str] = []
    paragraphs: list[str] = []
    sentence_left = rng.randint(6, 20)
    para_left = rng.randint(40, 140)
    for i in range(n_words):
        w = rng.choice(vocab)
        if not words or words[-1].endswith("."):
            w = w.capitalize()
        sentence_left -= 1
        if sentence_left == 0:
            w += "."
            sentence_left = rng.randint(6, 20)
        elif rng.random() < 0.06:
            w += ","
        words.append(w)
        para_left -= 1
        if para_left == 0 or i == n_words - 1:
            paragraphs.append(" ".join(words))
            words = []
            para_left = rng.randint(40, 140)
    return "\n\n".join(paragraphs)


def document_of_pages(corpus: str, n_pages: int, config: RenderConfig) -> str:
    """Prefix of ``corpus`` that fills ``n_pages - 1`` pages and ~80% of the last one."""
    pages = render_text(corpus, config)
    assert len(pages) > n_pages, "corpus too short"
    full = sum(len(p.text.split()) for p in pages[: n_pages - 1])
    last = int(0.8 * len(pages[n_pages - 1].text.split()))
    n_words = full + last
    # cut the corpus after n_words words, keeping its paragraph structure
    matches = list(re.finditer(r"\S+", corpus))
    return corpus[: matches[n_words - 1].end()]


def naive_render(text: str, config: RenderConfig) -> tuple[list[Image.Image], dict[str, int]]:
    """The original approach; returns the cropped pages and how many words were lost."""
    font = load_font(str(resolve_font_path(config.font, config.bold)), config.font_size)
    lh = config.line_height
    lines: list[str] = []
    for para in text.split("\n"):
        lines.extend(textwrap.wrap(para, BASELINE_WRAP) or [""])
    height = 2 * config.margin + len(lines) * lh
    tall = Image.new("RGB", (config.page_width, height), config.background)
    draw = ImageDraw.Draw(tall)
    for i, line in enumerate(lines):
        if line:
            draw.text((config.margin, config.margin + i * lh), line, font=font, fill=config.foreground)
    n_pages = min(BASELINE_PAGES, math.ceil(height / config.page_height))
    pages = [tall.crop((0, k * config.page_height, config.page_width, (k + 1) * config.page_height))
             for k in range(n_pages)]

    # geometry of what the crops show
    ascent, descent = font.getmetrics()
    visible_bottom = n_pages * config.page_height
    lost_vertical = lost_horizontal = split_across_crops = 0
    for i, line in enumerate(lines):
        top = config.margin + i * lh
        bottom = top + ascent + descent
        for m in re.finditer(r"\S+", line):
            if bottom > visible_bottom:
                lost_vertical += 1
            elif config.margin + font.getlength(line[: m.end()]) > config.page_width:
                lost_horizontal += 1
            elif top // config.page_height != (bottom - 1) // config.page_height:
                split_across_crops += 1  # visible, but cut in two by a page seam
    stats = {"words_lost": lost_vertical + lost_horizontal, "words_lost_below_last_page": lost_vertical,
             "words_lost_past_right_edge": lost_horizontal, "words_cut_by_page_seam": split_across_crops,
             "lines": len(lines)}
    return pages, stats


def timed(fn, min_seconds: float) -> tuple[float, int, Any]:
    """Run ``fn`` repeatedly for at least ``min_seconds`` (>= 2 runs); (s per run, runs, result)."""
    result = fn()  # warm-up (font loading, caches)
    runs, start = 0, time.perf_counter()
    while True:
        result = fn()
        runs += 1
        elapsed = time.perf_counter() - start
        if runs >= 2 and elapsed >= min_seconds:
            return elapsed / runs, runs, result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("render_report.json"))
    parser.add_argument("--min-seconds", type=float, default=1.0, help="minimum timing per method and document")
    parser.add_argument("--pages", type=int, nargs="+", default=[1, 3, 8], help="document sizes in pages")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    config = RenderConfig.from_preset("large")
    corpus = make_corpus(max(args.pages) * 1000 + 2000)
    results = []
    for n in args.pages:
        text = document_of_pages(corpus, n, config)
        words = text.split()

        ours_s, ours_runs, pages = timed(lambda: render_text(text, config), args.min_seconds)
        assert join_pages(pages).split() == words  # nothing lost
        base_s, base_runs, (base_pages, base_stats) = timed(lambda: naive_render(text, config), args.min_seconds)

        visible = len(words) - base_stats["words_lost"]
        row = {
            "document": f"{n}-page",
            "words": len(words),
            "characters": len(text),
            "ours": {
                "pages": len(pages),
                "seconds_per_document": round(ours_s, 5),
                "pages_per_second": round(len(pages) / ours_s, 2),
                "input_words_per_second": round(len(words) / ours_s, 1),
                "words_per_page": round(len(words) / len(pages), 1),
                "words_lost": 0,
                "timed_runs": ours_runs,
            },
            "baseline": {
                "pages": len(base_pages),
                "seconds_per_document": round(base_s, 5),
                "pages_per_second": round(len(base_pages) / base_s, 2),
                "input_words_per_second": round(len(words) / base_s, 1),
                "words_per_page": round(visible / len(base_pages), 1),
                **base_stats,
                "words_lost_fraction": round(base_stats["words_lost"] / len(words), 4),
                "timed_runs": base_runs,
            },
        }
        row["ratio_ours_over_baseline"] = {
            "pages_per_second": round(row["ours"]["pages_per_second"] / row["baseline"]["pages_per_second"], 3),
            "input_words_per_second": round(row["ours"]["input_words_per_second"]
                                            / row["baseline"]["input_words_per_second"], 3),
        }
        results.append(row)
        logger.info("%-7s %5d words | ours: %2d pages %7.1f pages/s, 0 lost | baseline: %d pages %7.1f pages/s, "
                    "%d lost (%.0f%%) | pages/s ratio %.2f", row["document"], len(words), len(pages),
                    row["ours"]["pages_per_second"], len(base_pages), row["baseline"]["pages_per_second"],
                    base_stats["words_lost"], 100 * row["baseline"]["words_lost_fraction"],
                    row["ratio_ours_over_baseline"]["pages_per_second"])

    report = {
        "benchmark": "render",
        "description": "deepsynth.render.render_text vs naive textwrap(100) + one tall image cropped to 4 pages; "
                       "same process, same font and page size; layout + drawing in memory, no PNG encoding",
        "config": {**asdict(config), "baseline_wrap_chars": BASELINE_WRAP, "baseline_max_pages": BASELINE_PAGES},
        "environment": {"python": platform.python_version(), "pillow": PIL.__version__,
                        "machine": platform.machine(), "cpu_count": os.cpu_count(),
                        "load_average_at_start": load_at_start},
        "documents": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %s", args.out)
    return report


if __name__ == "__main__":
    main()
