"""estimate-memory: exact parameter counts on meta, activation estimate against autograd's saved tensors, CLI."""

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from deepsynth.models import Collator, load_model
from deepsynth.models.cli import register
from deepsynth.models.memory import GiB, MINILM, QWEN25_7B, QWEN25_VL_7B, estimate_memory, format_table
from deepsynth.render import RenderConfig, render_text
from deepsynth.training.config import TrainerConfig
from deepsynth.training.peft_utils import trainable_parameter_report
from deepsynth.training.trainer import apply_training_options


def test_real_configs_on_meta_give_published_sizes():
    full = estimate_memory("deepseek-ocr-2")
    assert 3.3e9 < full.parameters < 3.5e9 and full.trainable_parameters == full.parameters
    assert full.seq_len == 257 + 512  # one 1024 px page (16 x 16 + separator) + text
    # bf16: 2 bytes weights, 2 grads, 4 AdamW moments per parameter
    assert full.weights_gib == pytest.approx(full.parameters * 2 / GiB, rel=1e-3)
    assert full.optimizer_gib == pytest.approx(2 * full.gradients_gib, rel=1e-3)
    assert estimate_memory("deepseek-ocr-2", precision="fp32").weights_gib == pytest.approx(2 * full.weights_gib, rel=1e-3)
    lora = estimate_memory("deepseek-ocr-2", lora=True, batch_size=4)
    assert lora.total_gib < full.total_gib
    linear4 = estimate_memory("deepseek-ocr-2", lora=True, batch_size=4, lora_experts=False)
    assert estimate_memory("deepseek-ocr-2", lora=True, batch_size=8, lora_experts=False).activations_gib == \
        pytest.approx(2 * linear4.activations_gib, rel=1e-3)  # per-token activations scale with the batch
    assert estimate_memory(QWEN25_VL_7B, lora=True).parameters == pytest.approx(8.29e9, rel=0.01)
    # Text encoders: Qwen2.5-7B (3584 wide) needs a 3584->1280 projection; MiniLM 384->1280.
    qwen = estimate_memory("deepseek-ocr-2", lora=True, text_encoder=QWEN25_7B)
    assert qwen.parameters - lora.parameters == pytest.approx(7.07e9 + 3584 * 1280 + 1280, rel=0.01)
    assert qwen.trainable_parameters - lora.trainable_parameters == 3584 * 1280 + 1280
    mini = estimate_memory("deepseek-ocr-2", lora=True, text_encoder="all-MiniLM-L6-v2", text_encoder_trainable=True)
    assert mini.trainable_parameters - lora.trainable_parameters == pytest.approx(22.7e6 + 384 * 1280 + 1280, rel=0.01)
    qlora = estimate_memory(QWEN25_VL_7B, qlora=True)
    assert qlora.method == "qlora" and qlora.weights_gib < 0.5 * estimate_memory(QWEN25_VL_7B, lora=True).weights_gib
    assert "| deepseek-ocr-2 | lora |" in format_table([lora])


def test_expert_lora_and_crops_on_the_real_config():
    linear = estimate_memory("deepseek-ocr-2", lora=True, lora_experts=False)
    experts = estimate_memory("deepseek-ocr-2", lora=True)
    assert linear.trainable_parameters == 3_978_240 and "experts frozen" in linear.options
    # 11 MoE layers x 64 experts x r=16 x ((1792 + 1280) gate_up + (1280 + 896) down)
    assert experts.trainable_parameters - linear.trainable_parameters == 11 * 64 * 16 * (1792 + 1280 + 1280 + 896)
    # peft keeps a folded copy of every adapted expert tensor for backward: 11 x 64 x (1792 x 1280 + 1280 x 896) bf16
    folded = 11 * 64 * (1792 * 1280 + 1280 * 896) * 2 / GiB
    assert experts.activations_gib - linear.activations_gib == pytest.approx(folded * 12 / 11, rel=0.02)
    crops = estimate_memory("deepseek-ocr-2", lora=True, crops=True, text_tokens=16)
    assert crops.seq_len == 257 + 4 * 144 + 16 and "crops" in crops.options  # 2 x 2 crops of 768 px
    assert estimate_memory("deepseek-ocr", lora=True, text_tokens=0).seq_len == 16 * 17 + 1
    # v1 Gundam: 2 x 2 crops of 640 px, each row of the crops' 20 x 20 grid ends in a newline token
    assert estimate_memory("deepseek-ocr", lora=True, crops=True, text_tokens=0).seq_len == 16 * 17 + 1 + 20 * 21
    with pytest.raises(ValueError, match="no local crops"):
        estimate_memory(QWEN25_VL_7B, lora=True, crops=True)


