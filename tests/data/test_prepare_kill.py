"""`prepare` killed with SIGKILL in the middle of a shard resumes with no record lost or duplicated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from deepsynth.data import pipeline as P

# A child process runs prepare; its second shard's write fills the temporary file, says so, and
# then blocks, so the kill lands mid-shard (after shard 0's marker, before shard 1 is renamed).
CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from deepsynth.data import pipeline as P
    from deepsynth.data import prepare as prepare_module

    source, out, cache, signal_file = sys.argv[1:5]
    real = prepare_module.write_atomic
    shards = []

    def write_atomic(path, write):
        if Path(path).suffix == ".parquet":
            shards.append(path)
            if len(shards) == 2:
                def blocked(tmp):
                    write(tmp)
                    Path(signal_file).write_text(str(tmp))
                    time.sleep(600)
                return real(path, blocked)
        return real(path, write)

    prepare_module.write_atomic = write_atomic
    P.prepare(source, out, cache_dir=cache, shard_size=4, progress=False)
""")


def _rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        ctx = f"Document {i}: the code of item {i} is K{i * 7 % 97}."
        rows.append({"id": f"q{i:03d}", "title": "T", "context": ctx, "question": f"Code of item {i}?",
                     "answers": {"text": [f"K{i * 7 % 97}"], "answer_start": [ctx.index(f"K{i * 7 % 97}")]}})
    return rows


def _ids(out: Path) -> list[str]:
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    return [rid for s in m["shards"] for rid in pq.read_table(out / s["file"], columns=["id"]).column("id").to_pylist()]


def _wait_for(cond, proc: subprocess.Popen, what: str, limit_s: float = 240.0) -> None:
    deadline = time.monotonic() + limit_s
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"prepare exited (code {proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_mid_shard_then_resume_loses_and_duplicates_nothing(tmp_path):
    source = tmp_path / "squad.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in _rows(14)), encoding="utf-8")
    cache = str(tmp_path / "cache")
    ref = tmp_path / "ref"
    P.prepare(str(source), ref, cache_dir=cache, shard_size=4, progress=False)
    expected = _ids(ref)
    assert len(expected) == 14 and len(json.loads((ref / "manifest.json").read_text())["shards"]) == 4

    out = tmp_path / "out"
    in_shard = tmp_path / "in-shard-2"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(source), str(out), cache, str(in_shard)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: (out / ".prepare" / "shard-00000.done").is_file(), proc, "shard 0's marker")
        _wait_for(in_shard.is_file, proc, "the second shard's write")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    # what the kill left: an unfinished manifest, one finished shard, half of the next one
    m = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    assert m["complete"] is False
    assert sorted(p.name for p in (out / "data").glob("*.parquet")) == ["train-00000-of-00004.parquet"]
    assert Path(in_shard.read_text()).is_file()  # the temporary file of shard 1
    assert P.validate_path(out, count_pages=False)["records"] == 4  # the finished shard, not the half one

    res = P.prepare(str(source), out, cache_dir=cache, shard_size=4, progress=False)
    assert (res.shards, res.shards_reused, res.shards_written) == (4, 1, 3)
    ids = _ids(out)
    assert ids == expected and len(set(ids)) == len(ids)  # nothing lost, nothing twice, same order
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # the killed run's temp is gone
    assert P.validate_path(out, count_pages=False)["ok"]
