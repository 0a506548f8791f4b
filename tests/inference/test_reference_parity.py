"""Our HF engine against vLLM's NATIVE DeepSeek-OCR / DeepSeek-OCR-2 classes (code we did not write).

The same random weights (tiny widths, the released architecture's fixed options: 1024 px global
view, 640 / 768 px crops, learned-query readout, MoE decoder layer) are written in the layout each
native class loads and answered greedily in float32 on both sides from the same prompt token ids;
prompt ids, answer tokens and each token's log-probability must agree (1e-3). The vLLM side runs in
the vLLM environment (`make vllm-env`) through tests/inference/reference_boot.py, which gives vLLM's
processor a stand-in for the three torchvision transforms it imports (torchvision's wheels do not
import on this CPU machine). Skipped only where that environment is absent.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from deepsynth.vllm import reference
from deepsynth.vllm.export import ExportError, native_adapter, native_config
from deepsynth.vllm.parity import vllm_python

HERE = Path(__file__).parent
PYTHON = vllm_python()
needs_vllm = pytest.mark.skipif(PYTHON is None, reason="the vLLM environment is absent: run `make vllm-env` "
                                                       "(makes .venv-vllm) or set DEEPSYNTH_VLLM_PYTHON")


@pytest.fixture(autouse=True)
def _boot(monkeypatch):
    monkeypatch.setattr(reference, "SIDE_COMMAND", [str(HERE / "reference_boot.py")])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def page(width: int, height: int, seed: int) -> Image.Image:
    img = Image.new("RGB", (width, height), "white")
    draw, rng = ImageDraw.Draw(img), random.Random(seed)
    for i in range(30):
        draw.text((rng.randint(0, width - 60), rng.randint(0, height - 20)), f"key{i}: {rng.randint(10, 99)}",
                  fill=(0, 0, 0))
    return img


CASES = [  # family, crop mode, page size: crops need a page wider than one 768 px tile (2 x 1 crops)
    (reference.OCR2, "none", (640, 640)),
    (reference.OCR2, "tiles", (1536, 768)),
    (reference.V1, "none", (640, 640)),
    (reference.V1, "tiles", (1280, 640)),  # Gundam: 2 x 1 crops of 640 px
]


@pytest.mark.slow
@needs_vllm
@pytest.mark.parametrize("family,crop_mode,size", CASES, ids=[f"{f}-{c}" for f, c, _ in CASES])
def test_hf_engine_matches_vllm_native_class(tmp_path, family, crop_mode, size):
    model = reference.save_fixture(tmp_path / "model", family, crop_mode)
    pages = [page(*size, 1), page(*size, 2)]
    report = reference.check_reference(str(model), pages, ["read", "key3?"], max_new_tokens=12)
    print(json.dumps(report, indent=1))
    assert report["family"] == family and report["crop_mode"] == crop_mode
    assert report["vision_sizes"] == "checkpoint"  # tiny widths: vLLM's classes built at them
    for answer in report["answers"]:
        assert answer["prompt_identical"], answer  # vLLM expanded the page into our image tokens
        assert answer["tokens_identical"], answer
        assert answer["hf_tokens"] == 12 or answer["hf_answer"] is not None
        assert answer["max_abs_logprob_diff"] <= reference.LOGPROB_TOLERANCE
    if crop_mode == "tiles":  # the global view's tokens plus two crops' (OCR-2: 2 x 144, v1: 2 x 100 + newlines)
        assert report["answers"][0]["prompt_tokens"] > 256 + 2 * 100
    assert report["agree"]


@pytest.mark.slow
@needs_vllm
@pytest.mark.parametrize("family", [reference.OCR2, reference.V1])
def test_released_vision_widths_match_vllm_native_class_as_shipped(tmp_path, family):
    """The vision towers at the released widths (SAM ViT-B, the 896 x 24 encoder / CLIP-L), the
    decoder tiny: vLLM's native class runs exactly as shipped (nothing built at other sizes)."""
    model = reference.save_fixture(tmp_path / "model", family, "none", released_vision=True)
    report = reference.check_reference(str(model), [page(640, 640, 1)], ["read"], max_new_tokens=6)
    print(json.dumps(report, indent=1))
    assert report["vision_sizes"] == "built-in"
    assert report["agree"], report


