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
    generation_defaults,
    load_bundle,
    read_spec,
    resolve_render,
    save_bundle,
)
from deepsynth.models.generate import GenerationSettings, _answer_row
from deepsynth.models.loops import LoopPolicy
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



def test_the_resolver_answers_where_what_and_how_without_loading_weights(tmp_path, monkeypatch):
    """`resolve_source`: path, spec, backend, an adapter's base and seed, decoding defaults, for the
    shipped reader, a preset and an adapter bundle, with every weight loader made to fail."""
    import dataclasses

    from deepsynth.models import registry
    from deepsynth.models.bundle import resolve_source

    def no_weights(*args, **kwargs):
        raise AssertionError("the resolver loaded weights")

    monkeypatch.setattr(registry, "BACKENDS", {
        name: dataclasses.replace(b, load=no_weights, presets={preset: no_weights for preset in b.presets})
        for name, b in registry.BACKENDS.items()})

    reader = resolve_source("form-reader")
    assert reader.path == str(registry.CHECKPOINT_DIR / "form-reader") and reader.has_bundle
    assert reader.backend.name == reader.spec.backend == "deepseek-ocr-2" and reader.config["model_type"]
    assert reader.spec == read_spec(reader.path)
    saved = json.loads((registry.CHECKPOINT_DIR / "form-reader" / "generation_config.json").read_text())
    assert reader.generation_defaults().max_new_tokens == saved["max_new_tokens"]

    preset = resolve_source("tiny", seed=5)
    assert preset.is_preset and preset.path is None and (preset.spec.base_model, preset.spec.base_seed) == ("tiny", 5)
    assert preset.generation_defaults() is None  # a preset's are its built model's

    # an adapter bundle (the resolver reads its files only: no adapter weights needed)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "not-this-one"}))
    spec = ModelSpec(backend="deepseek-ocr-2", weights="adapter", base_model="tiny", base_seed=3,
                     default_instruction="read")
    (adapter / BUNDLE_FILE).write_text(json.dumps(spec.to_dict()))
    found = resolve_source(str(adapter))
    assert found.adapter == found.path == str(adapter) and found.spec == read_spec(adapter) and found.has_bundle
    assert found.spec.default_instruction == "read"
    assert (found.base.name, found.base.seed, found.seed) == ("tiny", 3, 3) and found.base.is_preset
    assert found.generation_dir is None  # neither the adapters nor the preset base have the file
    (adapter / "generation_config.json").write_text(json.dumps({"max_new_tokens": 9}))
    assert found.generation_dir == str(adapter) and found.generation_defaults().max_new_tokens == 9

    with pytest.raises(FileNotFoundError, match="no model directory"):
        resolve_source(str(tmp_path / "nowhere" / "model"))


def test_a_read_first_models_answer_is_what_follows_its_marker(tmp_path):
    """A reader that writes out its pages before answering keeps `answer_after` in its bundle, and
    every decoding path returns the text after the marker's last occurrence."""
    loaded = load_bundle("tiny", seed=3)
    decoding = GenerationSettings(max_new_tokens=7, answer_after="\nAnswer: ")
    save_bundle(tmp_path, loaded.model, loaded.processor, loaded.spec, generation=decoding)
    again = load_bundle(str(tmp_path))
    assert GenerationSettings.from_model(again.model) == decoding == again.decoder().settings
    assert generation_defaults(str(tmp_path)) == decoding  # what the vLLM engine reads
    tok = again.processor.tokenizer

    def row(text, **kw):
        ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
        return _answer_row(ids, tok, LoopPolicy(), False, **kw)

    answered = row("Answer: 12\nInvoice 7\nAnswer: 4,250 euros", answer_after="\nAnswer: ")
    assert answered["answer"] == "4,250 euros" and answered["stopped"] == "eos"
    assert row("no marker here", answer_after="\nAnswer: ")["answer"] == "no marker here"
    assert row("Invoice 7\nAnswer: 4,250")["answer"] == "Invoice 7\nAnswer: 4,250"  # off by default
