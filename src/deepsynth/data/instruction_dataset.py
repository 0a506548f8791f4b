"""`InstructionDataset`: a torch Dataset of rendered pages + instruction + answer;
`open_examples`, the one way a path given by a user (an examples file or a folder written by
`deepsynth prepare`) becomes one; and the two helpers users know from the original API
(`create_instruction_dataset_from_qa`, `create_instruction_dataset_from_summarization`)."""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from deepsynth.data.converters import (
    ConversionStats,
    convert_record,
    generic_row,
    squad_row,
)
from deepsynth.data.prepared_folder import DATA_DIR, MANIFEST, shard_files
from deepsynth.data.schema import DataValidationError, InstructionExample
from deepsynth.render import RenderConfig, render_text

logger = logging.getLogger(__name__)

__all__ = [
    "InstructionDataset",
    "open_examples",
    "create_instruction_dataset_from_qa",
    "create_instruction_dataset_from_summarization",
    "IMAGE_COLUMNS",
]

# Columns holding pre-rendered pages, in order of preference ("Image" is what `prepare` writes).
IMAGE_COLUMNS: tuple[str, ...] = ("Image", "images", "image")


def _to_pil(page: Any) -> Image.Image:
    """A pre-rendered page (PIL image, PNG/JPEG bytes, a `datasets` {"bytes", "path"} dict, or a
    file path) as an RGB PIL image."""
    if isinstance(page, Image.Image):
        img = page
    elif isinstance(page, (bytes, bytearray, memoryview)):
        img = Image.open(io.BytesIO(bytes(page)))
    elif isinstance(page, Mapping):
        if page.get("bytes") is not None:
            img = Image.open(io.BytesIO(page["bytes"]))
        elif page.get("path"):
            img = Image.open(page["path"])
        else:
            raise ValueError("pre-rendered page has neither 'bytes' nor 'path'")
    elif isinstance(page, (str, os.PathLike)):
        img = Image.open(page)
    else:
        raise TypeError(f"pre-rendered page must be a PIL image, bytes, a {{'bytes', 'path'}} dict or a path, "
                        f"got {type(page).__name__}")
    return img if img.mode == "RGB" else img.convert("RGB")


def _page_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


class _ColumnPages:
    """Lazy per-example access to an image column (decodes only the row asked for)."""

    def __init__(self, data: Any, column: str, rows: Sequence[int]):
        self.data, self.column, self.rows = data, column, list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list:
        return _page_list(self.data[self.rows[i]][self.column])


class InstructionDataset(Dataset):
    """Examples rendered to pages on the fly (rendering is cheap next to a training step), or
    read from pre-rendered pages.

    examples:            the records; each is validated once here.
    render_config:       how documents become pages; it must match what the model reads
                         (default `RenderConfig()`, 1024 px pages). With pre-rendered pages it is
                         the config they were drawn with, so a trained model can record it.
    default_instruction: used where an example's instruction is empty.
    pages:               optional pre-rendered pages, one entry per example (a list of PIL
                         images / PNG bytes / `datasets` image dicts); an empty entry is rendered.
    source:              where the examples came from (a path), recorded with a model trained on them.

    ``pre_rendered`` tells whether pages come from ``pages`` rather than from rendering.
    """

    def __init__(
        self,
        examples: Sequence[InstructionExample],
        render_config: RenderConfig | None = None,
        default_instruction: str = "",
        pages: Sequence[Any] | None = None,
        source: str | None = None,
    ) -> None:
        for ex in examples:
            ex.validate()
        self.examples = list(examples)
        self.render_config = render_config or RenderConfig()
        self.default_instruction = default_instruction
        if pages is not None and len(pages) != len(self.examples):
            raise ValueError(f"pages has {len(pages)} entries but there are {len(self.examples)} examples")
        self.pages = pages
        self.pre_rendered = pages is not None
        self.source = source
        # What a conversion helper did with every input record (seen / converted / skipped by
        # reason / rejected with row and reason); None for datasets not made by one.
        self.conversion: ConversionStats | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        ex = self.examples[index]
        pre = _page_list(self.pages[index]) if self.pages is not None else []
        if pre:
            images = [_to_pil(p) for p in pre]
        else:
            images = [page.image for page in render_text(ex.text, self.render_config)]
        return {
            "id": ex.id,
            "pages": images,
            "instruction": ex.instruction or self.default_instruction,
            "answer": ex.answer,
        }

    @classmethod
    def from_prepared(cls, path: str | os.PathLike, render_config: RenderConfig | None = None,
                      default_instruction: str = "", cache_dir: str | None = None) -> "InstructionDataset":
        """Open a folder written by `deepsynth prepare` (or one of its Parquet shards). Pages
        come from its ``Image`` column when it was rendered (decoded lazily) and the dataset's
        ``render_config`` is then the folder's; a ``render_config`` that differs is logged as a
        warning naming both, and the folder's pages are still used, since a model must be served
        on the pages it read. An unrendered folder is rendered with ``render_config`` (default
        `RenderConfig()`). ``cache_dir``: where `datasets` keeps its Arrow copy (default: its
        usual cache)."""
        return _open_prepared(Path(path), render_config, default_instruction, cache_dir)


