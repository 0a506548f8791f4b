import json

import pytest
import torch
from transformers import DeepseekOcr2ForConditionalGeneration

from deepsynth.models import load_model
from deepsynth.models.collate import Collator
from deepsynth.models.deepseek_ocr2 import PatchReadoutVisionModel, real_config
from deepsynth.models.generate import GenerationSettings, generate_answers
from deepsynth.render import RenderConfig, render_text


def test_tiny_is_the_real_class_and_saves_and_loads(tmp_path):
    model, processor = load_model("tiny", seed=3)
    assert isinstance(model, DeepseekOcr2ForConditionalGeneration)
    assert isinstance(model.model.vision_tower, PatchReadoutVisionModel)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["vision_readout"] == "patches"
    again, processor2 = load_model(str(tmp_path))
    assert isinstance(again.model.vision_tower, PatchReadoutVisionModel)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    pages = [[render_text("alpha: 12\nbravo: 34", RenderConfig.from_preset("tiny"))[0].image]] * 2
    settings = GenerationSettings(max_new_tokens=6)
    assert generate_answers(model, Collator(processor), pages, ["alpha?", "bravo?"], settings) == \
        generate_answers(again, Collator(processor2), pages, ["alpha?", "bravo?"], settings)


def test_patch_readout_gives_one_token_per_patch():
    model, processor = load_model("tiny")
    features = model.model.get_image_features(torch.zeros(2, 3, 256, 256)).pooler_output
    assert [f.shape[0] for f in features] == [17, 17]


def test_patch_readout_equals_stock_encoder_outputs_at_patch_positions():
    # The readout skips the learned queries; under the encoder's mask (patches attend only to
    # patches) that must not change the patch outputs.
    model, _ = load_model("tiny", seed=1)
    tower = model.model.vision_tower
    pixels = torch.randn(2, 3, 256, 256)
    with torch.no_grad():
        ours = tower(pixels).last_hidden_state
        patches = tower.sam_encoder(pixels).last_hidden_state.flatten(2).transpose(1, 2)
        queries = tower.query_768_resolution.weight.unsqueeze(0).expand(2, -1, -1)
        stock = tower.vision_encoder(inputs_embeds=torch.cat([patches, queries], 1), num_patches=16).last_hidden_state
    assert ours.shape == (2, 16, model.config.vision_config.encoder_config.hidden_size)
    torch.testing.assert_close(ours, stock[:, :16], atol=1e-5, rtol=1e-5)


def test_unknown_and_missing_models_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="no backend for model_type 'bert'"):
        load_model(str(tmp_path))


def test_real_config_builds_on_meta_without_download():
    from transformers import DeepseekOcr2ForConditionalGeneration

    with torch.device("meta"):
        model = DeepseekOcr2ForConditionalGeneration(real_config())
    params = sum(p.numel() for p in model.parameters())
    assert model.config.text_config.hidden_size == 1280
    assert 2.5e9 < params < 4.5e9, params


def test_a_patch_readout_checkpoint_is_never_read_with_the_stock_readout(tmp_path):
    """Plain transformers refuses the patch-readout model type instead of loading it with the stock
    readout; with deepsynth imported the Auto class builds the patch readout."""
    import subprocess
    import sys

    from transformers import AutoModelForImageTextToText

    from deepsynth.models.deepseek_ocr2 import PATCH_READOUT_TYPE, PatchReadoutVisionModel

    model, processor = load_model("tiny")
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == PATCH_READOUT_TYPE
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert isinstance(loaded.model.vision_tower, PatchReadoutVisionModel)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    plain = subprocess.run([sys.executable, "-c", "import sys; from transformers import AutoModelForImageTextToText; "
                            "AutoModelForImageTextToText.from_pretrained(sys.argv[1])", str(tmp_path)],
                           capture_output=True, text=True)
    assert plain.returncode != 0 and PATCH_READOUT_TYPE in plain.stderr


def test_real_size_presets_read_the_pages_the_real_model_reads():
    """The random real-size presets get the real model's page size, the tiny presets the tiny one's."""
    from deepsynth.models.registry import BACKENDS

    for backend in BACKENDS.values():
        for preset in backend.presets:
            expected = "large" if preset.startswith("random-") else "tiny"
            assert backend.render_of_preset(preset) == expected, (backend.name, preset)
    assert RenderConfig.from_preset("large").page_width == 1024
