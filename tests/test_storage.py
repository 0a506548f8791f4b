"""Object storage (`deepsynth.storage`) for every command's paths, against a local S3-compatible
server (moto) that the tests start on 127.0.0.1; credentials and endpoint reach s3fs only through
the standard environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL).

prepare -> validate -> train -> evaluate -> predict with s3:// inputs and outputs, an interrupted
prepare resumed from what the bucket holds (on a machine without the first run's local stage), and
a protocol that is unknown or not installed: one clear error, never a local folder named after it."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from deepsynth import storage
from deepsynth.cli import app
from deepsynth.data import pipeline as P
from deepsynth.data import prepare as prepare_module
from deepsynth.data.synthetic import SyntheticConfig, generate

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

BUCKET = "deepsynth-test"
MODEL = "form-reader"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 with one bucket; the environment points s3fs at it."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        mp.setenv("DEEPSYNTH_CACHE", str(tmp_path_factory.mktemp("deepsynth-cache")))
        import fsspec

        fsspec.filesystem("s3").clear_instance_cache()  # no client made before the endpoint was set
        fs = fsspec.filesystem("s3", skip_instance_cache=True)
        fs.mkdir(BUCKET)
        yield fs
    server.stop()


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("records")
    examples = generate(SyntheticConfig(layout="form"), n_docs=5, kinds=("question",))
    path = root / "records.jsonl"
    path.write_text("".join(json.dumps(ex.to_dict()) + "\n" for ex in examples), encoding="utf-8")
    return path


def _ok(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result


def _keys(fs, prefix: str) -> set[str]:
    fs.invalidate_cache()
    return {k[len(f"{BUCKET}/{prefix}/"):] for k in fs.find(f"{BUCKET}/{prefix}")}


# ---- errors -----------------------------------------------------------------------------------

def test_uri_detection():
    assert storage.is_uri("s3://b/x") and storage.is_uri("gs://b") and storage.is_uri("memory://x")
    assert not storage.is_uri("runs/x") and not storage.is_uri("file:///tmp/x") and not storage.is_uri("squad_v2")
    assert not storage.is_uri(Path("s3://b/x"))  # a Path is local by construction
    assert storage.join("s3://b/x/", "data", "a.parquet") == "s3://b/x/data/a.parquet"


def test_an_unknown_protocol_is_one_clear_error_and_no_local_folder(records, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["prepare", str(records), "--out", "nosuch://bucket/prep"])
    assert result.exit_code == 1
    assert "unknown storage protocol 'nosuch'" in result.output
    assert list(tmp_path.iterdir()) == []  # neither 'nosuch:' nor anything else


@pytest.mark.skipif(importlib.util.find_spec("adlfs") is not None, reason="adlfs is installed here")
def test_a_protocol_whose_package_is_missing_names_the_package(records, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for args in (["prepare", str(records), "--out", "az://container/prep"],
                 ["validate", "az://container/prep"],
                 ["predict", "az://container/records.jsonl", "-m", MODEL, "-o", str(tmp_path / "p.jsonl")]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code != 0, args
        assert "az://" in result.output and "'adlfs' package" in result.output, result.output
    assert list(tmp_path.iterdir()) == []


# ---- S3 round trips -----------------------------------------------------------------------------

def test_prepare_writes_to_s3_and_validate_reads_it(s3, records, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = f"s3://{BUCKET}/plain"
    out = _ok("prepare", str(records), "--out", uri, "--shard-size", "2").output
    assert uri in out
    assert not (tmp_path / "s3:").exists() and list(tmp_path.iterdir()) == []  # the bug
    keys = _keys(s3, "plain")
    assert {"manifest.json", "rejected.jsonl", "skipped.jsonl"} <= keys
    manifest = json.loads(s3.cat_file(f"{BUCKET}/plain/manifest.json"))
    assert manifest["complete"] and sum(s["rows"] for s in manifest["shards"]) == 5
    assert {s["file"] for s in manifest["shards"]} <= keys and len(manifest["shards"]) == 3

    # the same bytes as a local run
    P.prepare(str(records), tmp_path / "local", shard_size=2, progress=False)
    for s in manifest["shards"]:
        assert s3.cat_file(f"{BUCKET}/plain/{s['file']}") == (tmp_path / "local" / s["file"]).read_bytes()

    report = json.loads(_ok("validate", uri, "--json").stdout)
    assert report["ok"] and report["records"] == 5

    # a source in the bucket
    s3.put_file(str(records), f"{BUCKET}/inputs/records.jsonl")
    result = P.prepare(f"s3://{BUCKET}/inputs/records.jsonl", tmp_path / "from-s3", shard_size=2, progress=False)
    assert result.examples == 5
    for s in manifest["shards"]:
        assert (tmp_path / "from-s3" / s["file"]).read_bytes() == (tmp_path / "local" / s["file"]).read_bytes()


def test_an_interrupted_prepare_resumes_from_the_bucket(s3, records, tmp_path, monkeypatch):
    uri = f"s3://{BUCKET}/resume"
    real = prepare_module._write_shard
    calls = {"n": 0}

    def dies_on_third(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "_write_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        P.prepare(str(records), uri, shard_size=2, progress=False)
    keys = _keys(s3, "resume")
    assert len([k for k in keys if k.startswith("data/")]) == 2
    assert len([k for k in keys if k.startswith(".prepare/")]) == 2
    assert not json.loads(s3.cat_file(f"{BUCKET}/resume/manifest.json"))["complete"]

    # another machine: no local stage, only the bucket
    shutil.rmtree(storage.cache_root())
    monkeypatch.setattr(prepare_module, "_write_shard", real)
    result = P.prepare(str(records), uri, shard_size=2, progress=False)
    assert (result.shards_reused, result.shards_written, result.examples) == (2, 1, 5)
    assert result.out == uri
    assert json.loads(s3.cat_file(f"{BUCKET}/resume/manifest.json"))["complete"]


def test_concurrent_copies_of_one_uri_share_one_whole_copy(s3):
    from concurrent.futures import ThreadPoolExecutor

    for i in range(6):
        s3.pipe_file(f"{BUCKET}/shared/part-{i}.txt", f"part {i}\n".encode() * 2000)
    with ThreadPoolExecutor(4) as pool:
        copies = list(pool.map(lambda _: storage.local_input(f"s3://{BUCKET}/shared"), range(4)))
    assert len(set(copies)) == 1
    assert sorted(f.name for f in copies[0].iterdir()) == [f"part-{i}.txt" for i in range(6)]
    assert all((copies[0] / f"part-{i}.txt").read_text() == f"part {i}\n" * 2000 for i in range(6))
    assert not [f for f in copies[0].parent.parent.iterdir() if f.name.endswith(".tmp")]  # no temporaries left
    s3.pipe_file(f"{BUCKET}/shared/part-0.txt", b"changed")
    assert (storage.local_input(f"s3://{BUCKET}/shared") / "part-0.txt").read_text() == "changed"


def test_overwrite_removes_the_earlier_runs_objects_from_the_bucket(s3, records):
    uri = f"s3://{BUCKET}/overwrite"
    P.prepare(str(records), uri, shard_size=2, progress=False)
    assert len([k for k in _keys(s3, "overwrite") if k.startswith("data/")]) == 3
    with pytest.raises(P.PrepareError, match=f"{uri} holds the output of a different prepare run"):
        P.prepare(str(records), uri, shard_size=5, progress=False)
    P.prepare(str(records), uri, shard_size=5, progress=False, overwrite=True)
    keys = _keys(s3, "overwrite")
    assert sorted(k for k in keys if k.startswith(("data/", ".prepare/"))) == [
        ".prepare/shard-00000.done", "data/train-00000-of-00001.parquet"]
    assert json.loads(s3.cat_file(f"{BUCKET}/overwrite/manifest.json"))["plan"]["shard_size"] == 5


@pytest.mark.slow
def test_prepare_validate_train_evaluate_predict_round_trip_through_s3(s3, records, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = f"s3://{BUCKET}/rt/prep"
    _ok("prepare", str(records), "--out", data, "--render", "--preset", "tiny", "--shard-size", "3")
    assert json.loads(_ok("validate", data, "--json").stdout)["ok"]

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({"model_name": MODEL, "output_dir": "unused", "batch_size": 2, "max_steps": 2,
                                      "learning_rate": 1e-4, "render_preset": "tiny", "log_interval": 1,
                                      "save_interval": 1, "keep_checkpoints": 1, "seed": 3}))
    s3.put_file(str(recipe), f"{BUCKET}/rt/tiny.yaml")
    run = f"s3://{BUCKET}/rt/run"
    out = _ok("train", f"s3://{BUCKET}/rt/tiny.yaml", "--train", data, "--output-dir", run).stdout
    report = json.loads(out[out.index("{"):])
    assert report["metrics"]["train_steps"] == 2 and report["metrics"]["final_model"] == f"{run}/final"
    keys = _keys(s3, "rt/run")
    assert {"config.yaml", "metrics.jsonl"} <= keys
    assert any(k.startswith("final/") for k in keys)
    checkpoints = {k.split("/")[0] for k in keys if k.startswith("checkpoint-")}
    assert checkpoints == {"checkpoint-000002"}  # keep_checkpoints=1: the older one was removed from the bucket too
    assert not any(Path(k).name.endswith(".tmp") for k in keys)

    # resumed on "another machine" (no local stage): the newest checkpoint comes from the bucket
    shutil.rmtree(storage.cache_root())
    out = _ok("train", f"s3://{BUCKET}/rt/tiny.yaml", "--train", data, "--output-dir", run,
              "--resume", "latest", "--set", "max_steps=3").stdout
    assert json.loads(out[out.index("{"):])["metrics"]["train_steps"] == 3
    logged = [json.loads(line) for line in s3.cat_file(f"{BUCKET}/rt/run/metrics.jsonl").decode().splitlines()]
    assert any(r.get("resumed_from", "").endswith("checkpoint-000002") for r in logged)
    assert {k.split("/")[0] for k in _keys(s3, "rt/run") if k.startswith("checkpoint-")} == {"checkpoint-000003"}

    model = f"{run}/final"
    _ok("evaluate", data, "-m", model, "-o", f"s3://{BUCKET}/rt/eval.json", "--batch-size", "5")
    _ok("predict", data, "-m", model, "-o", f"s3://{BUCKET}/rt/pred.jsonl", "--batch-size", "5")
    evaluated = json.loads(s3.cat_file(f"{BUCKET}/rt/eval.json"))
    predicted = [json.loads(line) for line in s3.cat_file(f"{BUCKET}/rt/pred.jsonl").decode().splitlines()]

    # the same commands on local copies give the same files
    local_model = tmp_path / "model"
    s3.get(f"{BUCKET}/rt/run/final/", str(local_model), recursive=True)
    local_data = tmp_path / "prep"
    s3.get(f"{BUCKET}/rt/prep/", str(local_data), recursive=True)
    _ok("evaluate", str(local_data), "-m", str(local_model), "-o", str(tmp_path / "eval.json"), "--batch-size", "5",
        "--no-record")
    _ok("predict", str(local_data), "-m", str(local_model), "-o", str(tmp_path / "pred.jsonl"), "--batch-size", "5")
    local_eval = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["scores"] == local_eval["scores"] and evaluated["n"] == 5
    assert predicted == [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert len(predicted) == 5
    assert not (tmp_path / "s3:").exists()


def _render_noting_nodes(batch, *, config, notes, hold_s):
    """The real renderer; each call first leaves a file named after the Ray node it runs on, then
    waits ``hold_s`` so that a node can be removed while the call is in progress."""
    import time
    import uuid

    import ray

    node = ray.get_runtime_context().get_node_id()
    (Path(notes) / f"{node}-{uuid.uuid4().hex}").write_text(str(len(batch["text"])))
    time.sleep(hold_s)
    return prepare_module._render_batch(batch, config=config)  # in the worker: the module's own, not the test's patch


@pytest.mark.slow
def test_prepare_on_a_multi_node_ray_cluster_spreads_reads_and_writes_s3_and_survives_a_lost_node(
        s3, tmp_path, monkeypatch):
    """Several raylets on this machine (ray.cluster_utils.Cluster: a head without CPUs and two 1-CPU
    worker nodes, so every task runs on a worker node); the source and the output are in the bucket.
    The render tasks run on both worker nodes; one worker node is removed while a task of its is in
    progress; the shards are byte for byte the local engine's."""
    import functools
    import sys
    import threading

    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from deepsynth.cluster import RaySettings

    examples = generate(SyntheticConfig(layout="form"), n_docs=48, kinds=("question",))
    source = tmp_path / "records.jsonl"
    source.write_text("".join(json.dumps(ex.to_dict()) + "\n" for ex in examples), encoding="utf-8")
    s3.put_file(str(source), f"{BUCKET}/cluster/records.jsonl")
    notes = tmp_path / "notes"
    notes.mkdir()
    real = prepare_module._render_batch
    wrapped = functools.partial(_render_noting_nodes, notes=str(notes), hold_s=4.0)
    monkeypatch.setattr(prepare_module, "_render_batch", wrapped)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

    store = 100 * 1024 * 1024
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "object_store_memory": store, "include_dashboard": False})
    removed: dict = {}
    try:
        workers = [cluster.add_node(num_cpus=1, object_store_memory=store) for _ in range(2)]
        cluster.wait_for_nodes()
        victim = workers[0]

        def remove_when_busy():
            # the first render call on the victim node: remove that node while the call is held
            for _ in range(1200):
                if any(f.name.startswith(victim.node_id) for f in notes.iterdir()):
                    cluster.remove_node(victim, allow_graceful=False)
                    removed["node"] = victim.node_id
                    return
                threading.Event().wait(0.1)

        remover = threading.Thread(target=remove_when_busy, daemon=True)
        remover.start()
        result = P.prepare(f"s3://{BUCKET}/cluster/records.jsonl", f"s3://{BUCKET}/cluster/out", render=True,
                           preset="tiny", shard_size=20, progress=False, engine="ray",
                           ray_settings=RaySettings(address=cluster.address))
        remover.join(5)
        worker_ids = {w.node_id for w in workers}
    finally:
        cluster.shutdown()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert removed.get("node") == victim.node_id, "the victim node never ran a render task"
    used = {f.name.rsplit("-", 1)[0] for f in notes.iterdir()}
    assert used == worker_ids  # both worker nodes rendered; the head (no CPUs) did not
    assert (result.examples, result.shards) == (48, 3)

    monkeypatch.setattr(prepare_module, "_render_batch", real)
    P.prepare(str(source), tmp_path / "local", render=True, preset="tiny", shard_size=20, progress=False)
    manifest = json.loads(s3.cat_file(f"{BUCKET}/cluster/out/manifest.json"))
    assert manifest["complete"]
    for s in manifest["shards"]:
        assert s3.cat_file(f"{BUCKET}/cluster/out/{s['file']}") == (tmp_path / "local" / s["file"]).read_bytes()