def open_examples(path: str | os.PathLike, render_config: RenderConfig | None = None,
                  default_instruction: str = "", cache_dir: str | None = None) -> InstructionDataset:
    """The examples at ``path`` as an :class:`InstructionDataset`, whatever form they take:

    * a ``.jsonl`` / ``.json`` / ``.parquet`` file of records (:func:`deepsynth.data.read_examples`):
      pages are rendered with ``render_config``;
    * a folder written by ``deepsynth prepare``, one of its Parquet shards, or any Parquet file
      with an ``Image`` column: see :meth:`InstructionDataset.from_prepared` (pre-rendered pages
      are used as they are and the result's ``render_config`` is the one they were drawn with).

    ``render_config`` is the config the caller's model reads (default `RenderConfig()`);
    ``default_instruction`` fills empty instructions. Raises ``FileNotFoundError`` for a missing
    path, ``ValueError`` (naming the path and what to do) for a folder that is not a prepared
    folder, an unfinished or empty one, or a file without examples, and
    `deepsynth.data.prepared_folder.PrepareError` for shards its manifest lists but that are missing."""
    from deepsynth import storage
    from deepsynth.data.schema import read_examples

    path = storage.local_input(path, what="examples")  # a URI: a cached local copy
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir() or (path.suffix.lower() == ".parquet" and _is_prepared_shard(path)):
        return _open_prepared(path, render_config, default_instruction, cache_dir)
    examples = read_examples(path)
    if not examples:
        raise ValueError(f"{path}: the file holds no examples")
    return InstructionDataset(examples, render_config, default_instruction, source=str(path))


def _is_prepared_shard(path: Path) -> bool:
    """A shard inside a prepared folder's data/, or any Parquet file holding rendered pages."""
    import pyarrow.parquet as pq

    if path.parent.name == DATA_DIR and (path.parent.parent / MANIFEST).is_file():
        return True
    names = pq.read_schema(path).names
    return any(c in names for c in IMAGE_COLUMNS)


def _read_manifest(folder: Path) -> dict:
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{folder / MANIFEST}: not valid JSON ({exc.msg} at line {exc.lineno}); "
                         "run `deepsynth prepare` again") from exc
    if not isinstance(manifest, dict):
        raise ValueError(f"{folder / MANIFEST}: expected a JSON object as `deepsynth prepare` writes it")
    return manifest


def _render_config_diff(a: RenderConfig, b: RenderConfig) -> str:
    da, db = asdict(a), asdict(b)
    return ", ".join(f"{k} {da[k]!r} vs {db[k]!r}" for k in da if da[k] != db[k])


