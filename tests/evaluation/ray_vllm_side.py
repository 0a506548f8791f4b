"""The vLLM side of tests/evaluation/test_ray_vllm.py, run with the vLLM environment's python.

    python tests/evaluation/ray_vllm_side.py RECORDS OUT_DIR

Starts a local Ray instance of 2 CPUs, then runs ``predict`` and ``evaluate`` with ``--engine ray
--decode vllm --dtype float32 --replicas 2`` through the command line (which joins that instance),
writing OUT_DIR/predict.jsonl and OUT_DIR/evaluate.json. OUT_DIR/engines.json says, after each
command, which Ray worker processes started a vLLM engine and in which dtype (read from the
workers' logs, where vLLM writes its start-up line): the evidence that the replicas decoded with
vLLM and not with the HF decoder.
"""

import json
import re
import sys
from pathlib import Path

START = re.compile(r"Initializing a V1 LLM engine .*?, dtype=([\w.]+),")


def engines_started(logs: Path) -> dict[str, list[str]]:
    """{worker log file stem: [dtype of each vLLM engine it started]}."""
    found: dict[str, list[str]] = {}
    for path in sorted(logs.glob("worker-*")):
        dtypes = START.findall(path.read_text(errors="replace"))
        if dtypes:
            found.setdefault(path.stem, []).extend(dtypes)
    return found


def main() -> None:
    import ray
    from typer.testing import CliRunner

    from deepsynth.cli import app

    records, out = sys.argv[1], Path(sys.argv[2])
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # never a running cluster
    logs = Path(ray._private.worker.global_worker.node.get_logs_dir_path())
    flags = ["--engine", "ray", "--decode", "vllm", "--dtype", "float32", "--replicas", "2", "--batch-size", "2",
             "--max-new-tokens", "24"]
    engines = {}
    try:
        for command, target, extra in (("predict", "predict.jsonl", []), ("evaluate", "evaluate.json", ["--no-record"])):
            result = CliRunner().invoke(app, [command, records, "-m", "form-reader", "-o", str(out / target),
                                              *flags, *extra])
            if result.exit_code != 0:
                raise SystemExit(f"{command} failed ({result.exit_code}): {result.output}\n{result.exception!r}")
            engines[command] = engines_started(logs)
    finally:
        ray.shutdown()
    (out / "engines.json").write_text(json.dumps(engines))


if __name__ == "__main__":  # vLLM spawns its engine processes: the work stays behind this guard
    main()