def _replica_node(nodes):
    """The first of ``nodes`` (ray.cluster_utils nodes) whose raylet runs a model replica (a Ray Data
    actor over `_Replica`), found through the process tree; None while there is none."""
    import psutil
    from ray._private import ray_constants

    for node in nodes:
        raylet = psutil.Process(node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid)
        for child in raylet.children(recursive=True):
            try:
                if "_Replica" in " ".join(child.cmdline()):
                    return node
            except psutil.Error:
                continue
    return None


@pytest.mark.slow
def test_predict_on_a_multi_node_ray_cluster_from_s3_survives_a_lost_node(s3, tmp_path):
    """`predict --engine ray` with the model, the data and the output in the bucket, two replicas on a
    cluster of several raylets (a head without CPUs, three 1-CPU worker nodes: the two replicas are on
    two different nodes by construction). A node is removed 3 s after a replica process appears on it (while that
    replica loads the model or answers; which of the two is not observed): Ray restarts the replica
    on the spare node and runs its batches there; the predictions equal the local engine's."""
    import threading

    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from deepsynth.cluster import RaySettings
    from deepsynth.inference.predict import predict
    from deepsynth.evaluation.ray_inference import ReplicaSettings
    from deepsynth.models.registry import resolve

    examples = generate(SyntheticConfig(layout="form"), n_docs=16, kinds=("question",))
    source = tmp_path / "records.jsonl"
    source.write_text("".join(json.dumps(ex.to_dict()) + "\n" for ex in examples), encoding="utf-8")
    s3.put_file(str(source), f"{BUCKET}/infer/records.jsonl")
    model_dir = Path(resolve(MODEL))
    for f in model_dir.rglob("*"):
        if f.is_file():
            s3.put_file(str(f), f"{BUCKET}/infer/model/{f.relative_to(model_dir).as_posix()}")
    local = predict(str(source), MODEL, batch_size=2)

    store = 100 * 1024 * 1024
    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 0, "object_store_memory": store, "include_dashboard": False})
    events: dict = {}
    try:
        workers = [cluster.add_node(num_cpus=1, object_store_memory=store) for _ in range(3)]
        cluster.wait_for_nodes()

        def remove_a_replica_node():
            for _ in range(3000):
                node = _replica_node(workers)
                if node is not None:
                    threading.Event().wait(3.0)  # the replica loads the model and starts answering
                    cluster.remove_node(node, allow_graceful=False)
                    events["removed"] = node.node_id
                    return
                threading.Event().wait(0.1)

        mover = threading.Thread(target=remove_a_replica_node, daemon=True)
        mover.start()
        records = predict(f"s3://{BUCKET}/infer/records.jsonl", f"s3://{BUCKET}/infer/model",
                          f"s3://{BUCKET}/infer/pred.jsonl", batch_size=2, engine="ray",
                          replicas=ReplicaSettings(replicas=2), ray_settings=RaySettings(address=cluster.address))
        mover.join(5)
    finally:
        cluster.shutdown()
    assert events.get("removed"), "no replica node was found to remove"
    assert records == local
    stored = [json.loads(line) for line in s3.cat_file(f"{BUCKET}/infer/pred.jsonl").decode().splitlines()]
    assert stored == local and len(stored) == 16
