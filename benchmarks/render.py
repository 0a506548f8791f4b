"""Benchmark the page renderer against the previous renderer and the naive approach before both.

Three renderers in one process, on the same documents, fonts and pages, so their ratios are
meaningful even on a busy machine:

* ``ours``: ``deepsynth.render.render_text`` (word bitmaps cached and reused);
* ``previous``: the renderer as it was before that cache (commit ddc1723, read from the git history
  at run time): every page of ``ours`` must be pixel-identical to it (checked every run);
* ``baseline`` (the original code): wrap every paragraph at a fixed 100 characters with
  ``textwrap``, draw all lines on one tall image, crop the first four page heights. Whatever lies
  below four pages, or to the right of the page edge, is lost (computed from geometry).

Two presets: ``readable`` (ocr-base-readable: 1024 px, DejaVu Sans 20 px) and ``dense`` (the
ocr-base-dense geometry; the text is reflowed up front and blank lines keep their full height,
so that the previous renderer, which has neither option, draws the same pages). Documents of
about 1, 3 and 8 pages of each. Timings cover layout + drawing in memory (no PNG encoding);
``warm``: caches filled by an earlier render (a long-running process), ``cold``: every cache
emptied before each render (a fresh process).

    python benchmarks/render.py [--out benchmarks/render_report.json] [--min-seconds 1.0]
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
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
from pathlib import Path
from typing import Any

import PIL
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from deepsynth.render import RenderConfig, join_pages, reflow_text, render_text  # noqa: E402
from deepsynth.render import renderer as ours_module  # noqa: E402
from deepsynth.render import fonts as ours_fonts  # noqa: E402
from deepsynth.render import wrap as ours_wrap  # noqa: E402
from deepsynth.render.renderer import FONT_DIR, load_font, resolve_font_path  # noqa: E402

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


PREVIOUS_COMMIT = "ddc1723"  # the renderer before the word-bitmap cache


def load_previous():
    """The previous renderer, read from the project's git history (no copy of it is kept in the
    tree), reading the shipped fonts."""
    import subprocess
    import tempfile

    root = Path(__file__).resolve().parent.parent
    try:
        source = subprocess.run(["git", "show", f"{PREVIOUS_COMMIT}:src/deepsynth/render/renderer.py"], cwd=root,
                                check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as err:
        raise SystemExit(f"benchmarks/render.py compares against the renderer of commit {PREVIOUS_COMMIT}, read "
                         f"with git; this checkout has no such history ({err})") from None
    path = Path(tempfile.mkdtemp(prefix="deepsynth-previous-renderer-")) / "renderer_previous.py"
    path.write_text(source, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("renderer_previous", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    module.FONT_DIR = FONT_DIR
    return module


def clear_caches(*modules) -> None:
    """Empty the width and bitmap caches (fonts stay loaded: both renderers share that cost)."""
    for module in modules:
        for name in ("_cached_token_width", "_kern"):  # the previous renderer's, in its one module
            if hasattr(module, name):
                getattr(module, name).cache_clear()
        if hasattr(module, "clear_word_cache"):
            module.clear_word_cache()
        if module is ours_module:  # ours keeps its width caches in the wrap and fonts modules
            ours_wrap.clear_width_cache()
            ours_fonts.kern.cache_clear()


def digest(pages) -> str:
    h = hashlib.sha256()
    for p in pages:
        h.update(p.image.tobytes())
        h.update(p.text.encode())
    return h.hexdigest()[:16]


def timed(fns: dict[str, Any], min_seconds: float, before: dict[str, Any] | None = None
          ) -> dict[str, tuple[float, int, Any]]:
    """Time several functions interleaved (one call of each per round, so a busy machine slows them
    alike) until each has run >= 3 times and for >= ``min_seconds``: name -> (s per run, runs, result).
    ``before[name]`` runs, untimed, before every call of ``fns[name]``."""
    before = before or {}
    spent = dict.fromkeys(fns, 0.0)
    results: dict[str, Any] = {}
    for name, fn in fns.items():  # warm-up (font loading, caches)
        if name in before:
            before[name]()
        results[name] = fn()
    runs = 0
    while runs < 3 or min(spent.values()) < min_seconds:
        for name, fn in fns.items():
            if name in before:
                before[name]()
            start = time.perf_counter()
            results[name] = fn()
            spent[name] += time.perf_counter() - start
        runs += 1
    return {name: (spent[name] / runs, runs, results[name]) for name in fns}


def speed(n_pages: int, words: int, seconds: float, runs: int) -> dict[str, Any]:
    return {"seconds_per_document": round(seconds, 5), "pages_per_second": round(n_pages / seconds, 2),
            "input_words_per_second": round(words / seconds, 1), "timed_runs": runs}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("render_report.json"))
    parser.add_argument("--min-seconds", type=float, default=1.0, help="minimum timing per method and document")
    parser.add_argument("--pages", type=int, nargs="+", default=[1, 3, 8], help="document sizes in pages")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    load_at_start = [round(x, 2) for x in os.getloadavg()]
    previous = load_previous()
    dense = RenderConfig.from_preset("ocr-base-dense")
    presets = {
        "readable": RenderConfig.from_preset("ocr-base-readable"),
        "dense": dataclasses.replace(dense, reflow=False, blank_line_height=1.0, max_pages=200),
    }
    results = []
    for preset, config in presets.items():
        prev_config = previous.RenderConfig(**{f.name: getattr(config, f.name)
                                               for f in dataclasses.fields(previous.RenderConfig)})
        corpus = make_corpus(max(args.pages) * (1000 if preset == "readable" else 5000) + 2000)
        if preset == "dense":
            corpus = reflow_text(corpus)
        for n in args.pages:
            text = document_of_pages(corpus, n, config)
            words = text.split()
            t = timed({"ours_warm": lambda: render_text(text, config),
                       "ours_cold": lambda: render_text(text, config),
                       "previous_warm": lambda: previous.render_text(text, prev_config),
                       "previous_cold": lambda: previous.render_text(text, prev_config),
                       "baseline": lambda: naive_render(text, config)}, args.min_seconds,
                      # the cold runs empty the shared caches: a warm run is preceded by an untimed render
                      before={"ours_cold": lambda: clear_caches(ours_module),
                              "previous_cold": lambda: clear_caches(previous),
                              "ours_warm": lambda: render_text(text, config),
                              "previous_warm": lambda: previous.render_text(text, prev_config)})
            (warm, warm_runs, pages), (cold, cold_runs, _) = t["ours_warm"], t["ours_cold"]
            (p_warm, p_warm_runs, prev_pages), (p_cold, p_cold_runs, _) = t["previous_warm"], t["previous_cold"]
            base_s, base_runs, (base_pages, base_stats) = t["baseline"]
            assert join_pages(pages).split() == words  # nothing lost
            identical = digest(pages) == digest(prev_pages)
            assert identical, f"{preset} {n}-page: pages differ from the previous renderer"

            visible = len(words) - base_stats["words_lost"]
            n_ours = len(pages)
            row = {
                "preset": preset,
                "document": f"{n}-page",
                "words": len(words),
                "characters": len(text),
                "ours": {"pages": n_ours, "words_per_page": round(len(words) / n_ours, 1), "words_lost": 0,
                         "warm": speed(n_ours, len(words), warm, warm_runs),
                         "cold": speed(n_ours, len(words), cold, cold_runs)},
                "previous": {"pages": len(prev_pages), "pixel_identical_to_ours": identical,
                             "warm": speed(len(prev_pages), len(words), p_warm, p_warm_runs),
                             "cold": speed(len(prev_pages), len(words), p_cold, p_cold_runs)},
                "baseline": {
                    "pages": len(base_pages),
                    "words_per_page": round(visible / len(base_pages), 1),
                    **speed(len(base_pages), len(words), base_s, base_runs),
                    **base_stats,
                    "words_lost_fraction": round(base_stats["words_lost"] / len(words), 4),
                },
            }
            row["ratios_input_words_per_second"] = {
                "ours_over_previous_warm": round(p_warm / warm, 3),
                "ours_over_previous_cold": round(p_cold / cold, 3),
                "ours_warm_over_baseline": round(base_s / warm, 3),
                "ours_cold_over_baseline": round(base_s / cold, 3),
            }
            results.append(row)
            logger.info("%-8s %-7s %5d words | ours %2d pages: %6.1f pages/s warm, %6.1f cold | previous: %6.1f "
                        "warm, %6.1f cold (identical pages) | baseline %6.1f pages/s, %d words lost | "
                        "ours/previous %.2fx warm %.2fx cold", preset, row["document"], len(words), n_ours,
                        row["ours"]["warm"]["pages_per_second"], row["ours"]["cold"]["pages_per_second"],
                        row["previous"]["warm"]["pages_per_second"], row["previous"]["cold"]["pages_per_second"],
                        row["baseline"]["pages_per_second"], base_stats["words_lost"],
                        row["ratios_input_words_per_second"]["ours_over_previous_warm"],
                        row["ratios_input_words_per_second"]["ours_over_previous_cold"])

    report = {
        "benchmark": "render",
        "description": "deepsynth.render.render_text (ours) vs the previous renderer (frozen copy, pixel-identical "
                       "pages required) vs naive textwrap(100) + one tall image cropped to 4 pages; same process, "
                       "same font and page size; layout + drawing in memory, no PNG encoding; warm = caches "
                       "filled by an earlier render, cold = caches emptied before each render",
        "configs": {name: {**dataclasses.asdict(c), "baseline_wrap_chars": BASELINE_WRAP,
                           "baseline_max_pages": BASELINE_PAGES} for name, c in presets.items()},
        "environment": {"python": platform.python_version(), "pillow": PIL.__version__,
                        "machine": platform.machine(), "cpu_count": os.cpu_count(),
                        "load_average_at_start": load_at_start,
                        "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "documents": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %s", args.out)
    return report


if __name__ == "__main__":
    main()
