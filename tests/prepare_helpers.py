"""Rows and page readers shared by the tests that prepare folders (data, training, quiet runs)."""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image


def squad_rows(n: int, start: int = 0) -> list[dict]:
    """`n` one-sentence SQuAD rows (ids q{start}..), each asking for an item's code."""
    rows = []
    for i in range(start, start + n):
        ctx = f"Item {i} has code K{i * 7 % 97}."
        rows.append({"id": f"q{i}", "title": "T", "context": ctx, "question": f"Code of item {i}?",
                     "answers": {"text": [f"K{i * 7 % 97}"], "answer_start": [ctx.index("K")]}})
    return rows


def stored_pages(folder: Path) -> dict[str, list[bytes]]:
    """Each record's stored PNG pages in a prepared folder, decoded to RGB bytes."""
    out = {}
    for f in sorted((folder / "data").glob("*.parquet")):
        for row in pq.read_table(f).to_pylist():
            out[row["id"]] = [Image.open(io.BytesIO(p["bytes"])).convert("RGB").tobytes() for p in row["Image"]]
    return out
