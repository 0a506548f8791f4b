"""Two processes on CPU (gloo) through `accelerate launch`: both train, gradients are all-reduced
(weights identical although each rank saw different examples), one checkpoint from the main process."""

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("ddp_worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    assert accelerate, "accelerate CLI not found"
    # --multi_gpu selects the torchrun launcher; ACCELERATE_USE_CPU makes each process a CPU rank
    # (accelerate then uses DistributedType.MULTI_CPU with the gloo backend).
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           str(WORKER), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank-{i}.json").read_text()) for i in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2] and {r["backend"] for r in ranks} == {"gloo"}
    assert [r["steps"] for r in ranks] == [3, 3]
    assert ranks[0]["seen"] != ranks[1]["seen"]  # each rank got its own shard of every batch
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # ...and yet the weights are identical
    assert [r["is_main"] for r in ranks] == [True, False]
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(("checkpoint-", ".checkpoint"))) == \
        ["checkpoint-000003"]
    assert ranks[0]["checkpoints"] == [str(run / "checkpoint-000003")] and ranks[1]["checkpoints"] == []
    state = run / "checkpoint-000003" / "state"
    assert sorted(p.name for p in state.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    assert len(list((run / "checkpoint-000003").glob("*.safetensors"))) == 1