@pytest.mark.parametrize("experts", [True, False])
def test_tiny_moe_counts_match_the_real_adapters(experts):
    model, _ = load_model("tiny-moe")
    wrapped = apply_training_options(model, TrainerConfig(use_lora=True, lora_rank=4, lora_experts=experts))
    report = trainable_parameter_report(wrapped)
    assert (report["groups"]["routed_experts"]["lora"] > 0) == experts
    assert estimate_memory("tiny-moe", lora=True, lora_rank=4, lora_experts=experts).trainable_parameters == \
        report["trainable"]


def test_tiny_counts_match_the_real_modules():
    model, _ = load_model("tiny")
    assert estimate_memory("tiny").parameters == sum(p.numel() for p in model.parameters())
    wrapped = apply_training_options(model, TrainerConfig(use_lora=True, lora_rank=4))
    assert estimate_memory("tiny", lora=True, lora_rank=4).trainable_parameters == \
        trainable_parameter_report(wrapped)["trainable"]


@pytest.mark.parametrize("name,lora", [("tiny", False), ("tiny", True), ("tiny-qwen2-vl", False)])
def test_activation_estimate_is_close_to_what_autograd_keeps(name, lora):
    model, processor = load_model(name)
    if lora:
        model = apply_training_options(model, TrainerConfig(use_lora=True))
    page = render_text("alpha: 12 " * 30, RenderConfig.from_preset("tiny"))[0].image
    batch = Collator(processor)([{"pages": [page], "instruction": "alpha? " * 3, "answer": "12" * 10}] * 4)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    measured = sum(n for ptr, n in saved.items() if ptr not in params)
    estimate = estimate_memory(name, lora=lora, batch_size=4, seq_len=batch["input_ids"].shape[1],
                               precision="fp32", page_size=224)
    assert 0.6 < estimate.activations_gib * GiB / measured < 1.5


def test_cli_prints_a_table_and_json_and_rejects_bad_input():
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # keep typer in multi-command mode
    runner = CliRunner()
    result = runner.invoke(app, ["estimate-memory", "--model", "deepseek-ocr-2", "--lora", "--batch-size", "2",
                                 "--text-encoder", MINILM])
    assert result.exit_code == 0, result.output
    assert "| deepseek-ocr-2 | lora |" in result.output and MINILM in result.output
    result = runner.invoke(app, ["estimate-memory", "--model", "deepseek-ocr-2", "--json", "--precision", "fp32"])
    assert json.loads(result.output)["precision"] == "fp32"
    result = runner.invoke(app, ["estimate-memory", "--model", "deepseek-ocr-2", "--precision", "fp8"])
    assert result.exit_code != 0 and "precision must be one of" in result.output
    result = runner.invoke(app, ["estimate-memory", "--model", "deepseek-ocr-2", "--lora", "--crops", "on",
                                 "--lora-experts", "off"])
    assert result.exit_code == 0 and "| deepseek-ocr-2 | lora | crops, experts frozen |" in result.output
    result = runner.invoke(app, ["estimate-memory", "--model", "deepseek-ocr-2", "--crops", "yes"])
    assert result.exit_code != 0 and "on' or 'off'" in result.output
    result = runner.invoke(app, ["estimate-memory", "--model", "no-such/model-anywhere"])
    assert result.exit_code != 0 and "cannot read the config" in result.output


def test_docs_table_is_what_the_estimator_prints():
    from pathlib import Path

    from deepsynth.models.memory import common_table

    doc = (Path(__file__).parents[2] / "docs" / "memory.md").read_text()
    assert common_table() in doc, "docs/memory.md is stale: regenerate with `python -m deepsynth.models.memory`"
