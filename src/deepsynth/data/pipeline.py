"""The dataset pipeline in one import: ``prepare`` (load -> convert -> validate -> [render] ->
sharded Parquet), ``validate_path`` (report on a prepared folder or an examples file) and
``upload`` (to the hub). Each step lives in its own module; this one only gathers their public
names (``from deepsynth.data import pipeline``):

* :mod:`deepsynth.data.sources`: reading a file, dataset folder, BEIR folder or hub name; the
  column mapping; choosing and running the converter;
* :mod:`deepsynth.data.prepare`: ``prepare`` itself (shards, resume, rendering, manifest,
  object-storage staging);
* :mod:`deepsynth.data.validate`: ``validate_path`` and ``format_report``;
* :mod:`deepsynth.data.upload`: ``upload``, ``build_dataset_card``, ``public_manifest``;
* :mod:`deepsynth.data.prepared_folder`: the folder's file names, its manifest and ``PrepareError``.
"""

from __future__ import annotations

from deepsynth.data.prepare import PrepareResult, prepare
from deepsynth.data.prepared_folder import DATA_DIR, MANIFEST, MARKER_DIR, PrepareError
from deepsynth.data.sources import load_source, resolve_mapping
from deepsynth.data.upload import build_dataset_card, public_manifest, upload
from deepsynth.data.validate import format_report, validate_path

__all__ = [
    "PrepareError",
    "PrepareResult",
    "prepare",
    "load_source",
    "resolve_mapping",
    "validate_path",
    "format_report",
    "build_dataset_card",
    "upload",
    "public_manifest",
    "MANIFEST",
    "DATA_DIR",
    "MARKER_DIR",
]