@pytest.mark.slow
@needs_vllm
def test_check_reference_command_writes_report(tmp_path):
    from typer.testing import CliRunner

    from deepsynth.cli import app

    model = reference.save_fixture(tmp_path / "model", reference.OCR2, "none")
    page(640, 640, 3).save(tmp_path / "page.png")
    examples = tmp_path / "examples.jsonl"
    examples.write_text(json.dumps({"image": str(tmp_path / "page.png"), "instruction": "read"}) + "\n"
                        + json.dumps({"text": "alpha: 07\nbravo: 42", "instruction": "bravo"}) + "\n")
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["check-reference", str(model), "--examples", str(examples),
                                      "--max-new-tokens", "8", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["agree"] and len(report["answers"]) == 2
    assert report["reference"].endswith("DeepseekOCR2ForCausalLM")
    assert "answers token-identical" in result.output


def test_native_config_refuses_what_vllm_fixes_in_code():
    model, _, _ = reference.tiny_native_ocr2()
    config = model.config.to_dict()
    native = native_config(config, vision_sizes="checkpoint")
    assert native["projector_config"]["input_dim"] == 64
    assert native["language_config"]["qk_nope_head_dim"] == 0  # plain multi-head attention in vLLM
    with pytest.raises(ExportError, match="vision sizes built in"):
        native_config(config)  # the released widths only, by default
    config["vision_config"]["encoder_config"]["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    with pytest.raises(ExportError, match="encoder_rope_theta"):
        native_config(config, vision_sizes="checkpoint")


def test_fold_image_runs_and_errors():
    assert reference.fold_image_runs([0, 9, 9, 9, 5, 6], 9, [3]) == [0, 9, 5, 6]
    with pytest.raises(reference.ReferenceError, match="image tokens for 1 pages, not 2"):
        reference.fold_image_runs([0, 9, 9, 5], 9, [2, 2])


@pytest.mark.slow
@needs_vllm
def test_lora_finetune_exported_for_vllm_answers_as_our_engine(tmp_path):
    """A few LoRA steps of our Trainer (adapters on attention, MLPs and the routed experts of the MoE
    layer) on the OCR-2 fixture; `export_vllm` merges the adapter bundle into vLLM's native layout,
    and vLLM's native class answers as our engine does with the merged adapters."""
    from deepsynth.data.synthetic import SyntheticConfig, generate
    from deepsynth.vllm.export import export_vllm
    from deepsynth.training.config import TrainerConfig
    from deepsynth.training.trainer import Trainer

    base = reference.save_fixture(tmp_path / "base", reference.OCR2, "none")
    config = TrainerConfig(model_name=str(base), output_dir=str(tmp_path / "run"), batch_size=1, max_steps=2,
                           use_lora=True, lora_rank=4, lora_experts=True, learning_rate=5e-2, log_interval=1)
    metrics, _ = Trainer(config).train(generate(SyntheticConfig(facts_per_doc=2), 2, "train"))
    adapter = tmp_path / "run" / "adapter"  # the adapters (final/ holds them merged)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    assert any("experts" in t for t in adapter_config.get("target_parameters") or []), adapter_config
    native = export_vllm(adapter, tmp_path / "native", vision_sizes="checkpoint")
    pages = [page(640, 640, 4)]
    report = reference.check_reference(str(adapter), pages, ["read"], max_new_tokens=10, native_dir=native)
    before = reference.check_reference(str(base), pages, ["read"], max_new_tokens=10)
    print(json.dumps(report, indent=1))
    assert report["agree"], report
    assert report["answers"][0]["max_abs_logprob_diff"] <= reference.LOGPROB_TOLERANCE
    # the adapters changed what the model says (so the export carried them)
    assert report["answers"][0]["hf_answer"] != before["answers"][0]["hf_answer"] or \
        report["answers"][0]["max_abs_logprob_diff"] != before["answers"][0]["max_abs_logprob_diff"]


@pytest.mark.slow
@needs_vllm
def test_lora_adapters_served_as_vllm_lora_module_answer_as_our_engine(tmp_path):
    """export_vllm(adapters="keep"): the base in the native layout plus our Trainer's adapters renamed
    for vLLM's native class, applied by vLLM as a LoRA module, answer as our engine with the adapters
    merged. Dense decoder: on this CPU build vLLM's LoRA on a MoE model runs Triton kernels, which it
    does not have (the MoE case is exported, and checked for its format, only)."""
    from deepsynth.data.synthetic import SyntheticConfig, generate
    from deepsynth.vllm.export import export_vllm
    from deepsynth.training.config import TrainerConfig
    from deepsynth.training.trainer import Trainer

    base = reference.save_fixture(tmp_path / "base", reference.OCR2, "none", moe=False)
    config = TrainerConfig(model_name=str(base), output_dir=str(tmp_path / "run"), batch_size=1, max_steps=1,
                           use_lora=True, lora_rank=4, learning_rate=2e-2, log_interval=1)
    Trainer(config).train(generate(SyntheticConfig(facts_per_doc=2), 1, "train"))
    adapter = tmp_path / "run" / "adapter"
    out = export_vllm(adapter, tmp_path / "native", vision_sizes="checkpoint", adapters="keep")
    lora = native_adapter(adapter, tmp_path / "lora-check")
    assert not lora["fused_experts"]
    assert (out / "lora" / "adapter_model.safetensors").is_file()
    pages = [page(640, 640, 5), page(640, 640, 6)]
    lora["path"] = str(out / "lora")
    report = reference.check_reference(str(adapter), pages, ["read", "key1?"], max_new_tokens=10, native_dir=out,
                                       lora=lora)
    base_report = reference.check_reference(str(base), pages, ["read", "key1?"], max_new_tokens=10)
    print(json.dumps(report, indent=1))
    assert report["lora"] and report["agree"], report
    # the adapters change the answers' log-probabilities: vLLM applied them
    assert [a["hf_answer"] for a in report["answers"]] != [a["hf_answer"] for a in base_report["answers"]] or \
        report["max_abs_logprob_diff"] != base_report["max_abs_logprob_diff"]


def test_native_adapter_renames_for_vllm_and_flags_fused_experts(tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open

    from deepsynth.models.deepseek_ocr2 import lora_expert_parameters

    model, _, _ = reference.tiny_native_ocr2()
    peft_model = get_peft_model(model, LoraConfig(
        r=4, target_modules=r"^model\.language_model\.layers\.\d+\.self_attn\.q_proj$",
        target_parameters=lora_expert_parameters(model)))
    peft_model.save_pretrained(tmp_path / "adapter")
    lora = native_adapter(tmp_path / "adapter", tmp_path / "native")
    assert lora["fused_experts"] and lora["max_rank"] == 8
    with safe_open(str(tmp_path / "native" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("base_model.model.model.layers.") for k in keys)
    assert "language_model" not in json.loads((tmp_path / "native" / "adapter_config.json").read_text())[
        "target_modules"]
    vision = get_peft_model(reference.tiny_native_ocr2()[0], LoraConfig(r=4, target_modules=["qkv"]))
    vision.save_pretrained(tmp_path / "vision")
    with pytest.raises(ExportError, match="decoder only"):
        native_adapter(tmp_path / "vision", tmp_path / "v")
