"""`prepare --engine ray` on a local 2-CPU Ray instance: the same folder as the local engine (same ids,
records, page bytes: the same files), the same resumability, and no record lost or duplicated when a
worker is killed in the middle of the job."""

from __future__ import annotations

import filecmp
import functools
import json
import os
import signal
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from deepsynth.cluster import ClusterError, RaySettings
from deepsynth.data import pipeline as P
from deepsynth.data import prepare as prepare_module
from deepsynth.data import ray_prepare

FIXTURES = Path(__file__).parent / "fixtures"
_REAL_RENDER = prepare_module._render_batch
LIMIT_S = 300  # per test: several times what one takes on a busy 2-core machine


pytestmark = pytest.mark.usefixtures("hang_guard")  # LIMIT_S above; ray_instance: tests/conftest.py


def _squad(path: Path, n: int) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            words = " ".join(f"w{(i * 7 + k) % 53}" for k in range(20 + (i * 13) % 60))
            ctx = f"Record {i}. The code of item {i} is K{i * 7 % 97}. {words}"
            answer = f"K{i * 7 % 97}"
            unanswerable = i % 9 == 8
            f.write(json.dumps({"id": f"q{i:03d}", "title": "T", "context": ctx, "question": f"Code of item {i}?",
                                "answers": {"text": [] if unanswerable else [answer],
                                            "answer_start": [] if unanswerable else [ctx.index(answer)]}}) + "\n")
    return path


