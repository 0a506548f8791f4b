"""DeepSeek-OCR v1 port: the real config reproduces the published checkpoint's tensors, a tiny
checkpoint written in the v1 key layout loads through load_model and runs (forward, generate, train)."""

import json

import pytest
import torch

from deepsynth.models import Collator, load_model
from deepsynth.models import deepseek_ocr_v1 as v1
from deepsynth.models.generate import GenerationSettings, generate_answers
from deepsynth.render import RenderConfig, render_text
from deepsynth.training.config import TrainerConfig
from deepsynth.training.trainer import Trainer

PAGE = RenderConfig.from_preset("tiny")


def published_v1_layout() -> dict[str, tuple]:
    """Tensor names and shapes of deepseek-ai/DeepSeek-OCR's model.safetensors (2,710 tensors,
    3,336,106,240 parameters), as listed from the published file."""
    out = {"lm_head.weight": (129280, 1280), "model.embed_tokens.weight": (129280, 1280),
           "model.image_newline": (1280,), "model.view_seperator": (1280,), "model.norm.weight": (1280,),
           "model.projector.layers.weight": (1280, 2048), "model.projector.layers.bias": (1280,)}
    for i in range(12):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (1280,), p + "post_attention_layernorm.weight": (1280,)})
        out.update({f"{p}self_attn.{x}_proj.weight": (1280, 1280) for x in "qkvo"})
        if i == 0:
            out.update({p + "mlp.gate_proj.weight": (6848, 1280), p + "mlp.up_proj.weight": (6848, 1280),
                        p + "mlp.down_proj.weight": (1280, 6848)})
            continue
        out[p + "mlp.gate.weight"] = (64, 1280)
        out.update({p + "mlp.shared_experts.gate_proj.weight": (1792, 1280),
                    p + "mlp.shared_experts.up_proj.weight": (1792, 1280),
                    p + "mlp.shared_experts.down_proj.weight": (1280, 1792)})
        for e in range(64):
            out.update({f"{p}mlp.experts.{e}.gate_proj.weight": (896, 1280),
                        f"{p}mlp.experts.{e}.up_proj.weight": (896, 1280),
                        f"{p}mlp.experts.{e}.down_proj.weight": (1280, 896)})
    s = "model.sam_model."
    out.update({s + "patch_embed.proj.weight": (768, 3, 16, 16), s + "patch_embed.proj.bias": (768,),
                s + "pos_embed": (1, 64, 64, 768), s + "neck.0.weight": (256, 768, 1, 1), s + "neck.1.weight": (256,),
                s + "neck.1.bias": (256,), s + "neck.2.weight": (256, 256, 3, 3), s + "neck.3.weight": (256,),
                s + "neck.3.bias": (256,), s + "net_2.weight": (512, 256, 3, 3), s + "net_3.weight": (1024, 512, 3, 3)})
    for i in range(12):
        b = f"{s}blocks.{i}."
        rel = (127, 64) if i in (2, 5, 8, 11) else (27, 64)
        out.update({b + "attn.qkv.weight": (2304, 768), b + "attn.qkv.bias": (2304,), b + "attn.proj.weight": (768, 768),
                    b + "attn.proj.bias": (768,), b + "attn.rel_pos_h": rel, b + "attn.rel_pos_w": rel,
                    b + "mlp.lin1.weight": (3072, 768), b + "mlp.lin1.bias": (3072,), b + "mlp.lin2.weight": (768, 3072),
                    b + "mlp.lin2.bias": (768,), b + "norm1.weight": (768,), b + "norm1.bias": (768,),
                    b + "norm2.weight": (768,), b + "norm2.bias": (768,)})
    c = "model.vision_model."
    out.update({c + "embeddings.class_embedding": (1024,), c + "embeddings.patch_embedding.weight": (1024, 3, 14, 14),
                c + "embeddings.position_embedding.weight": (257, 1024), c + "pre_layrnorm.weight": (1024,),
                c + "pre_layrnorm.bias": (1024,)})
    for i in range(24):
        t = f"{c}transformer.layers.{i}."
        out.update({t + "layer_norm1.weight": (1024,), t + "layer_norm1.bias": (1024,), t + "layer_norm2.weight": (1024,),
                    t + "layer_norm2.bias": (1024,), t + "mlp.fc1.weight": (4096, 1024), t + "mlp.fc1.bias": (4096,),
                    t + "mlp.fc2.weight": (1024, 4096), t + "mlp.fc2.bias": (1024,),
                    t + "self_attn.out_proj.weight": (1024, 1024), t + "self_attn.out_proj.bias": (1024,),
                    t + "self_attn.qkv_proj.weight": (3072, 1024), t + "self_attn.qkv_proj.bias": (3072,)})
    return out


