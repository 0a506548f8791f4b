"""Batch inference on Ray: model replicas as Ray actors, each answering through the project's
decoder (`LoadedModel.decoder()`, the path `evaluate`, `ask` and `serve` use).

The driver opens the data as the local path does (`open_examples`), cuts it into blocks of one
decoding batch each (examples ``[k*batch_size, (k+1)*batch_size)``, as the local path batches
them) and hands the blocks to Ray Data, which feeds them to ``replicas`` actors
(`ray.data.Dataset.map_batches` with an actor class). Each actor loads the model once
(`load_bundle`), draws the pages of its batch exactly as `InstructionDataset` does (stored PNG
pages decoded, text rendered with the render config) and answers with `decode_items`, so every
prediction equals the single-process one. Pages travel as the stored PNG bytes, or as text when
they are drawn at answer time, so the driver never decodes or renders a page.

Each replica decodes with the bundle's HF decoder, or with what ``decoder`` builds (a picklable
callable ``(model directory, max_new_tokens) -> (decoder, settings)``; `evaluate/predict --engine
ray --decode vllm` hand `deepsynth.inference.engines.replica_decoder("vllm", dtype)`, one
`VLLMEngine` per replica): any object with `Decoder.run_all`'s rows gives the same records.

Failures: Ray restarts an actor that died and runs its batch again (Ray Data's defaults for actor
pools); rows are checked on return, so a lost or repeated batch fails the run instead of changing
the predictions (`tests/evaluation/test_ray_inference.py` kills a replica in the middle of a job).
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepsynth.cluster import ClusterError, RaySettings, ray_session, require_ray

logger = logging.getLogger(__name__)

__all__ = ["ReplicaSettings", "decode_on_ray"]


@dataclass
class ReplicaSettings:
    """How the model replicas are laid out on the Ray cluster."""

    # Number of model replicas (Ray actors); each holds one copy of the model.
    replicas: int = 1
    # CPUs Ray reserves for each replica.
    num_cpus: float = 1.0
    # GPUs Ray reserves for each replica (0: CPU inference; 1: one GPU each; 0.5: two per GPU).
    num_gpus: float = 0.0
    # Examples per `generate` call (the local path's batch size; the same batches give the same answers).
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ClusterError(f"replicas={self.replicas!r}: must be >= 1")
        if self.batch_size < 1:
            raise ClusterError(f"batch_size={self.batch_size!r}: must be >= 1")
        if self.num_cpus <= 0 or self.num_gpus < 0:
            raise ClusterError(f"num_cpus={self.num_cpus!r}, num_gpus={self.num_gpus!r}: need num_cpus > 0 "
                               "and num_gpus >= 0")


def _page_bytes(page: Any) -> bytes:
    """A page as the driver may ship it: its encoded bytes (PNG when drawn in memory)."""
    from PIL import Image

    if isinstance(page, (bytes, bytearray, memoryview)):
        return bytes(page)
    if isinstance(page, dict):
        if page.get("bytes") is not None:
            return bytes(page["bytes"])
        if page.get("path"):
            return Path(page["path"]).read_bytes()
        raise ValueError("pre-rendered page has neither 'bytes' nor 'path'")
    if isinstance(page, (str, os.PathLike)):
        return Path(page).read_bytes()
    if isinstance(page, Image.Image):
        buf = io.BytesIO()
        page.save(buf, format="PNG")  # lossless: the replica decodes the same pixels
        return buf.getvalue()
    raise TypeError(f"pre-rendered page must be a PIL image, bytes, a {{'bytes', 'path'}} dict or a path, "
                    f"got {type(page).__name__}")


def _stored_pages(dataset, start: int, stop: int) -> list[list[bytes]]:
    """Encoded pages of examples ``start..stop-1`` (an empty list: drawn from the text)."""
    from deepsynth.data.instruction_dataset import _page_list

    pages = dataset.pages
    if pages is None:
        return [[] for _ in range(start, stop)]
    data, column, rows = (getattr(pages, name, None) for name in ("data", "column", "rows"))
    if data is not None and column is not None and rows is not None:
        # a `datasets` image column (a prepared folder): read the stored bytes, decode nothing
        table = data.select_columns([column]).with_format("arrow")[list(rows[start:stop])]
        return [[_page_bytes(p) for p in _page_list(v)] for v in table.column(column).to_pylist()]
    return [[_page_bytes(p) for p in _page_list(pages[i])] for i in range(start, stop)]


def _blocks(dataset, batch_size: int) -> list:
    import pyarrow as pa

    n = len(dataset)
    blocks = []
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        blocks.append(pa.table({
            "row": pa.array(range(start, stop), pa.int64()),
            "example": [json.dumps(dataset.examples[i].to_dict(), ensure_ascii=False) for i in range(start, stop)],
            "pages": pa.array(_stored_pages(dataset, start, stop), pa.list_(pa.binary())),
        }))
    return blocks


class _Replica:
    """One model replica (a Ray actor): loads the bundle once, answers one batch per call."""

    def __init__(self, model: str, render: dict, default_instruction: str, instructions: list,
                 batch_size: int, total: int, max_new_tokens: int | None = None, decoder=None) -> None:
        from deepsynth import storage
        from deepsynth.models.bundle import load_bundle, resolve_generation
        from deepsynth.render import RenderConfig

        # a model in object storage is copied to each replica's own node
        local = str(storage.local_input(model, what="model")) if storage.is_uri(model) else model
        if decoder is None:
            loaded = load_bundle(local)
            settings = resolve_generation(loaded.model, max_new_tokens=max_new_tokens) if max_new_tokens else None
            self.decoder, self.settings = loaded.decoder(settings), None
        else:
            self.decoder, self.settings = decoder(local, max_new_tokens)
        self.render = RenderConfig(**render)
        self.default_instruction = default_instruction
        self.instructions = instructions
        self.batch_size = batch_size
        self.total = total

    def _items(self, block) -> list[dict]:
        from deepsynth.data.instruction_dataset import InstructionDataset
        from deepsynth.data.schema import InstructionExample

        examples = [InstructionExample.from_dict(json.loads(e)) for e in block.column("example").to_pylist()]
        pages = block.column("pages").to_pylist()
        dataset = InstructionDataset(examples, self.render, self.default_instruction,
                                     pages=pages if any(pages) else None)
        return [dataset[i] for i in range(len(dataset))]

    def __call__(self, block):
        import pyarrow as pa

        from deepsynth.evaluation.run import decode_items

        rows = block.column("row").to_pylist()
        whole = list(range(rows[0], min(self.total, rows[0] + self.batch_size)))
        if rows[0] % self.batch_size or rows != whole:
            # answers depend on which examples share a batch (padding): only whole local batches
            raise RuntimeError(f"replica got rows {rows[0]}..{rows[-1]}, not one batch of {self.batch_size}")
        items = self._items(block)
        out: dict[str, list] = {"row": [], "pass": [], "record": []}
        for k, instruction in enumerate(self.instructions):
            records = decode_items(self.decoder, items, self.settings, instruction, len(items))
            for row, record in zip(rows, records):
                out["row"].append(row)
                out["pass"].append(k)
                out["record"].append(json.dumps(record, ensure_ascii=False))
        return pa.table(out)


def _check_resources(have: dict, replicas: ReplicaSettings) -> None:
    """Warn when the cluster cannot hold every replica now: Ray then waits (for an autoscaler to add
    nodes, or forever)."""
    for name, each in (("CPU", replicas.num_cpus), ("GPU", replicas.num_gpus)):
        need = each * replicas.replicas
        if need > have.get(name, 0):
            logger.warning("%d replica(s) x %s %s need %s %s but the Ray cluster has %s: Ray waits for room "
                           "(an autoscaler may add nodes); without it the job does not start", replicas.replicas,
                           each, name, need, name, have.get(name, 0))


def decode_on_ray(model: str, dataset, instructions: Sequence[str | None] = (None,), *,
                  max_new_tokens: int | None = None, replicas: ReplicaSettings | None = None,
                  settings: RaySettings | None = None, decoder=None) -> list[list[dict]]:
    """Prediction records (as `deepsynth.evaluation.run.decode_items` writes them) of every example
    of ``dataset`` (an `InstructionDataset`, e.g. from `open_examples`), once per entry of
    ``instructions`` (None: each example's own instruction; "": none, the ablation), answered by
    replicas of ``model`` on Ray. Returns one list per entry, in the dataset's order.

    decoder: None (each replica loads the bundle's HF decoder) or what builds each replica's
    decoder (see the module's docstring; `deepsynth.inference.engines.replica_decoder`)."""
    require_ray()
    replicas = replicas or ReplicaSettings()
    n = len(dataset)
    if n == 0:
        return [[] for _ in instructions]
    from dataclasses import asdict

    blocks = _blocks(dataset, replicas.batch_size)
    found: list[list[dict | None]] = [[None] * n for _ in instructions]
    with ray_session(settings) as ray:
        _check_resources(ray.cluster_resources(), replicas)
        ds = ray.data.from_arrow(blocks).map_batches(
            _Replica, batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
            fn_constructor_kwargs={"model": model, "render": asdict(dataset.render_config),
                                   "default_instruction": dataset.default_instruction,
                                   "instructions": list(instructions), "batch_size": replicas.batch_size,
                                   "total": n, "max_new_tokens": max_new_tokens, "decoder": decoder},
            compute=ray.data.ActorPoolStrategy(size=replicas.replicas), num_cpus=replicas.num_cpus,
            num_gpus=replicas.num_gpus or None,
        )
        # blocks come back in any order: each row names its example
        for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row, k, record in zip(block.column("row").to_pylist(), block.column("pass").to_pylist(),
                                      block.column("record").to_pylist()):
                if found[k][row] is not None:
                    raise RuntimeError(f"Ray returned example {row} twice; no predictions were written")
                found[k][row] = json.loads(record)
    missing = [i for i in range(n) if any(f[i] is None for f in found)]
    if missing:
        raise RuntimeError(f"Ray returned no prediction for {len(missing)} example(s) (first: row {missing[0]}); "
                           "no predictions were written")
    return found  # type: ignore[return-value]
