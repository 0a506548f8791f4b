"""`predict` and `evaluate` with `--engine ray --decode vllm`: Ray Data actors each holding one vLLM
engine write what the local (HF, single-process) engine writes.

vLLM lives in the vLLM environment (`make vllm-env`, which also installs Ray there): the Ray driver
and its actors run in a subprocess of that environment's python (tests/evaluation/ray_vllm_side.py);
the local runs happen here. Two vLLM CPU engines start per command (about a minute each on 2 cores):
heavy tier.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from deepsynth.vllm.parity import vllm_python

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
PYTHON = vllm_python()


def _ray_in_vllm_env() -> bool:
    if PYTHON is None:
        return False
    return subprocess.run([PYTHON, "-c", "import ray.data"], capture_output=True).returncode == 0


needs_ray_and_vllm = pytest.mark.skipif(
    not _ray_in_vllm_env(),
    reason="the vLLM environment is absent or has no Ray: run `make vllm-env` (makes .venv-vllm with the cluster "
           "extra) or set DEEPSYNTH_VLLM_PYTHON")


@pytest.mark.slow
@needs_ray_and_vllm
def test_ray_replicas_decoding_with_vllm_write_the_local_engines_output(tmp_path):
    from typer.testing import CliRunner

    from deepsynth.cli import app
    from deepsynth.data.synthetic import SyntheticConfig, generate

    # 4 examples in batches of 2: one batch for each of the 2 replicas
    examples = generate(SyntheticConfig(layout="form"), n_docs=4, kinds=("question",))
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps(ex.to_dict()) + "\n" for ex in examples), encoding="utf-8")
    common = [str(records), "-m", "form-reader", "--batch-size", "2", "--max-new-tokens", "24"]
    for command, target, extra in (("predict", "local.jsonl", []), ("evaluate", "local.json", ["--no-record"])):
        result = CliRunner().invoke(app, [command, *common, "-o", str(tmp_path / target), *extra])
        assert result.exit_code == 0, result.output

    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([PYTHON, str(HERE / "ray_vllm_side.py"), str(records), str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]

    # two Ray workers started one float32 vLLM engine each for predict, two more for evaluate
    engines = json.loads((tmp_path / "engines.json").read_text())
    assert len(engines["predict"]) == 2 and all(d == ["torch.float32"] for d in engines["predict"].values())
    assert sum(len(d) for d in engines["evaluate"].values()) == 4
    assert all(set(d) == {"torch.float32"} for d in engines["evaluate"].values())

    local = (tmp_path / "local.jsonl").read_text()
    assert (tmp_path / "predict.jsonl").read_text() == local
    assert len(local.splitlines()) == 4
    assert any(json.loads(line)["prediction"] == json.loads(line)["answer"] for line in local.splitlines())
    report, on_ray = (json.loads((tmp_path / n).read_text()) for n in ("local.json", "evaluate.json"))
    assert on_ray == report
    assert len(report["predictions"]) == len(report["predictions_no_instruction"]) == 4
    assert all(p["instruction"] == "" for p in report["predictions_no_instruction"])  # the ablation ran too


def test_decode_flag_is_checked(tmp_path):
    from typer.testing import CliRunner

    from deepsynth.cli import app
    from deepsynth.inference.engines import replica_decoder

    records = tmp_path / "r.jsonl"
    records.write_text('{"id": "a", "text": "x: 1", "instruction": "x?", "answer": "1"}\n')
    for command, out in (("evaluate", "e.json"), ("predict", "p.jsonl")):
        common = [command, str(records), "-m", "form-reader", "-o", str(tmp_path / out)]
        result = CliRunner().invoke(app, [*common, "--decode", "onnx", "--engine", "ray"])
        assert result.exit_code == 2 and "'onnx': choose one of hf, vllm" in result.output
        result = CliRunner().invoke(app, [*common, "--decode", "vllm"])
        assert result.exit_code == 2 and "--decode" in result.output and "for --engine ray" in result.output
        result = CliRunner().invoke(app, [*common, "--engine", "ray", "--dtype", "float32"])
        assert result.exit_code == 2 and "--dtype is for --engine vllm and --engine ray --decode vllm" in result.output
        assert not (tmp_path / out).exists()
    assert replica_decoder("hf") is None
    with pytest.raises(ValueError, match="is for the vLLM engine"):
        replica_decoder("hf", "float32")
    try:
        import vllm  # noqa: F401
    except ImportError:  # the project's .venv: the driver says where vLLM is before Ray starts
        with pytest.raises(ValueError, match="make vllm-env"):
            replica_decoder("vllm", "float32")
        result = CliRunner().invoke(app, ["evaluate", str(records), "-m", "form-reader", "-o", str(tmp_path / "e.json"),
                                          "--no-record", "--engine", "ray", "--decode", "vllm"])
        assert result.exit_code == 1 and "make vllm-env" in result.output  # this environment lacks it: not a usage error
