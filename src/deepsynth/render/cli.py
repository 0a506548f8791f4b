"""``deepsynth render``: render text / Markdown documents to page images.

Output layout (always the same, whether one document or many)::

    OUTDIR/<doc-stem>/page-0001.png, page-0002.png, ...
    OUTDIR/manifest.json

``<doc-stem>`` is the input's file stem made safe (see :func:`safe_name`: no separators, no
leading dots, never empty), so nothing is written or deleted outside OUTDIR whatever the input
is called.

``manifest.json`` lists the render config and, for every document, its source, whether it
was read as Markdown, its pages (file name relative to OUTDIR, exact drawn text, broken-line
indexes) and its stats (see :func:`deepsynth.render.render_stats`: words, pages, the DeepSeek-OCR
mode the preset is drawn for and its vision tokens a page, text tokens and the text tokens per
vision token).  With ``--check`` every page is read back by an independent OCR (the ``ocr``
extra, see :mod:`deepsynth.render.legibility`) and the document gets a ``check`` entry with the
word recall of each page and of the whole.  Documents that fail to render (empty text, more than
``max_pages`` pages) are listed under ``errors`` and make the command exit with code 1; the other
documents are still written.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import typer
from tqdm import tqdm

from ..atomic import write_text_atomic
from .legibility import check_pages, ocr_unavailable
from .renderer import PRESET_ALIASES, PRESET_MODES, PRESETS, RenderConfig, describe_preset, render_stats, render_text

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_PAGE_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")
# Characters kept in an output folder name; everything else (path separators, control
# characters, shell/Windows specials) becomes "_" so a name can never leave OUTDIR.
_UNSAFE_NAME_CHARS = re.compile(r"[^\w.\-]+")
# Long enough to recognise the input, short enough to stay under file-name limits with "-NNN".
MAX_NAME_CHARS = 100


def parse_page_size(value: str) -> tuple[int, int]:
    """Parse ``"WxH"`` into (width, height); raises typer.BadParameter otherwise."""
    m = _PAGE_SIZE.match(value)
    if not m:
        raise typer.BadParameter(f"{value!r} is not WxH (e.g. 1024x1024)", param_hint="'--page-size'")
    return int(m.group(1)), int(m.group(2))


def build_config(preset: str | None = None, font_size: int | None = None, page_size: str | None = None,
                 max_pages: int | None = None, reflow: bool | None = None) -> RenderConfig:
    """RenderConfig from CLI options; bad values raise typer.BadParameter naming the option."""
    if preset is not None and preset not in PRESETS:
        raise typer.BadParameter(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}",
                                 param_hint="'--preset'")
    overrides: dict[str, Any] = {}
    if font_size is not None:
        overrides["font_size"] = font_size
    if page_size is not None:
        overrides["page_width"], overrides["page_height"] = parse_page_size(page_size)
    if max_pages is not None:
        overrides["max_pages"] = max_pages
    if reflow is not None:
        overrides["reflow"] = reflow
    try:
        return RenderConfig.from_preset(preset, **overrides) if preset else RenderConfig(**overrides)
    except ValueError as exc:
        field = str(exc).split("=", 1)[0]
        hint = {"font_size": "'--font-size'", "page_width": "'--page-size'", "page_height": "'--page-size'",
                "max_pages": "'--max-pages'"}.get(field, "'--preset' / '--page-size' / '--font-size'")
        raise typer.BadParameter(str(exc), param_hint=hint) from exc


def safe_name(stem: str) -> str:
    """A folder name made from an input's stem that stays one path component inside OUTDIR.

    Separators and other unsafe characters become "_", leading dots are dropped (no ``.``/``..``
    and no hidden folders), and an empty result becomes "document".
    """
    name = _UNSAFE_NAME_CHARS.sub("_", stem).lstrip(".")[:MAX_NAME_CHARS].rstrip(". ")
    return name or "document"


def _unique_names(sources: list[str]) -> list[str]:
    """Output folder name per source: the sanitised file stem ("stdin" for "-"), made unique with
    -2, -3... (compared case-insensitively, since some file systems are)."""
    names: list[str] = []
    taken: set[str] = set()
    for src in sources:
        stem = "stdin" if src == "-" else safe_name(Path(src).stem)
        name, n = stem, 1
        while name.casefold() in taken:
            n += 1
            name = f"{stem}-{n}"
        taken.add(name.casefold())
        names.append(name)
    return names


def _document_dir(out: Path, name: str) -> Path:
    """OUTDIR/name, refused unless it is a real folder directly inside OUTDIR (not a link out)."""
    out_dir = out / name
    if name != safe_name(name) or out_dir.is_symlink() or out_dir.resolve().parent != out.resolve():
        raise ValueError(f"output folder {str(out_dir)!r} is not a plain folder inside {str(out)!r}")
    return out_dir


def _render_document(job: dict[str, Any]) -> dict[str, Any]:
    """Render one document and write its PNGs (runs in a worker process)."""
    config = RenderConfig(**{**job["config"], "markdown": job["markdown"]})
    try:
        out_dir = _document_dir(Path(job["out"]), job["name"])
        pages = render_text(job["text"], config)
    except ValueError as exc:
        return {"source": job["source"], "name": job["name"], "error": str(exc)}
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("page-*.png"):  # stale pages from an earlier, longer render
        old.unlink()
    entries = []
    for page in pages:
        file = f"page-{page.index + 1:04d}.png"
        page.image.save(out_dir / file, format="PNG")
        entries.append({"file": f"{job['name']}/{file}", "index": page.index, "text": page.text,
                        "broken_lines": list(page.broken_lines)})
    doc = {"source": job["source"], "name": job["name"], "markdown": job["markdown"], "pages": entries,
           "stats": render_stats(job["text"], pages, tokenizer="default", config=config, mode=job["mode"])}
    if job["check"]:
        doc["check"] = check_pages(pages)
    return doc


def render_command(inputs: list[str], out: Path, preset: str | None = None, font_size: int | None = None,
                   page_size: str | None = None, workers: int = 0, markdown: bool = False,
                   max_pages: int | None = None, progress: bool = True, reflow: bool | None = None,
                   check: bool = False) -> dict[str, Any]:
    """Render documents to ``out`` and write ``out/manifest.json``; returns the manifest.

    ``inputs`` are .txt/.md files or ``-`` for stdin; ``.md``/``.markdown`` files (and every input
    when ``markdown`` is True) are laid out as Markdown. ``workers`` = 0 means one per CPU core
    (capped at the number of documents). ``reflow`` overrides the preset's (None: keep it).
    ``check``: read every page back with the OCR and record word recall (needs the ``ocr``
    extra). Raises typer.BadParameter for bad options, missing files or a missing OCR extra,
    before anything is rendered.
    """
    if not inputs:
        raise typer.BadParameter("give at least one input file (or - for stdin)", param_hint="'INPUTS...'")
    if workers < 0:
        raise typer.BadParameter(f"{workers} is out of range: allowed >= 0 (0 = one per CPU core)",
                                 param_hint="'--workers'")
    config = build_config(preset, font_size, page_size, max_pages, reflow)
    if preset in PRESET_ALIASES:
        logger.warning("preset %s", describe_preset(preset))
    if check and (reason := ocr_unavailable()):
        raise typer.BadParameter(reason, param_hint="'--check'")
    if inputs.count("-") > 1:
        raise typer.BadParameter("stdin ('-') can be given only once", param_hint="'INPUTS...'")
    texts: list[str] = []
    for src in inputs:
        if src == "-":
            texts.append(sys.stdin.read())
            continue
        path = Path(src)
        if not path.is_file():
            raise typer.BadParameter(f"file {src!r} does not exist or is not a file", param_hint="'INPUTS...'")
        try:
            texts.append(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise typer.BadParameter(f"cannot read {src!r} as UTF-8 text: {exc}", param_hint="'INPUTS...'") from exc

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base = asdict(config)
    jobs = [
        {"source": src, "name": name, "text": text, "out": str(out), "config": base,
         "markdown": markdown or config.markdown or Path(src).suffix.lower() in (".md", ".markdown"),
         "mode": PRESET_MODES.get(preset or ""), "check": check}
        for src, name, text in zip(inputs, _unique_names(inputs), texts)
    ]
    n_workers = min(workers or os.cpu_count() or 1, len(jobs))
    results: list[dict[str, Any] | None] = [None] * len(jobs)
    bar = tqdm(total=len(jobs), desc="render", unit="doc", disable=not progress)
    try:
        if n_workers <= 1:
            for i, job in enumerate(jobs):
                results[i] = _render_document(job)
                bar.update()
        else:
            # spawn: safe even when the parent process has threads (torch, tokenizers)
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx) as pool:
                futures = {pool.submit(_render_document, job): i for i, job in enumerate(jobs)}
                for fut in as_completed(futures):
                    results[futures[fut]] = fut.result()
                    bar.update()
    finally:
        bar.close()

    documents = [r for r in results if r is not None and "error" not in r]
    errors = [r for r in results if r is not None and "error" in r]
    manifest = {"config": base, "documents": documents, "errors": errors}
    if preset:  # an alias ("large") names another mode than it draws: the manifest says which
        manifest["preset"] = {"name": preset, "is": describe_preset(preset)}
    write_text_atomic(out / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False))
    logger.info("rendered %d document(s) into %s (%d failed)", len(documents), out, len(errors))
    return manifest


def describe(doc: dict[str, Any]) -> str:
    """One line about a rendered document: pages, tokens, compression and (with --check) recall."""
    s = doc["stats"]
    line = (f"{doc['name']}: {s['pages']} page(s), {s['words_per_page']:.0f} words a page; "
            f"{s['mode']} mode, {s['visual_tokens_per_page']} vision tokens a page; {s['text_tokens']} text "
            f"tokens ({s['tokenizer']}): {s['compression_ratio']:.2f} text tokens per vision token")
    if "check" in doc:
        worst = min(doc["check"]["pages"], key=lambda p: p["recall"])
        line += (f"; OCR word recall {doc['check']['recall']:.3f} (lowest: page {worst['index'] + 1}, "
                 f"{worst['recall']:.3f})")
    return line


def register(app: typer.Typer) -> None:
    """Add the ``render`` command to ``app``."""

    @app.command("render")
    def render(
        inputs: list[str] = typer.Argument(..., help=".txt/.md files to render, or - for stdin."),
        out: Path = typer.Option(..., "--out", "-o", help="Output folder (OUTDIR/<stem>/page-0001.png, manifest.json)."),
        preset: Optional[str] = typer.Option(
            None, "--preset", help=f"One of: {', '.join(p for p in PRESETS if p not in PRESET_ALIASES)} "
                                   "(ocr-<mode>-*: DeepSeek-OCR's modes and sizes; tiny: the tiny models' 256 px "
                                   "page); aliases: " + ", ".join(f"{a} = {t}" for a, t in PRESET_ALIASES.items())
                                   + "."),
        font_size: Optional[int] = typer.Option(None, "--font-size", help="Font size in pixels (6-200)."),
        page_size: Optional[str] = typer.Option(None, "--page-size", help="Page size WxH, e.g. 1024x1024."),
        workers: int = typer.Option(0, "--workers", help="Parallel processes (0 = one per CPU core)."),
        markdown: bool = typer.Option(False, "--markdown", help="Read every input as Markdown (.md files always are)."),
        max_pages: Optional[int] = typer.Option(None, "--max-pages", help="Fail a document needing more pages."),
        reflow: Optional[bool] = typer.Option(
            None, "--reflow/--no-reflow",
            help="Join the hard-wrapped lines of each paragraph (lists, headings, tables, code keep their "
                 "lines); default: the preset's (on for the ocr-*-dense presets)."),
        check: bool = typer.Option(False, "--check", help="Read the pages back with an independent OCR (the "
                                   "'ocr' extra) and report word recall per page."),
    ) -> None:
        """Render text / Markdown documents to page images plus a manifest.json."""
        manifest = render_command(inputs, out, preset=preset, font_size=font_size, page_size=page_size,
                                  workers=workers, markdown=markdown, max_pages=max_pages, reflow=reflow,
                                  check=check)
        if "preset" in manifest:
            typer.echo(f"preset {manifest['preset']['is']}")
        for doc in manifest["documents"]:
            typer.echo(describe(doc))
        n_pages = sum(len(d["pages"]) for d in manifest["documents"])
        typer.echo(f"wrote {n_pages} page(s) of {len(manifest['documents'])} document(s) to {out}")
        if manifest["errors"]:
            for err in manifest["errors"]:
                typer.echo(f"error: {err['source']}: {err['error']}", err=True)
            raise typer.Exit(code=1)