def test_real_config_reproduces_the_published_checkpoint_layout():
    with torch.device("meta"):
        model = v1.DeepseekOcrV1ForConditionalGeneration(v1.real_v1_config())
    assert sum(p.numel() for p in model.parameters()) == 3_336_106_240
    exported = {k: tuple(t.shape) for k, t in v1.to_v1_state_dict(model.state_dict(), model.config).items()}
    published = published_v1_layout()
    assert len(published) == 2710
    assert exported == published
    back = v1.convert_v1_state_dict({k: torch.empty(s, device="meta") for k, s in published.items()}, model.config)
    assert {k: tuple(t.shape) for k, t in back.items()} == {k: tuple(t.shape) for k, t in model.state_dict().items()}


def write_v1_checkpoint(model, processor, directory):
    """A checkpoint as deepseek-ai/DeepSeek-OCR ships it: remote-code config.json, original key names."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(v1.original_config_from_v1(model.config)))
    state = v1.to_v1_state_dict(model.state_dict(), model.config)
    save_file({k: t.contiguous() for k, t in state.items()}, str(directory / "model-00001-of-000001.safetensors"))
    processor.tokenizer.save_pretrained(directory)


def test_tiny_checkpoint_in_v1_layout_loads_runs_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPSYNTH_CACHE", str(tmp_path / "cache"))
    model, processor = load_model("tiny-deepseek-ocr-v1", seed=4)
    write_v1_checkpoint(model, processor, tmp_path / "v1")
    loaded, processor2 = load_model(str(tmp_path / "v1"))
    assert type(loaded) is v1.DeepseekOcrV1ForConditionalGeneration
    assert type(processor2) is v1.DeepseekOcrV1Processor
    page = render_text("alpha: 12\nbravo: 34", PAGE)[0].image
    batch = Collator(processor)([{"pages": [page], "instruction": "alpha?", "answer": "12"},
                                 {"pages": [page, page], "instruction": "bravo?", "answer": "34"}])
    batch2 = Collator(processor2)([{"pages": [page], "instruction": "alpha?", "answer": "12"},
                                   {"pages": [page, page], "instruction": "bravo?", "answer": "34"}])
    assert all(torch.equal(batch[k], batch2[k]) for k in batch)
    # v1 layout: 4 x 4 grid + a newline per row + view separator = 21 tokens per 256 px page.
    assert [(row == model.config.image_token_id).sum().item() for row in batch["input_ids"]] == [21, 42]
    model.eval(), loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits)
        features = loaded.model.get_image_features(batch["pixel_values"][:1]).pooler_output[0]
    assert features.shape[0] == 21
    torch.testing.assert_close(features[4], loaded.model.image_newline)  # end of the first row
    torch.testing.assert_close(features[-1], loaded.model.view_separator)
    settings = GenerationSettings(max_new_tokens=5)
    assert generate_answers(loaded, Collator(processor2), [[page]], ["alpha?"], settings) == \
        generate_answers(model, Collator(processor), [[page]], ["alpha?"], settings)
    # The conversion is done once; the next load reads the cache.
    monkeypatch.setattr(v1, "convert_v1_checkpoint", lambda *a, **k: pytest.fail("converted twice"))
    load_model(str(tmp_path / "v1"))


def test_key_map_errors_name_the_key():
    model, _ = load_model("tiny-deepseek-ocr-v1")
    state = v1.to_v1_state_dict(model.state_dict(), model.config)
    with pytest.raises(KeyError, match="model.sam_model.mystery"):
        v1.convert_v1_state_dict({**state, "model.sam_model.mystery": torch.zeros(1)}, model.config)
    state.pop("model.layers.1.mlp.experts.3.up_proj.weight")
    with pytest.raises(KeyError, match=r"layer 1: experts \[3\] have no up_proj"):
        v1.convert_v1_state_dict(state, model.config)


def test_trainer_lora_on_tiny_v1(tmp_path):
    from deepsynth.data.synthetic import SyntheticConfig, generate

    config = TrainerConfig(model_name="tiny-deepseek-ocr-v1", output_dir=str(tmp_path / "run"), batch_size=2,
                           max_steps=2, use_lora=True, lora_rank=4, log_interval=1)
    metrics, _ = Trainer(config).train(generate(SyntheticConfig(facts_per_doc=2), 4, "train"))
    assert metrics["train_steps"] == 2
    assert type(load_model(metrics["final_model"])[0]) is v1.DeepseekOcrV1ForConditionalGeneration


@pytest.mark.parametrize("image_size", [256, 512])  # 512: SAM, rel-pos and CLIP position interpolation paths
def test_vision_path_matches_an_independent_deepencoder_implementation(image_size):
    from deepseek_ocr_v1_reference import reference_image_tokens  # tests/models is on sys.path (rootdir-less)

    model, _ = v1.build_tiny_v1(seed=3)
    with torch.no_grad():  # the port zero-initialises these; make every weight informative
        for name, param in model.named_parameters():
            if any(k in name for k in ("rel_pos", "pos_embed", "class_embedding", "position_embedding")):
                param.normal_(0, 0.5)
    model.eval()
    weights = v1.to_v1_state_dict(model.state_dict(), model.config)
    pixels = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference_image_tokens(pixels, weights, model.config)
        got = model.model.get_image_features(pixels).pooler_output
    for e, g in zip(expected, got):
        assert e.shape == g.shape == ((image_size // 64) * (image_size // 64 + 1) + 1, 192)
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_gundam_features_match_an_independent_implementation_of_v1s_forward():
    """Crops laid out as v1's forward does: the crops' joint grid (rows x columns crops, a newline
    after each row), then the global view's rows, then the view separator."""
    from deepseek_ocr_v1_reference import reference_gundam_tokens

    model, processor = v1.build_tiny_v1(seed=5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(k in name for k in ("rel_pos", "pos_embed", "class_embedding", "position_embedding")):
                param.normal_(0, 0.5)
    model.eval()
    v1._set_crop_mode(processor, "tiles")
    pages = [render_text("alpha: 12\nbravo: 34", PAGE)[0].image.resize((700, 300)),
             render_text("charlie: 56", PAGE)[0].image.resize((200, 520))]
    enc = processor(images=pages, text=["<image>\nx", "<image>\ny"], return_tensors="pt", padding=True)
    assert enc["num_local_patches"].tolist() == [[4, 2], [1, 3]]  # crop grids of 160 px crops
    weights = v1.to_v1_state_dict(model.state_dict(), model.config)
    with torch.no_grad():
        got = model.model.get_image_features(enc["pixel_values"], enc["pixel_values_local"],
                                             enc["num_local_patches"]).pooler_output
        starts = [0, 8]
        for i, (grid, start) in enumerate(zip([(4, 2), (1, 3)], starts)):
            crops = enc["pixel_values_local"][start:start + grid[0] * grid[1]]
            expected = reference_gundam_tokens(enc["pixel_values"][i:i + 1], crops, grid, weights, model.config)
            torch.testing.assert_close(got[i], expected, rtol=1e-4, atol=1e-5)
            # the prompt holds exactly as many image tokens as the page has features
            assert (enc["input_ids"][i] == model.config.image_token_id).sum() == got[i].shape[0]
    with pytest.raises(ValueError, match="crop grid"):
        model.model.get_image_features(enc["pixel_values"], enc["pixel_values_local"], torch.tensor([8, 3]))


def test_v1_checkpoint_in_gundam_mode_answers_through_ask(tmp_path, monkeypatch):
    """A v1 checkpoint whose config.json asks for crops (`infer`'s base_size / image_size / crop_mode)
    converts to a Gundam processor and answers `deepsynth ask`; the record counts the crops' tokens."""
    from typer.testing import CliRunner

    from deepsynth.cli import app
    from deepsynth.models import deepseek_ocr2 as ocr2

    monkeypatch.setenv("DEEPSYNTH_CACHE", str(tmp_path / "cache"))
    model, processor = load_model("tiny-deepseek-ocr-v1", seed=4)
    write_v1_checkpoint(model, processor, tmp_path / "v1")
    config = json.loads((tmp_path / "v1" / "config.json").read_text())
    config.update(base_size=256, image_size=128, crop_mode=True)
    (tmp_path / "v1" / "config.json").write_text(json.dumps(config))
    loaded, converted = load_model(str(tmp_path / "v1"))
    assert ocr2.crop_mode_of(converted) == "tiles" and converted.image_processor.tile_size == 128
    doc = tmp_path / "doc.txt"
    doc.write_text("alpha: 12\nbravo: 34\n")
    res = CliRunner().invoke(app, ["ask", str(doc), "-i", "alpha?", "-m", str(tmp_path / "v1"),
                                   "--max-new-tokens", "3", "--json"])
    assert res.exit_code == 0, res.output
    record = json.loads(res.stdout[res.stdout.index("{"):])
    # the tiny model reads DeepSeek-OCR v1's default pages (1024 px): a 3 x 3 grid of 128 px crops
    assert record["visual_tokens"] == ocr2.image_tokens(converted, 1024, 1024, "tiles") == 21 + (2 * 3 + 1) * 2 * 3
