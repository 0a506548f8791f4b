"""`evaluate --engine ray` and `predict --engine ray` on a local 2-CPU Ray instance: model replicas
(Ray actors) write the predictions and scores of the single-process run, also when a replica is
killed in the middle of the job; without Ray the flag names the extra to install."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deepsynth.cli import app
from deepsynth.data.pipeline import prepare
from deepsynth.data.synthetic import SyntheticConfig, generate
from deepsynth.evaluation import ray_inference
from deepsynth.inference.predict import predict

MODEL = "form-reader"
BATCH = 3  # 8 examples: batches of 3, 3 and 2, spread over 2 replicas
LIMIT_S = 600  # per test: several times what the slowest takes on a busy 2-core machine


pytestmark = pytest.mark.usefixtures("hang_guard")  # LIMIT_S above; ray_instance: tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The same 8 examples as a records file (pages drawn by whoever answers) and as a folder of
    pre-rendered pages (`prepare --render` at the reader's preset)."""
    root = tmp_path_factory.mktemp("ray-eval")
    examples = generate(SyntheticConfig(layout="form"), n_docs=6, kinds=("question",))
    examples += generate(SyntheticConfig(layout="form"), n_docs=2, kinds=("transcribe",), seed_offset=1)
    records = root / "records.jsonl"
    records.write_text("".join(json.dumps(ex.to_dict()) + "\n" for ex in examples), encoding="utf-8")
    prepare(str(records), root / "prepared", render=True, preset="tiny", progress=False, cache_dir=str(root / "c"))
    return {"records": records, "prepared": root / "prepared"}


def _run(*args: str) -> dict:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    # Ray's driver prints cluster events (a worker restarted under memory pressure, ...) on stdout
    # out of band; the command's report is the JSON document that starts at a line of its own.
    return json.loads(result.stdout[result.stdout.index("{\n"):] if not result.stdout.startswith("{") else result.stdout)


def _report(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def local_predictions(data):
    """The single-process predictions for the records file."""
    return predict(data["records"], MODEL, batch_size=BATCH)


@pytest.mark.slow
def test_evaluate_on_ray_writes_the_single_process_report(ray_instance, data, local_predictions, tmp_path):
    # stored pages: the replicas decode the folder's PNG bytes
    common = [str(data["prepared"]), "-m", MODEL, "--batch-size", str(BATCH), "--no-record"]
    local = _run("evaluate", *common, "-o", str(tmp_path / "local.json"))
    ray = _run("evaluate", *common, "-o", str(tmp_path / "ray.json"), "--engine", "ray", "--replicas", "2")
    assert ray == local
    a, b = _report(tmp_path / "local.json"), _report(tmp_path / "ray.json")
    assert b == a  # every prediction (with and without the instruction), score and stop reason
    assert [p["id"] for p in b["predictions"]] == [json.loads(line)["id"] for line in
                                                   (data["records"].read_text().splitlines())]
    assert sum(p["prediction"] == p["answer"] for p in a["predictions"]) >= 1  # the reader answers some
    # predict gives evaluate's predictions (the folder's pages are the records' pages, stored losslessly)
    assert a["predictions"] == local_predictions


@pytest.mark.slow
def test_predict_on_ray_equals_local(ray_instance, data, local_predictions, tmp_path):
    # records without pages: the replicas draw them
    result = _run("predict", str(data["records"]), "-m", MODEL, "-o", str(tmp_path / "ray.jsonl"),
                  "--batch-size", str(BATCH), "--engine", "ray", "--replicas", "2")
    assert result["n"] == len(local_predictions) == 8
    lines = (tmp_path / "ray.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == local_predictions
    assert sum(p["prediction"] == p["answer"] for p in local_predictions) >= 1


class _KillingReplica(ray_inference._Replica):
    """A replica whose process kills itself the first time it is given row ``VICTIM``."""

    VICTIM = 4
    MARKER = ""  # set by the test; the class travels by value, with this attribute

    def __call__(self, block):
        rows = block.column("row").to_pylist()
        if self.VICTIM in rows:
            try:
                fd = os.open(self.MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                pass  # the restarted replica answers as usual
            else:
                os.write(fd, str(os.getpid()).encode())
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)
        return super().__call__(block)


@pytest.mark.slow
def test_a_replica_killed_mid_job_loses_and_duplicates_no_prediction(ray_instance, data, local_predictions, tmp_path,
                                                                     monkeypatch):
    marker = tmp_path / "killed.pid"
    monkeypatch.setattr(_KillingReplica, "MARKER", str(marker))
    monkeypatch.setattr(ray_inference, "_Replica", _KillingReplica)
    layout = ray_inference.ReplicaSettings(replicas=2)
    on_ray = predict(data["records"], MODEL, batch_size=BATCH, engine="ray", replicas=layout)
    assert marker.is_file() and int(marker.read_text()) != os.getpid()  # a replica, not this process, died
    assert on_ray == local_predictions


def test_without_ray_the_flag_names_the_extra(data, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    for command in ("evaluate", "predict"):
        result = CliRunner().invoke(app, [command, str(data["records"]), "-m", MODEL, "-o",
                                          str(tmp_path / f"{command}.json"), "--engine", "ray"])
        assert result.exit_code == 1, result.output
        assert "pip install 'deepsynth[cluster]'" in result.output
        assert not (tmp_path / f"{command}.json").exists()


def test_replica_flags_need_the_ray_engine(data, tmp_path):
    result = CliRunner().invoke(app, ["predict", str(data["records"]), "-m", MODEL, "-o", str(tmp_path / "p.jsonl"),
                                      "--replicas", "2"])
    assert result.exit_code != 0 and "are for --engine ray" in result.output
    with pytest.raises(ray_inference.ClusterError, match="replicas=0"):
        ray_inference.ReplicaSettings(replicas=0)


def test_a_layout_the_cluster_cannot_hold_is_named(caplog):
    with caplog.at_level("WARNING", logger=ray_inference.__name__):
        ray_inference._check_resources({"CPU": 2.0}, ray_inference.ReplicaSettings(replicas=2))
        assert not caplog.records
        ray_inference._check_resources({"CPU": 2.0}, ray_inference.ReplicaSettings(replicas=2, num_gpus=1))
    assert len(caplog.records) == 1
    assert "need 2 GPU but the Ray cluster has 0" in caplog.text