def _same_folders(a: Path, b: Path) -> None:
    """Every file the two runs wrote is identical, byte for byte (the manifest but for its time)."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for rel in files_a:
        if rel.name == "manifest.json":
            ma, mb = (json.loads((root / rel).read_text()) for root in (a, b))
            ma.pop("created"), mb.pop("created")
            assert ma == mb
        else:
            assert filecmp.cmp(a / rel, b / rel, shallow=False), rel


def _ids(out: Path) -> list[str]:
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    return [rid for s in m["shards"] for rid in pq.read_table(out / s["file"], columns=["id"]).column("id").to_pylist()]


def test_ray_engine_writes_the_local_engines_folder(ray_instance, tmp_path, monkeypatch):
    # several blocks per conversion and per shard (16 rows per render block), a shard ending inside one
    monkeypatch.setattr(ray_prepare, "CONVERT_BLOCK_ROWS", 7)
    src = _squad(tmp_path / "squad.jsonl", 40)
    kw = dict(render=True, preset="tiny", shard_size=20, progress=False)
    local = P.prepare(str(src), tmp_path / "local", cache_dir=str(tmp_path / "c1"), **kw)
    local2 = P.prepare(str(src), tmp_path / "local2", cache_dir=str(tmp_path / "c2"), num_proc=2, **kw)
    ray = P.prepare(str(src), tmp_path / "ray", cache_dir=str(tmp_path / "c3"), engine="ray", **kw)
    assert (ray.examples, ray.shards, ray.skipped) == (local.examples, local.shards, local.skipped)
    assert local.examples == 36 and local.shards == 2
    _same_folders(tmp_path / "local", tmp_path / "ray")
    _same_folders(tmp_path / "local", tmp_path / "local2")  # the file depends on the rows, not on the workers
    pages = pq.read_table(tmp_path / "ray" / P.DATA_DIR / "train-00001-of-00002.parquet").column("Image").to_pylist()
    assert all(len(p) >= 1 and p[0]["bytes"].startswith(b"\x89PNG") for p in pages)


def test_ray_engine_on_a_beir_folder_and_a_csv_with_a_mapping(ray_instance, tmp_path):
    for name, kw in (("fiqa", dict(source=str(FIXTURES / "fiqa"))),
                     ("csv", dict(source=str(FIXTURES / "generic.csv"), mapping="text=body,answer=tldr"))):
        local = P.prepare(out=tmp_path / f"{name}-local", cache_dir=str(tmp_path / f"{name}-c1"), progress=False, **kw)
        ray = P.prepare(out=tmp_path / f"{name}-ray", cache_dir=str(tmp_path / f"{name}-c2"), progress=False,
                        engine="ray", **kw)
        assert ray.examples == local.examples > 0
        _same_folders(tmp_path / f"{name}-local", tmp_path / f"{name}-ray")


def test_ray_engine_resumes_a_local_run_and_reuses_finished_shards(ray_instance, tmp_path):
    src = _squad(tmp_path / "squad.jsonl", 20)
    kw = dict(render=True, preset="tiny", shard_size=6, progress=False, cache_dir=str(tmp_path / "c"))
    first = P.prepare(str(src), tmp_path / "out", **kw)
    reference = tmp_path / "reference"
    reference.mkdir()
    for f in (tmp_path / "out").rglob("*"):
        if f.is_file():
            (reference / f.relative_to(tmp_path / "out")).parent.mkdir(parents=True, exist_ok=True)
            (reference / f.relative_to(tmp_path / "out")).write_bytes(f.read_bytes())
    # a run killed after its first two shards: the later shards and their markers are missing
    for s in (1, 2):
        (tmp_path / "out" / P.MARKER_DIR / f"shard-{s:05d}.done").unlink()
        (tmp_path / "out" / P.DATA_DIR / f"train-{s:05d}-of-{first.shards:05d}.parquet").unlink()
    resumed = P.prepare(str(src), tmp_path / "out", engine="ray", **kw)
    assert (resumed.shards_written, resumed.shards_reused) == (2, first.shards - 2)
    _same_folders(reference, tmp_path / "out")
    again = P.prepare(str(src), tmp_path / "out", engine="ray", **kw)
    assert (again.shards_written, again.shards_reused) == (0, first.shards)


def _render_killing_once(batch, *, config, marker, victim):
    """The real renderer, but the first task to meet ``victim`` kills its own worker process."""
    if any(victim in t for t in batch["text"]):
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass  # the retry: render as usual
        else:
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            os.kill(os.getpid(), signal.SIGKILL)
    return _REAL_RENDER(batch, config=config)


def test_a_worker_killed_mid_job_loses_and_duplicates_no_record(ray_instance, tmp_path, monkeypatch):
    src = _squad(tmp_path / "squad.jsonl", 40)
    kw = dict(render=True, preset="tiny", shard_size=10, progress=False)
    P.prepare(str(src), tmp_path / "local", cache_dir=str(tmp_path / "c1"), **kw)
    marker = tmp_path / "killed.pid"
    monkeypatch.setattr(prepare_module, "_render_batch", functools.partial(_render_killing_once, marker=str(marker),
                                                              victim="Record 21."))
    result = P.prepare(str(src), tmp_path / "ray", cache_dir=str(tmp_path / "c2"), engine="ray", **kw)
    assert marker.is_file() and int(marker.read_text()) != os.getpid()  # a worker, not this process, died
    ids = _ids(tmp_path / "ray")
    assert len(ids) == len(set(ids)) == result.examples == len(_ids(tmp_path / "local"))
    _same_folders(tmp_path / "local", tmp_path / "ray")


def test_without_ray_the_engine_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    src = _squad(tmp_path / "squad.jsonl", 3)
    with pytest.raises(ClusterError, match=r"deepsynth\[cluster\]"):
        P.prepare(str(src), tmp_path / "out", engine="ray", progress=False)
    assert not (tmp_path / "out").exists()  # refused before any work
    from deepsynth.cli import app

    result = CliRunner().invoke(app, ["prepare", str(src), "-o", str(tmp_path / "out"), "--engine", "ray"])
    assert result.exit_code == 1
    assert "pip install 'deepsynth[cluster]'" in result.output


def test_bad_engine_and_settings_are_refused(tmp_path):
    src = _squad(tmp_path / "squad.jsonl", 3)
    with pytest.raises(ClusterError, match="engine='spark'"):
        P.prepare(str(src), tmp_path / "out", engine="spark", progress=False)
    with pytest.raises(ClusterError, match="num_cpus=0"):
        RaySettings(num_cpus=0)
    with pytest.raises(ClusterError, match="at least 75 MiB"):
        RaySettings(object_store_memory=1000)
    from deepsynth.cli import app

    result = CliRunner().invoke(app, ["prepare", str(src), "-o", str(tmp_path / "o"), "--address", "auto"])
    assert result.exit_code != 0 and "--address is for --engine ray" in result.output