def _open_prepared(path: Path, render_config: RenderConfig | None, default_instruction: str,
                   cache_dir: str | None) -> InstructionDataset:
    import datasets

    if path.is_dir():
        folder = path
        if not (folder / MANIFEST).is_file():
            raise ValueError(f"{folder}: not a folder written by `deepsynth prepare` (no {MANIFEST}); pass a "
                             ".jsonl/.json/.parquet file of examples or a prepared folder")
        manifest = _read_manifest(folder)
        if not manifest.get("complete"):
            raise ValueError(f"{folder}: `deepsynth prepare` has not finished writing this folder "
                             f"({MANIFEST} says complete=false); run the same prepare command again to finish it")
        if manifest.get("shards") is None:  # a manifest without a shard list: every Parquet file under data/
            files = sorted((folder / DATA_DIR).glob("*.parquet"))
        else:
            files = shard_files(folder, manifest)
        if not files:
            raise ValueError(f"{folder}: the prepared folder holds no examples (its rejected.jsonl and "
                             "skipped.jsonl say why records were left out)")
    else:
        files = [path]
        folder = path.parent.parent if path.parent.name == DATA_DIR else None
        manifest = _read_manifest(folder) if folder is not None and (folder / MANIFEST).is_file() else None

    data = datasets.Dataset.from_parquet([str(f) for f in files], cache_dir=cache_dir)
    if len(data) == 0:
        raise ValueError(f"{path}: the prepared data holds no examples")
    examples = []
    for i, row in enumerate(data.select_columns([c for c in ("id", "text", "instruction", "answer", "source",
                                                             "meta") if c in data.column_names])):
        row = dict(row)
        meta = row.get("meta")
        if isinstance(meta, str):
            row["meta"] = json.loads(meta) if meta.strip() else {}
        if row.get("meta") is None:
            row.pop("meta", None)
        if row.get("source") is None:
            row.pop("source", None)
        examples.append(InstructionExample.from_dict(row, where=f"{path} row {i + 1}"))

    column = next((c for c in IMAGE_COLUMNS if c in data.column_names), None)
    if column is None:
        # Not rendered: pages are drawn as they are read, with the config the caller's model reads.
        return InstructionDataset(examples, render_config, default_instruction, source=str(path))
    rendered = (manifest or {}).get("render")
    if rendered:
        drawn = RenderConfig(**rendered["config"])
        if render_config is not None and render_config != drawn:
            logger.warning(
                "%s: its pages were rendered at preset %r, which differs from the render config asked for "
                "(%s; folder vs asked). The folder's pages are used as they are, so the dataset's "
                "render_config is the folder's %s, not the asked %s; serve the trained model with it.",
                path, rendered.get("preset"), _render_config_diff(drawn, render_config), drawn, render_config)
    else:
        drawn = render_config or RenderConfig()
        logger.warning("%s: pre-rendered pages without a manifest.json saying how they were drawn; they are "
                       "used as they are and recorded as drawn with %s", path, drawn)
    pages = _ColumnPages(data, column, range(len(examples)))
    return InstructionDataset(examples, drawn, default_instruction, pages=pages, source=str(path))


# --------------------------------------------------------------------------------------------
# the helpers users know


def _load(dataset: Any, split: str) -> Any:
    if isinstance(dataset, (str, os.PathLike)):
        from datasets import load_dataset

        return load_dataset(str(dataset), split=split)
    if hasattr(dataset, "keys") and hasattr(dataset, "values") and not hasattr(dataset, "column_names"):
        # a DatasetDict
        if split not in dataset:
            raise KeyError(f"split {split!r} not in the dataset (splits: {list(dataset.keys())})")
        return dataset[split]
    return dataset


def _image_column(data: Any) -> str | None:
    names = getattr(data, "column_names", None)
    if names is None:
        return None
    return next((c for c in IMAGE_COLUMNS if c in names), None)


