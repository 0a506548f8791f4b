"""The model bundle: every directory the trainer writes describes its pages, prompt, channel and
decoding, and `load_bundle` reads it back into the same answers."""

import json
import logging
from dataclasses import asdict

import pytest
import torch

from deepsynth.data.synthetic import SyntheticConfig, generate
from deepsynth.models.bundle import (
    BUNDLE_FILE,
    BUNDLE_VERSION,
    BundleError,
    ModelSpec,
    load_bundle,
    read_spec,
    resolve_render,
    save_bundle,
)
from deepsynth.models.generate import GenerationSettings
from deepsynth.models.text_encoder import ENCODER_DIR, PROJECTION_FILE, SoftPromptModel
from deepsynth.render import RenderConfig, render_text
from deepsynth.training.config import TrainerConfig
from deepsynth.training.trainer import Trainer

PAGE = render_text("alpha: 12\nbravo: 34", RenderConfig.from_preset("tiny"))[0].image
PAGES, INSTRUCTIONS = [[PAGE], [PAGE]], ["alpha?", "bravo?"]
SHORT = GenerationSettings(max_new_tokens=4)


def _answers(loaded, settings=SHORT):
    return [r["answer"] for r in loaded.decoder(settings).run(PAGES, INSTRUCTIONS)]


def test_bundle_round_trip_keeps_render_decoding_and_answers(tmp_path):
    loaded = load_bundle("tiny", seed=3)
    render = RenderConfig.from_preset("small", font_size=15)
    spec = ModelSpec(backend="deepseek-ocr-2", render=asdict(render), crop_mode="none", default_instruction="read",
                     prompt_layout=loaded.spec.prompt_layout, base_model="tiny", base_seed=3,
                     evaluation={"dev": {"em": 0.5}})
    decoding = GenerationSettings(max_new_tokens=7, no_repeat_ngram_size=5)
    save_bundle(tmp_path, loaded.model, loaded.processor, spec, generation=decoding)
    again = load_bundle(str(tmp_path))
    assert again.spec.render_config() == render and again.spec.default_instruction == "read"
    assert again.spec.evaluation == {"dev": {"em": 0.5}} and again.spec.crop_mode == "none"
    assert again.spec.prompt_layout == "plain"
    assert GenerationSettings.from_model(again.model) == decoding
    assert again.decoder().settings == decoding
    assert _answers(again) == _answers(loaded)


def test_a_newer_bundle_version_is_a_clear_error(tmp_path):
    loaded = load_bundle("tiny")
    save_bundle(tmp_path, loaded.model, loaded.processor, loaded.spec)
    data = json.loads((tmp_path / BUNDLE_FILE).read_text())
    data["version"] = BUNDLE_VERSION + 1
    (tmp_path / BUNDLE_FILE).write_text(json.dumps(data))
    with pytest.raises(BundleError, match="newer than this DeepSynth reads"):
        load_bundle(str(tmp_path))
    data["version"], data["colour"] = BUNDLE_VERSION, "red"
    (tmp_path / BUNDLE_FILE).write_text(json.dumps(data))
    with pytest.raises(BundleError, match="unknown fields"):
        read_spec(tmp_path)


def test_a_directory_without_a_bundle_gets_its_backend_defaults_with_a_warning(tmp_path, caplog):
    model, processor, _ = load_bundle("tiny")
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        loaded = load_bundle(str(tmp_path))
    # DeepSeek's own prompt (BOS + pages + "\n" + instruction) for a checkpoint that does not say
    assert loaded.spec.backend == "deepseek-ocr-2" and loaded.spec.prompt_layout == "plain"
    assert f"has no {BUNDLE_FILE}" in caplog.text


def test_a_render_override_that_differs_from_the_bundle_is_logged(caplog):
    spec = load_bundle("tiny").spec
    with caplog.at_level(logging.WARNING):
        assert resolve_render(spec) == RenderConfig.from_preset("tiny")
        assert not caplog.records
        assert resolve_render(spec, "large") == RenderConfig.from_preset("large")
    assert "differs from the pages this model was trained on" in caplog.text


def _train(tmp_path, **options):
    data = generate(SyntheticConfig(facts_per_doc=2), 8, "train")
    cfg = TrainerConfig(model_name="tiny", output_dir=str(tmp_path), batch_size=2, max_steps=2, learning_rate=1e-3,
                        seed=5, **options)
    trainer = Trainer(cfg)
    metrics, checkpoints = trainer.train(data)
    return trainer, metrics, checkpoints


def test_a_frozen_text_encoder_is_referenced_not_copied(tmp_path):
    trainer, metrics, checkpoints = _train(tmp_path, use_text_encoder=True, text_encoder_model="tiny-qwen2")
    for folder in (metrics["final_model"], checkpoints[-1]):
        spec = read_spec(folder)
        assert spec.instruction_channel["kind"] == "text-encoder" and spec.instruction_channel["weights"] is None
        assert spec.instruction_channel["model"] == "tiny-qwen2"
        assert not (tmp_path / folder / ENCODER_DIR).exists()
        assert (tmp_path / folder / PROJECTION_FILE).is_file()
    loaded = load_bundle(metrics["final_model"])
    assert isinstance(loaded.model, SoftPromptModel)
    trained = trainer.accelerator.unwrap_model(trainer._prepared)
    for (name, a), (_, b) in zip(trained.state_dict().items(), loaded.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert _answers(loaded) == [r["answer"] for r in trainer.decoder().run(PAGES, INSTRUCTIONS, SHORT)]


def test_lora_adapters_with_a_text_encoder_carry_the_projection(tmp_path):
    trainer, metrics, _ = _train(tmp_path, use_lora=True, use_text_encoder=True, text_encoder_model="tiny-qwen2")
    adapter = tmp_path / "adapter"
    spec = read_spec(adapter)
    assert spec.weights == "adapter" and spec.base_model == "tiny" and spec.base_seed == 5
    assert (adapter / "adapter_config.json").is_file() and (adapter / PROJECTION_FILE).is_file()
    assert not (adapter / "model.safetensors").exists()
    from_adapters = load_bundle(str(adapter))
    merged = load_bundle(metrics["final_model"])
    assert isinstance(from_adapters.model, SoftPromptModel)
    assert torch.equal(from_adapters.model.projection.weight, merged.model.projection.weight)
    assert _answers(from_adapters) == _answers(merged)
