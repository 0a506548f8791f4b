"""`prepare --engine ray`: conversion and rendering of `deepsynth.data.prepare.prepare` in Ray Data
tasks.

The driver (the process running `prepare`) loads the source, plans the shards, removes duplicate
ids and writes every file exactly as the local engine does; only the two per-record steps move to
Ray: the converter and the renderer, the same batch functions the local engine maps with
`datasets`, handed in by `deepsynth.data.sources` and `deepsynth.data.prepare` (so this module
does not import them back). Rows travel through Ray's object store, so workers need neither the
source files nor the output folder.

Order: the driver feeds row-index-tagged blocks and Ray Data keeps their order
(`preserve_order`), so converted rows and rendered shards come back in input order; every block
is checked against the rows it should hold, so a lost or repeated row fails the run loudly
instead of changing the output.

Failures: a worker that dies (killed, out of memory, its node gone) fails its task, and Ray runs
the task again (Ray Data retries such system failures by default); the results of the failed
attempt are dropped by Ray, so no record is lost or written twice
(`tests/data/test_prepare_ray.py` kills a worker in the middle of a job). A driver that dies loses only the shards not yet written: running the same
command again reuses every finished shard, as with the local engine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from deepsynth.cluster import ordered_execution, require_ray

logger = logging.getLogger(__name__)

__all__ = ["convert", "render_shards", "CONVERT_BLOCK_ROWS", "RENDER_BLOCK_ROWS"]

# Rows per Ray task. Converting a row costs microseconds, so blocks are large enough that Ray's
# per-task overhead (milliseconds) stays small; rendering a row costs tens of milliseconds, so
# render blocks are small: they spread over many workers and a retried task redoes little.
CONVERT_BLOCK_ROWS = 2000
RENDER_BLOCK_ROWS = 16
INDEX = "__deepsynth_index__"
SHARD = "__deepsynth_shard__"


def _to_table(ds: Any):
    """A `datasets.Dataset`'s rows (its selection, in order) as one Arrow table."""
    return ds.with_format("arrow")[:]


def _convert_block(block, *, fn, converter: str, options: dict, schema):
    import pyarrow as pa

    indices = block.column(INDEX).to_pylist()
    batch = block.drop_columns([INDEX]).to_pydict()
    return pa.Table.from_pydict(fn(batch, indices, converter=converter, options=options), schema=schema)


def _render_block(block, *, fn, config: dict, schema):
    import pyarrow as pa

    out = fn({"text": block.column("text").to_pylist()}, config=config)
    columns = {name: block.column(name) for name in schema.names if name in block.column_names}
    columns.update(out)
    return pa.Table.from_pydict({name: columns[name] for name in schema.names}, schema=schema)


def _dataset(table, features):
    import datasets

    return datasets.Dataset(table, info=datasets.DatasetInfo(features=features))


def convert(source_ds: Any, converter: str, options: dict, features: Any, convert_batch: Callable) -> Any:
    """``source_ds`` converted row by row with ``converter`` in Ray tasks: a `datasets.Dataset`
    with the columns ``features`` names, in input order (what the local engine's map returns).
    ``convert_batch``: the local engine's batch function (``batch, indices, *, converter,
    options``), run in the tasks."""
    import pyarrow as pa

    ray = require_ray()
    table = _to_table(source_ds)
    n = table.num_rows
    schema = features.arrow_schema
    if n == 0:
        return _dataset(schema.empty_table(), features)
    table = table.append_column(INDEX, pa.array(range(n), pa.int64()))
    blocks = [table.slice(i, CONVERT_BLOCK_ROWS) for i in range(0, n, CONVERT_BLOCK_ROWS)]
    with ordered_execution(ray):  # a Dataset keeps the context it was made in
        ds = ray.data.from_arrow(blocks).map_batches(
            _convert_block, batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
            fn_kwargs={"fn": convert_batch, "converter": converter, "options": options, "schema": schema},
        )
    parts = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    converted = pa.concat_tables(parts) if parts else schema.empty_table()
    rows = converted.column("_row").to_pylist()
    if rows != list(range(n)):
        raise RuntimeError(f"Ray returned {len(rows)} converted row(s) for {n} input row(s), or out of order; "
                           "nothing was written from them")
    return _dataset(converted, features)


def render_shards(parts: Iterable[tuple[int, Any]], config: dict, features: Any,
                  render_batch: Callable) -> Iterator[tuple[int, Any]]:
    """Render every record of the given shards (``(shard number, datasets.Dataset)``) in Ray
    tasks with ``config`` (`RenderConfig` fields); yields ``(shard number, rendered Dataset with
    the columns of ``features``)`` in the order given, each as soon as Ray has finished it.
    ``render_batch``: the local engine's batch function (``batch, *, config``), run in the tasks."""
    import pyarrow as pa

    ray = require_ray()
    schema = features.arrow_schema
    expected: dict[int, list[str]] = {}
    blocks = []
    for s, part in parts:
        table = _to_table(part)
        expected[s] = table.column("id").to_pylist()
        table = table.append_column(SHARD, pa.array([s] * table.num_rows, pa.int64()))
        blocks += [table.slice(i, RENDER_BLOCK_ROWS) for i in range(0, table.num_rows, RENDER_BLOCK_ROWS)]
    if not blocks:
        return
    out_schema = schema.append(pa.field(SHARD, pa.int64()))
    with ordered_execution(ray):  # a Dataset keeps the context it was made in
        ds = ray.data.from_arrow(blocks).map_batches(
            _render_block, batch_size=None, batch_format="pyarrow", zero_copy_batch=True,
            fn_kwargs={"fn": render_batch, "config": config, "schema": out_schema},
        )
    order = list(expected)
    current: list = []

    def finish(s: int):
        table = pa.concat_tables(current).drop_columns([SHARD])
        ids = table.column("id").to_pylist()
        if ids != expected[s]:
            raise RuntimeError(f"shard {s}: Ray returned {len(ids)} rendered record(s) for {len(expected[s])}, "
                               "or out of order; the shard was not written")
        return s, _dataset(table, features)

    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        shard_of = block.column(SHARD).to_pylist()
        start = 0
        while start < len(shard_of):
            s = shard_of[start]
            end = start
            while end < len(shard_of) and shard_of[end] == s:
                end += 1
            if s != order[0]:
                if not current:
                    raise RuntimeError(f"Ray returned rows of shard {s} before those of shard {order[0]}")
                yield finish(order.pop(0))
                current = []
                if s != order[0]:
                    raise RuntimeError(f"Ray returned rows of shard {s} where shard {order[0]} was due")
            current.append(block.slice(start, end - start))
            start = end
    if current:
        yield finish(order.pop(0))
    if order:
        raise RuntimeError(f"Ray returned no rows for shard(s) {order}")
