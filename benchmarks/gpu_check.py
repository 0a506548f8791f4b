"""`make gpu-check`: everything a CUDA machine should answer at once, in one JSON report.

Each step is an existing command, run as a subprocess (a failing step is recorded and the others
still run):

1. `deepsynth check-real-size --device cuda` on DeepSeek-OCR-2 at its real size (random bf16
   weights, no hub): LoRA with the routed experts, crops off and crops on;
2. QLoRA: `deepsynth train` for two steps of LoRA on the 4-bit (NF4) real-size decoder, bf16;
3. each of those against `deepsynth estimate-memory` for the same configuration
   (`measured_over_estimate`: measured peak / estimate);
4. `benchmarks/serve.py --only-engines`: `serve --engine hf` against `--engine vllm` on the
   real-size model in bfloat16 at client concurrency 1, 8 and 32 (needs vLLM's CUDA build in the
   environment `make vllm-env VLLM_CPU=vllm` makes, or DEEPSYNTH_VLLM_PYTHON).

    python benchmarks/gpu_check.py [--out benchmarks/gpu_check_report.json]
    python benchmarks/gpu_check.py --dry-run      # print the plan, check every command takes its options
    python benchmarks/gpu_check.py --tiny         # the same steps on CPU with the tiny model (see TINY_NOTES)

`--dry-run` runs nothing heavy: it prints each step's command line and checks that the command
exists and accepts every option it is given (so the plan cannot drift from the CLI). `--tiny` runs
the plan on a CPU with the tiny preset in float32: LoRA steps through `deepsynth train` (the real-size
check has no tiny form), no 4-bit step (bitsandbytes needs CUDA) and the engine comparison only
where the vLLM environment exists; its report is a smoke test of the harness, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEEPSYNTH = [sys.executable, "-m", "deepsynth.cli"]
SERVE = [sys.executable, str(ROOT / "benchmarks" / "serve.py")]
LEVELS = "1,8,32"
REAL_MODEL = "deepseek-ocr-2"  # check-real-size / estimate-memory name
REAL_PRESET = "random-deepseek-ocr-2"  # the same architecture as a loadable preset (random weights)
GiB = 1024 ** 3
TINY_NOTES = ["tiny preset on CPU in float32: the harness runs end to end; the numbers measure nothing",
              "crops on/off: the tiny preset reads one view, both LoRA steps train the same configuration",
              "QLoRA skipped: bitsandbytes' 4-bit kernels need CUDA"]


@dataclass
class Step:
    """One command of the plan."""

    # Report key.
    name: str
    # The command line (a `deepsynth` subcommand or benchmarks/serve.py).
    argv: list[str]
    # How its result is read: "json" (stdout is the report), "train" (stdout holds the train JSON
    # after any log lines), "serve" (the report file named after --out).
    kind: str
    # `deepsynth estimate-memory` options of the same configuration (None: no memory comparison).
    estimate: list[str] | None = None
    # Seconds before the step is stopped and recorded as timed out.
    timeout_s: int = 3600
    # Why it does not run in this mode (recorded instead of a result).
    skipped: str | None = None
    # Files the step needs, written before it runs: name -> text.
    files: dict[str, str] = field(default_factory=dict)


def _records(n: int = 4) -> str:
    rows = [{"id": f"g{i}", "text": f"Item {i} has code K{i * 7 % 97}. The meeting moved to room {i + 3}.",
             "instruction": f"What is the code of item {i}?", "answer": f"K{i * 7 % 97}"} for i in range(n)]
    return "".join(json.dumps(r) + "\n" for r in rows)


def _recipe(model: str, qlora: bool, precision: str, preset: str) -> str:
    return json.dumps({"model_name": model, "use_lora": True, "use_qlora": qlora, "lora_experts": True,
                       "mixed_precision": precision, "max_steps": 2, "batch_size": 1, "learning_rate": 1e-4,
                       "render_preset": preset, "log_interval": 1, "freeze_vision_encoder": True, "seed": 0})


def plan(work: Path, tiny: bool, vllm_available: bool) -> list[Step]:
    """The steps in order; `tiny` swaps in the CPU forms (module doc)."""
    steps: list[Step] = []
    records = str(work / "records.jsonl")
    if not tiny:
        for crops in ("off", "on"):
            steps.append(Step(
                f"real_size_lora_experts_crops_{crops}",
                DEEPSYNTH + ["check-real-size", "-m", REAL_MODEL, "--device", "cuda", "--crops", crops,
                             "--lora-experts", "on", "--workdir", str(work), "--json"],
                "json", estimate=["-m", REAL_MODEL, "--lora", "--crops", crops, "--lora-experts", "on",
                                  "--precision", "bf16"]))
        steps.append(Step(
            "qlora_4bit", DEEPSYNTH + ["train", str(work / "qlora.yaml"), "--train", records,
                                       "--output-dir", str(work / "qlora-run")],
            "train", estimate=["-m", REAL_MODEL, "--qlora", "--lora-experts", "on", "--precision", "bf16"],
            files={"qlora.yaml": _recipe(REAL_PRESET, True, "bf16", "large"), "records.jsonl": _records()}))
        steps.append(Step(
            "serve_hf_vs_vllm", SERVE + ["--only-engines", "--engine-model", REAL_PRESET, "--engine-dtype", "bfloat16",
                                         "--levels", LEVELS, "--max-new-tokens", "64", "--out", str(work / "serve.json")],
            "serve", skipped=None if vllm_available else "no vLLM environment (make vllm-env VLLM_CPU=vllm)"))
        return steps
    for crops in ("off", "on"):
        steps.append(Step(
            f"tiny_lora_experts_crops_{crops}",
            DEEPSYNTH + ["train", str(work / "tiny.yaml"), "--train", records, "--output-dir", str(work / f"tiny-{crops}")],
            "train", estimate=["-m", "tiny", "--lora", "--lora-experts", "on", "--precision", "fp32"], timeout_s=900,
            files={"tiny.yaml": _recipe("tiny", False, "no", "tiny"), "records.jsonl": _records()}))
    steps.append(Step("qlora_4bit", [], "train", skipped="bitsandbytes' 4-bit kernels need CUDA"))
    steps.append(Step(
        "serve_hf_vs_vllm", SERVE + ["--only-engines", "--engine-model", "tiny", "--engine-dtype", "float32",
                                     "--levels", LEVELS, "--max-new-tokens", "8", "--out", str(work / "serve.json")],
        "serve", timeout_s=1800, skipped=None if vllm_available else "no vLLM environment (make vllm-env)"))
    return steps


def _options_of(argv: list[str]) -> list[str]:
    return [a for a in argv if a.startswith("--")]


def check_plan(steps: list[Step]) -> list[str]:
    """Problems with the plan: a `deepsynth` command that does not exist or does not take one of its
    options, or a serve.py option serve.py lacks. Empty when every command line parses."""
    import typer

    from deepsynth.cli import app

    problems = []
    group = typer.main.get_command(app)
    for step in steps:
        if not step.argv:
            continue
        checks = [(step.argv, step.name)]
        if step.estimate is not None:
            checks.append((DEEPSYNTH + ["estimate-memory"] + step.estimate + ["--json"], f"{step.name} (estimate)"))
        for argv, where in checks:
            if argv[:len(DEEPSYNTH)] == DEEPSYNTH:
                command = group.commands.get(argv[len(DEEPSYNTH)])
                if command is None:
                    problems.append(f"{where}: no `deepsynth {argv[len(DEEPSYNTH)]}` command")
                    continue
                known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
                shown = f"deepsynth {argv[len(DEEPSYNTH)]}"
            else:
                help_text = subprocess.run(argv[:2] + ["--help"], capture_output=True, text=True, timeout=60).stdout
                known = {o for o in _options_of(argv) if o in help_text}
                shown = Path(argv[1]).name
            problems += [f"{where}: {o} is not an option of {shown}"
                         for o in _options_of(argv) if o not in known]
    return problems


def _json_tail(stdout: str) -> dict:
    """The JSON document a command printed last (log lines may come before it)."""
    start = stdout.find("{\n") if not stdout.lstrip().startswith("{") else stdout.index("{")
    return json.loads(stdout[start:])


def run_step(step: Step, work: Path, env: dict) -> dict:
    entry: dict = {"command": " ".join(shlex.quote(a) for a in step.argv)}
    if step.skipped:
        return {**entry, "skipped": step.skipped}
    for name, text in step.files.items():
        (work / name).write_text(text, encoding="utf-8")
    start = time.perf_counter()
    try:
        proc = subprocess.run(step.argv, capture_output=True, text=True, timeout=step.timeout_s, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {**entry, "error": f"timed out after {step.timeout_s} s"}
    entry["seconds"] = round(time.perf_counter() - start, 1)
    if proc.returncode != 0:
        return {**entry, "error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-3000:],
                "stdout_tail": proc.stdout[-2000:]}
    if step.kind == "serve":
        entry["result"] = json.loads(Path(step.argv[step.argv.index("--out") + 1]).read_text())["engines"]
        return entry
    result = _json_tail(proc.stdout)
    entry["result"] = result
    if step.kind == "json":
        entry["measured_gib"] = result.get("measured_gib")
    else:
        metrics = result.get("metrics", {})
        entry["measured_gib"] = (metrics["peak_memory_mb"] / 1024 if metrics.get("peak_memory_mb") is not None
                                 else None)
        entry["measured_kind"] = metrics.get("peak_memory_kind")
    if step.estimate is not None:
        est = subprocess.run(DEEPSYNTH + ["estimate-memory"] + step.estimate + ["--json"], capture_output=True,
                             text=True, timeout=600, env=env, cwd=ROOT)
        if est.returncode == 0:
            entry["estimate"] = json.loads(est.stdout)
            total = entry["estimate"]["total_gib"]
            if entry.get("measured_gib") and total:
                entry["measured_over_estimate"] = round(entry["measured_gib"] / total, 3)
        else:
            entry["estimate_error"] = est.stderr[-2000:]
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "gpu_check_report.json"))
    parser.add_argument("--dry-run", action="store_true", help="Print the plan and check its command lines; run nothing.")
    parser.add_argument("--tiny", action="store_true", help="Run the plan on CPU with the tiny model (a harness test).")
    parser.add_argument("--workdir", help="Folder for the steps' files (default: a temporary folder).")
    parser.add_argument("--skip", action="append", default=[], metavar="STEP",
                        help="Leave out a step by name (repeatable); it is recorded as skipped.")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from deepsynth.vllm.parity import vllm_python

    cuda = torch.cuda.is_available()
    tiny = args.tiny
    if not (cuda or tiny or args.dry_run):
        print("error: no CUDA GPU visible (torch.cuda.is_available() is False); `make gpu-check` is for a CUDA "
              "machine. Use --dry-run to see the plan, or --tiny to run the harness on CPU.", file=sys.stderr)
        return 2
    vllm = vllm_python()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        steps = plan(work, tiny, vllm is not None)
        unknown = sorted(set(args.skip) - {s.name for s in steps})
        if unknown:
            print(f"error: --skip {unknown}: no such step (steps: {[s.name for s in steps]})", file=sys.stderr)
            return 2
        for s in steps:
            if s.name in args.skip:
                s.skipped = "--skip"
        problems = check_plan(steps)
        if args.dry_run:
            print(json.dumps({"mode": "tiny" if tiny else "cuda", "cuda_visible": cuda, "vllm_python": vllm,
                              "steps": [{"name": s.name, "command": " ".join(map(shlex.quote, s.argv)),
                                         "estimate": s.estimate, "skipped": s.skipped} for s in steps],
                              "problems": problems}, indent=2))
            return 1 if problems else 0
        if problems:
            print("error: the plan does not match the CLI:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        report: dict = {"benchmark": "gpu_check", "mode": "tiny" if tiny else "cuda",
                        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
                        "torch": torch.__version__, "vllm_python": vllm, "notes": TINY_NOTES if tiny else [],
                        "plan": [asdict(s) | {"files": sorted(s.files)} for s in steps], "steps": {}}
        start = time.perf_counter()
        for step in steps:
            print(f"[gpu-check] {step.name} ...", flush=True)
            report["steps"][step.name] = entry = run_step(step, work, env)
            status = entry.get("skipped") or entry.get("error") or f"ok ({entry.get('seconds')} s)"
            print(f"[gpu-check] {step.name}: {status}", flush=True)
        report["seconds"] = round(time.perf_counter() - start, 1)
        report["failed"] = sorted(k for k, v in report["steps"].items() if "error" in v)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}; failed steps: {report['failed'] or 'none'}")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
