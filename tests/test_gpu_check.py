"""`make gpu-check` (benchmarks/gpu_check.py): on this CPU machine, the dry run prints the CUDA plan
(real-size LoRA with experts, crops off and on; QLoRA 4-bit; HF vs vLLM at 1/8/32; each memory step
against estimate-memory) and checks every command line against the CLI; --tiny runs the harness."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_dry_run_prints_the_cuda_plan_and_every_command_parses(gpu_check, capsys):
    assert gpu_check.main(["--dry-run"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["problems"] == []
    steps = {s["name"]: s for s in shown["steps"]}
    assert list(steps) == ["real_size_lora_experts_crops_off", "real_size_lora_experts_crops_on", "qlora_4bit",
                           "serve_hf_vs_vllm"]
    for crops in ("off", "on"):
        command = steps[f"real_size_lora_experts_crops_{crops}"]["command"]
        assert "check-real-size" in command and "--device cuda" in command and f"--crops {crops}" in command
        assert "--lora-experts on" in command
        assert steps[f"real_size_lora_experts_crops_{crops}"]["estimate"][:3] == ["-m", "deepseek-ocr-2", "--lora"]
    assert "--qlora" in steps["qlora_4bit"]["estimate"]
    serve = steps["serve_hf_vs_vllm"]["command"]
    assert "--levels 1,8,32" in serve and "--engine-dtype bfloat16" in serve


def test_a_plan_that_drifted_from_the_cli_is_caught(gpu_check, tmp_path):
    steps = gpu_check.plan(tmp_path, tiny=False, vllm_available=True)
    steps[0].argv = steps[0].argv + ["--no-such-option"]
    steps[1].estimate = steps[1].estimate + ["--bogus"]
    steps[3].argv = steps[3].argv + ["--nope"]
    problems = gpu_check.check_plan(steps)
    assert len(problems) == 3
    assert any("--no-such-option" in p and "check-real-size" in p for p in problems)
    assert any("--bogus" in p and "estimate" in p for p in problems)
    assert any("--nope" in p for p in problems)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real check")
def test_without_a_gpu_the_real_run_refuses_with_what_to_do(gpu_check, tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "--dry-run" in err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.slow
def test_tiny_run_writes_one_report(gpu_check, tmp_path):
    out = tmp_path / "report.json"
    assert gpu_check.main(["--tiny", "--skip", "serve_hf_vs_vllm", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["mode"] == "tiny" and report["failed"] == []
    for crops in ("off", "on"):
        step = report["steps"][f"tiny_lora_experts_crops_{crops}"]
        assert step["result"]["metrics"]["train_steps"] == 2
        assert step["measured_gib"] > 0 and step["estimate"]["method"] == "lora"
        assert step["measured_over_estimate"] == round(step["measured_gib"] / step["estimate"]["total_gib"], 3)
    assert "CUDA" in report["steps"]["qlora_4bit"]["skipped"]
    assert report["steps"]["serve_hf_vs_vllm"]["skipped"] == "--skip"