def _build(data: Any, row_fn, options: dict, render_config: RenderConfig | None, default_instruction: str,
           what: str) -> InstructionDataset:
    """Convert every row with `deepsynth prepare`'s policy (`converters.convert_record`): rows a
    policy leaves out are skipped, malformed rows rejected, both counted in the dataset's
    ``conversion`` report (and a warning), never aborting the conversion."""
    image_col = _image_column(data)
    examples: list[InstructionExample] = []
    rows_kept: list[int] = []
    list_pages: list = []
    stats = ConversionStats()
    for index, row in enumerate(data):
        stats.seen += 1
        ex, status, reason = convert_record(row_fn, row, index, options)
        if status == "skipped":
            stats.skipped[reason] += 1
            continue
        if status == "rejected":
            rid = ex.id if ex is not None and isinstance(ex.id, str) else (
                row.get("id") if isinstance(row, Mapping) else None)
            stats.rejected.append({"row": index, "id": None if rid is None else str(rid), "reason": reason})
            continue
        stats.converted += 1
        examples.append(ex)
        rows_kept.append(index)
        if image_col is None and isinstance(row, Mapping):
            key = next((c for c in IMAGE_COLUMNS if row.get(c) is not None), None)
            list_pages.append(_page_list(row.get(key)) if key else [])
    if stats.skipped or stats.rejected:
        logger.warning("%s: converted %d of %d records; skipped %s; rejected %d%s", what, len(examples),
                       stats.seen, dict(stats.skipped), len(stats.rejected),
                       f" (first: {stats.rejected[0]['reason']})" if stats.rejected else "")
    if not examples:
        raise DataValidationError(f"{what}: none of the {stats.seen} records converted "
                                  f"(skipped {dict(stats.skipped)}, rejected {len(stats.rejected)}"
                                  f"{'; first: ' + stats.rejected[0]['reason'] if stats.rejected else ''}); "
                                  "check the field names and the no_answer policy")
    if image_col is not None:
        pages: Any = _ColumnPages(data, image_col, rows_kept)
    else:
        pages = list_pages if any(list_pages) else None
    dataset = InstructionDataset(examples, render_config, default_instruction, pages=pages)
    dataset.conversion = stats
    return dataset


def create_instruction_dataset_from_qa(
    dataset: Any,
    context_field: str = "context",
    question_field: str = "question",
    answer_field: str = "answers",
    *,
    no_answer: str = "skip",
    split: str = "train",
    render_config: RenderConfig | None = None,
    source: str = "qa",
) -> InstructionDataset:
    """A Q&A dataset (SQuAD layout by default) as an :class:`InstructionDataset`.

    ``dataset``: a ``datasets.Dataset`` (or DatasetDict, with ``split``), an iterable of dicts, or
    a name/path for ``datasets.load_dataset``. The answer field may be SQuAD's
    ``{"text": [...], "answer_start": [...]}``, a list of strings or a string; the first non-empty
    answer is used. Rows are handled as ``deepsynth prepare`` handles them: questions without an
    answer are skipped or, with ``no_answer="unanswerable"`` (any text), answered with that text;
    malformed rows (an empty answer or context, a missing field) are rejected. Both are counted in
    the result's ``conversion`` report (``.to_dict()``; ``.rejected`` lists row, id and reason)
    and a warning; the conversion never stops at one. Pre-rendered pages in an
    ``Image``/``images``/``image`` column are used instead of rendering."""
    data = _load(dataset, split)
    return _build(data, squad_row, {"no_answer": no_answer, "source": source, "context_field": context_field,
                                    "question_field": question_field, "answer_field": answer_field},
                  render_config, "", "create_instruction_dataset_from_qa")


def create_instruction_dataset_from_summarization(
    dataset: Any,
    text_field: str = "text",
    summary_field: str = "summary",
    default_instruction: str = "Summarize:",
    *,
    instruction_variants: Sequence[str] | None = None,
    seed: int = 0,
    split: str = "train",
    render_config: RenderConfig | None = None,
    source: str = "summarization",
) -> InstructionDataset:
    """A summarisation dataset (``text_field`` -> ``summary_field``) as an
    :class:`InstructionDataset`; every example gets ``default_instruction``, or one of
    ``instruction_variants`` chosen per example (stable across runs). The examples are marked
    ``meta["task"] = "summarization"`` (scored with ROUGE). Pre-rendered pages in an
    ``Image``/``images``/``image`` column are used instead of rendering."""
    data = _load(dataset, split)
    return _build(data, _summary_row_with_id,
                  {"text_field": text_field, "target_field": summary_field, "instruction": default_instruction,
                   "instruction_variants": instruction_variants, "seed": seed, "source": source,
                   "task": "summarization"},
                  render_config, default_instruction, "create_instruction_dataset_from_summarization")


def _summary_row_with_id(row: Mapping, index: int, **options: Any) -> InstructionExample:
    id_field = "id" if isinstance(row, Mapping) and row.get("id") not in (None, "") else None
    return generic_row(row, index, id_field=id_field, **options)
