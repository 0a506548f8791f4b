"""Checkpoints load in every layout users have, and each one answers, trains and serves.

Four layouts, written by the helpers below from random tiny weights, with configs that carry the
fields (names and structure) of the published config.json files at tiny sizes:

* ``v1``: deepseek-ai/DeepSeek-OCR as published (remote-code config, model_type "deepseek_vl_v2",
  original tensor names);
* ``v1-resaved``: the same after the remote code saved it again (model_type "DeepseekOCR", CLIP's
  persistent ``position_ids`` buffer among the tensors, sharded);
* ``ocr2-official``: deepseek-ai/DeepSeek-OCR-2's own repository (model_type "deepseek_vl_v2",
  architecture ``DeepseekOCR2ForCausalLM``, ``vision_config.width`` with "qwen2-0-5b", the
  official code's tensor names);
* ``ocr2-converted``: the transformers-converted checkpoint (deepseek-community/DeepSeek-OCR-2:
  model_type "deepseek_ocr2", written by ``save_pretrained``).

Layouts holding the same weights must give the same greedy answer.
"""

import json
import re

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save_file
from transformers import DeepseekOcr2Config, DeepseekOcr2ForConditionalGeneration
from typer.testing import CliRunner

from deepsynth.cli import app
from deepsynth.models import deepseek_ocr2 as ocr2
from deepsynth.models import deepseek_ocr_v1 as v1
from deepsynth.models.bundle import load_bundle
from deepsynth.models.generate import GenerationSettings
from deepsynth.models.registry import backend_for_checkpoint, resolve
from deepsynth.models.tokenizer import build_char_tokenizer
from deepsynth.render import RenderConfig, render_text

PAGE_TEXT = "alpha: 12\nbravo: 34"
INSTRUCTION = "alpha?"
NEW_TOKENS = 6
OCR2_SIDE = 768  # the stock vision tower reads 144 learned queries: a 768 px view has 144 patches


# ---- writers -------------------------------------------------------------------------------------
def _v1_official_config(model) -> dict:
    """config.json of deepseek-ai/DeepSeek-OCR (its fields and nesting), at the tiny model's sizes."""
    config = v1.original_config_from_v1(model.config)
    lang = config["language_config"]
    lang.update({"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "lm_head": True,
                 "rm_head": False, "qk_nope_head_dim": 0, "qk_rope_head_dim": 0, "v_head_dim": 0,
                 "torch_dtype": "bfloat16"})
    config["vision_config"].update({"mlp_ratio": 3.7362, "model_name": "deeplip_b_l", "model_type": "vision"})
    config["projector_config"]["model_type"] = "mlp_projector"
    config.update({
        "auto_map": {"AutoConfig": "modeling_deepseekocr.DeepseekOCRConfig",
                     "AutoModel": "modeling_deepseekocr.DeepseekOCRForCausalLM"},
        "candidate_resolutions": [[1024, 1024]], "global_view_pos": "head", "tile_tag": "2D",
        "torch_dtype": "bfloat16", "transformers_version": "4.46.3",
        **{k: lang[k] for k in ("first_k_dense_replace", "intermediate_size", "moe_intermediate_size",
                                "n_routed_experts", "n_shared_experts", "num_attention_heads", "num_experts_per_tok",
                                "num_key_value_heads", "topk_method", "use_mla", "lm_head", "rm_head",
                                "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "kv_lora_rank", "q_lora_rank")},
    })
    return config


def write_v1(model, processor, directory):
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(_v1_official_config(model), indent=2))
    state = v1.to_v1_state_dict(model.state_dict(), model.config)
    save_file({k: t.contiguous() for k, t in state.items()}, str(directory / "model-00001-of-000001.safetensors"))
    processor.tokenizer.save_pretrained(directory)


def write_v1_resaved(model, processor, directory):
    """What `model.save_pretrained` of v1's remote code writes: its DeepseekOCRConfig
    (model_type "DeepseekOCR", DeepseekV2Config fields at the top level, the sub-configs kept) and
    every persistent tensor, CLIP's position_ids included, in shards."""
    directory.mkdir(parents=True)
    config = _v1_official_config(model)
    config.update({"model_type": v1.RESAVED_MODEL_TYPE, "_name_or_path": "deepseek-ai/DeepSeek-OCR",
                   "aux_loss_alpha": 0.001, "ep_size": 1, "hidden_act": "silu", "moe_layer_freq": 1,
                   "scoring_func": "softmax", "seq_aux": True, "rope_theta": 10000, "attention_bias": False,
                   "norm_topk_prob": False, "routed_scaling_factor": 1.0, "rms_norm_eps": 1e-6})
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    state = v1.to_v1_state_dict(model.state_dict(), model.config)
    positions = model.model.vision_tower.clip.embeddings.num_positions
    state["model.vision_model.embeddings.position_ids"] = torch.arange(positions).expand(1, -1)
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for file, names in shards.items():
        save_file({k: state[k].contiguous() for k in names}, str(directory / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: f for f, names in shards.items() for k in names}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    processor.tokenizer.save_pretrained(directory)
    return len(state)


def tiny_ocr2(seed: int = 0):
    """DeepSeek-OCR-2's native class (stock vision readout, as released) at toy size: SAM 32 x 1,
    encoder 64 x 1, a dense and an MoE decoder layer (4 experts, top-2, 1 shared)."""
    tokenizer = build_char_tokenizer()
    processor = ocr2.official_processor(tokenizer, OCR2_SIDE)
    config = DeepseekOcr2Config(
        vision_config={
            "sam_config": dict(hidden_size=32, output_channels=32, num_hidden_layers=1, num_attention_heads=2,
                               image_size=OCR2_SIDE, patch_size=16, window_size=8, global_attn_indexes=[],
                               downsample_channels=[32, 64], initializer_range=0.02),
            "encoder_config": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=8, max_position_embeddings=512,
                                   rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})},
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, mlp_layer_types=["dense", "sparse"],
                         n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
                         max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id),
        image_token_id=processor.image_token_id)
    torch.manual_seed(seed)
    model = DeepseekOcr2ForConditionalGeneration(config)
    with torch.no_grad():  # transformers zero-initialises these; make every weight informative
        for name, param in model.named_parameters():
            if any(k in name for k in ("rel_pos", "pos_embed", "query_", "view_separator")):
                param.normal_(0, 0.5)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval(), processor


# Native name -> the official code's name (modeling_deepseekocr2.py: `model.sam_model` =
# build_sam_vit_b(), `model.qwen2_model` = build_qwen2_decoder_as_encoder() with its Qwen2Model at
# `.model.model` and `query_768` / `query_1024` embeddings, `model.projector.layers`, the misspelt
# `model.view_seperator`, a DeepseekV2 decoder at `model.*` with one module per routed expert).
# Written independently of transformers' conversion mapping, which the loader relies on.
_OFFICIAL_NAMES = [
    (r"^model\.vision_tower\.sam_encoder\.layers\.(\d+)\.layer_norm(\d)\.", r"model.sam_model.blocks.\1.norm\2."),
    (r"^model\.vision_tower\.sam_encoder\.layers\.(\d+)\.", r"model.sam_model.blocks.\1."),
    (r"^model\.vision_tower\.sam_encoder\.patch_embed\.projection\.", "model.sam_model.patch_embed.proj."),
    (r"^model\.vision_tower\.sam_encoder\.pos_embed$", "model.sam_model.pos_embed"),
    (r"^model\.vision_tower\.sam_encoder\.neck\.conv1\.", "model.sam_model.neck.0."),
    (r"^model\.vision_tower\.sam_encoder\.neck\.layer_norm1\.", "model.sam_model.neck.1."),
    (r"^model\.vision_tower\.sam_encoder\.neck\.conv2\.", "model.sam_model.neck.2."),
    (r"^model\.vision_tower\.sam_encoder\.neck\.layer_norm2\.", "model.sam_model.neck.3."),
    (r"^model\.vision_tower\.sam_encoder\.proj\.conv1\.", "model.sam_model.net_2."),
    (r"^model\.vision_tower\.sam_encoder\.proj\.conv2\.", "model.sam_model.net_3."),
    (r"^model\.vision_tower\.vision_encoder\.", "model.qwen2_model.model.model."),
    (r"^model\.vision_tower\.query_(768|1024)_resolution\.", r"model.qwen2_model.query_\1."),
    (r"^model\.multi_modal_projector\.", "model.projector.layers."),
    (r"^model\.view_separator$", "model.view_seperator"),
    (r"^model\.language_model\.", "model."),
    (r"^lm_head\.", "lm_head."),
]


def official_ocr2_state_dict(model) -> dict[str, torch.Tensor]:
    out = {}
    moe = model.config.text_config.moe_intermediate_size
    for key, tensor in model.state_dict().items():
        if m := re.match(r"^model\.language_model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$", key):
            for e in range(tensor.shape[0]):
                base = f"model.layers.{m[1]}.mlp.experts.{e}."
                if m[2] == "gate_up_proj":
                    out[base + "gate_proj.weight"], out[base + "up_proj.weight"] = tensor[e, :moe], tensor[e, moe:]
                else:
                    out[base + "down_proj.weight"] = tensor[e]
            continue
        for pattern, repl in _OFFICIAL_NAMES:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = tensor
                break
        else:
            raise KeyError(key)
    return out


def write_ocr2_official(model, processor, directory):
    """deepseek-ai/DeepSeek-OCR-2's layout: its config.json fields at tiny sizes (keys beyond the
    published ones give the toy encoder's depth and SAM's geometry), the official tensor names."""
    directory.mkdir(parents=True)
    text, sam = model.config.text_config, model.config.vision_config.sam_config
    enc = model.config.vision_config.encoder_config
    dense = text.mlp_layer_types.count("dense")
    lang = {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2", "bos_token_id": text.bos_token_id,
        "eos_token_id": text.eos_token_id, "pad_token_id": text.pad_token_id, "first_k_dense_replace": dense,
        "hidden_size": text.hidden_size, "intermediate_size": text.intermediate_size, "kv_lora_rank": None,
        "lm_head": True, "max_position_embeddings": text.max_position_embeddings,
        "moe_intermediate_size": text.moe_intermediate_size, "n_group": 1, "n_routed_experts": text.n_routed_experts,
        "n_shared_experts": text.n_shared_experts, "num_attention_heads": text.num_attention_heads,
        "num_experts_per_tok": text.num_experts_per_tok, "num_hidden_layers": text.num_hidden_layers,
        "num_key_value_heads": text.num_key_value_heads, "q_lora_rank": None, "qk_nope_head_dim": 0,
        "qk_rope_head_dim": 0, "rm_head": False, "topk_group": 1, "topk_method": "greedy", "torch_dtype": "bfloat16",
        "use_mla": False, "v_head_dim": 0, "vocab_size": text.vocab_size,
    }
    config = {
        "architectures": [ocr2.OFFICIAL_ARCHITECTURE], "model_type": "deepseek_vl_v2",
        "auto_map": {"AutoConfig": "modeling_deepseekocr2.DeepseekOCR2Config",
                     "AutoModel": "modeling_deepseekocr2.DeepseekOCR2ForCausalLM"},
        "candidate_resolutions": [[1024, 1024]], "global_view_pos": "head", "tile_tag": "2D",
        "language_config": lang, "torch_dtype": "bfloat16", "transformers_version": "4.46.3",
        "projector_config": {"input_dim": enc.hidden_size, "model_type": "mlp_projector",
                             "n_embed": text.hidden_size, "projector_type": "linear"},
        "vision_config": {
            "image_size": sam.image_size, "mlp_ratio": 3.7362, "model_name": "deepencoderv2", "model_type": "vision",
            "width": {
                # as published: v1's downsample_channels, which the official code does not read
                "sam_vit_b": {"downsample_channels": [sam.downsample_channels[0], 1024],
                              "global_attn_indexes": list(sam.global_attn_indexes), "heads": sam.num_attention_heads,
                              "layers": sam.num_hidden_layers, "width": sam.hidden_size, "patch_size": sam.patch_size,
                              "window_size": sam.window_size, "output_channels": sam.output_channels},
                "qwen2-0-5b": {"dim": enc.hidden_size, "layers": enc.num_hidden_layers,
                               "heads": enc.num_attention_heads, "kv_heads": enc.num_key_value_heads,
                               "intermediate_size": enc.intermediate_size, "vocab_size": enc.vocab_size,
                               "max_position_embeddings": enc.max_position_embeddings}}},
        **{k: lang[k] for k in ("bos_token_id", "eos_token_id", "hidden_size", "vocab_size", "num_hidden_layers")},
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    state = official_ocr2_state_dict(model)
    save_file({k: t.contiguous() for k, t in state.items()}, str(directory / "model-00001-of-000001.safetensors"))
    processor.tokenizer.save_pretrained(directory)


def write_ocr2_converted(model, processor, directory):
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    v1_model, v1_processor = v1.build_tiny_v1(seed=5)
    v1_model.eval()
    with torch.no_grad():  # the port zero-initialises these; make every weight informative
        for name, param in v1_model.named_parameters():
            if any(k in name for k in ("rel_pos", "pos_embed", "class_embedding", "position_embedding")):
                param.normal_(0, 0.5)
    ocr2_model, ocr2_processor = tiny_ocr2(seed=6)
    write_v1(v1_model, v1_processor, root / "v1")
    resaved_tensors = write_v1_resaved(v1_model, v1_processor, root / "v1-resaved")
    write_ocr2_official(ocr2_model, ocr2_processor, root / "ocr2-official")
    write_ocr2_converted(ocr2_model, ocr2_processor, root / "ocr2-converted")
    return {"root": root, "resaved_tensors": resaved_tensors,
            "models": {"v1": (v1_model, v1_processor), "ocr2": (ocr2_model, ocr2_processor)}}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPSYNTH_CACHE", str(tmp_path / "cache"))


LAYOUTS = {  # layout -> (family of its weights, backend, class loaded)
    "v1": ("v1", "deepseek-ocr-v1", v1.DeepseekOcrV1ForConditionalGeneration),
    "v1-resaved": ("v1", "deepseek-ocr-v1", v1.DeepseekOcrV1ForConditionalGeneration),
    "ocr2-official": ("ocr2", "deepseek-ocr-2", DeepseekOcr2ForConditionalGeneration),
    "ocr2-converted": ("ocr2", "deepseek-ocr-2", DeepseekOcr2ForConditionalGeneration),
}
PAGE = RenderConfig.from_preset("tiny")


def _answer(model, processor, spec) -> str:
    from deepsynth.models.bundle import make_decoder

    page = render_text(PAGE_TEXT, PAGE)[0].image
    decoder = make_decoder(model, processor, spec, GenerationSettings(max_new_tokens=NEW_TOKENS))
    return decoder.run([[page]], [INSTRUCTION])[0]["answer"]


# ---- tests ---------------------------------------------------------------------------------------
def test_config_fields_route_each_layout_to_its_backend(layouts):
    root = layouts["root"]
    for layout, (_, backend, _) in LAYOUTS.items():
        assert backend_for_checkpoint(str(root / layout)).name == backend, layout
    official = json.loads((root / "ocr2-official" / "config.json").read_text())
    published_v1 = json.loads((root / "v1" / "config.json").read_text())
    assert official["model_type"] == published_v1["model_type"] == "deepseek_vl_v2"  # the shared type
    assert ocr2.is_official_config(official) and not v1.is_v1_config(official)
    assert v1.is_v1_config(published_v1) and not ocr2.is_official_config(published_v1)
    # Each field alone decides: the architecture, the auto_map, the vision tower in vision_config.width.
    for only in ({"architectures": official["architectures"]}, {"auto_map": official["auto_map"]},
                 {"model_type": "deepseek_vl_v2", "vision_config": official["vision_config"]},
                 {"model_type": "DeepseekOCR2"}):
        assert ocr2.is_official_config(only) and not v1.is_v1_config(only), only
    for only in ({"architectures": published_v1["architectures"]}, {"auto_map": published_v1["auto_map"]},
                 {"model_type": "deepseek_vl_v2", "vision_config": published_v1["vision_config"]},
                 {"model_type": "DeepseekOCR"}):
        assert v1.is_v1_config(only) and not ocr2.is_official_config(only), only
    assert layouts["resaved_tensors"] == len(v1.to_v1_state_dict(*[layouts["models"]["v1"][0].state_dict(),
                                                                    layouts["models"]["v1"][0].config])) + 1


def test_aliases_resolve():
    assert resolve("deepseek-ocr") == v1.V1_CHECKPOINT
    assert resolve("deepseek-ocr-2") == resolve("DeepSeek-OCR-2") == resolve("deepseek-ocr2") == ocr2.CHECKPOINT
    # The official id is its own repository, which loads through the converter (not an alias).
    assert resolve(ocr2.OFFICIAL_CHECKPOINT) == ocr2.OFFICIAL_CHECKPOINT


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_loads_with_the_same_weights_and_answers(layouts, layout):
    family, backend, cls = LAYOUTS[layout]
    source, source_processor = layouts["models"][family]
    loaded = load_bundle(str(layouts["root"] / layout))
    assert type(loaded.model) is cls and loaded.spec.backend == backend
    got = {k: v for k, v in loaded.model.state_dict().items()}
    for key, tensor in source.state_dict().items():
        assert torch.equal(got[key], tensor), key
    expected = _answer(source, source_processor, loaded.spec)
    assert _answer(loaded.model, loaded.processor, loaded.spec) == expected


def test_same_weights_same_answer_through_ask_whatever_the_layout(layouts):
    doc = layouts["root"] / "page.txt"
    doc.write_text(PAGE_TEXT)
    answers = {}
    for layout in LAYOUTS:
        result = CliRunner().invoke(app, ["ask", str(doc), "-i", INSTRUCTION, "-m", str(layouts["root"] / layout),
                                          "--preset", "tiny", "--max-new-tokens", str(NEW_TOKENS), "--json"])
        assert result.exit_code == 0, result.output
        record = json.loads(result.stdout)
        answers[layout] = record["answer"]
        assert record["new_tokens"] >= 1
    assert answers["v1"] == answers["v1-resaved"]
    assert answers["ocr2-official"] == answers["ocr2-converted"]
    v1_model, v1_processor = layouts["models"]["v1"]
    spec = load_bundle(str(layouts["root"] / "v1")).spec
    assert answers["v1"] == _answer(v1_model, v1_processor, spec)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_trains_one_step_and_serves(layouts, layout, tmp_path):
    from deepsynth.data.synthetic import SyntheticConfig, generate
    from deepsynth.serve.cli import build_app
    from deepsynth.training.config import TrainerConfig
    from deepsynth.training.trainer import Trainer

    directory = str(layouts["root"] / layout)
    config = TrainerConfig(model_name=directory, output_dir=str(tmp_path / "run"), batch_size=1, max_steps=1,
                           log_interval=1, render_preset="tiny")
    metrics, _ = Trainer(config).train(generate(SyntheticConfig(facts_per_doc=2), 2, "train"))
    assert metrics["train_steps"] == 1 and torch.isfinite(torch.tensor(metrics["loss_last"]))
    final = load_bundle(metrics["final_model"])
    assert type(final.model) is LAYOUTS[layout][2]

    with TestClient(build_app(directory, preset="tiny")) as client:
        response = client.post("/api/inference/instruct", json={"text": PAGE_TEXT, "instruction": INSTRUCTION,
                                                               "max_new_tokens": NEW_TOKENS})
    assert response.status_code == 200, response.text
    family = LAYOUTS[layout][0]
    source, source_processor = layouts["models"][family]
    assert response.json()["answer"] == _answer(source, source_processor, load_bundle(directory).spec)


def test_resaved_v1_position_ids_must_be_positions(layouts):
    model, _ = layouts["models"]["v1"]
    state = v1.to_v1_state_dict(model.state_dict(), model.config)
    state["model.vision_model.embeddings.position_ids"] = torch.arange(17).flip(0).expand(1, -1)
    with pytest.raises(ValueError, match="position_ids"):
        v1.convert_v1_state_dict(state, model.config)


def test_official_ocr2_with_weights_of_another_size_is_refused(layouts, tmp_path):
    directory = tmp_path / "bad"
    model, processor = layouts["models"]["ocr2"]
    write_ocr2_official(model, processor, directory)
    config = json.loads((directory / "config.json").read_text())
    config["language_config"]["num_hidden_layers"] = 3
    config["language_config"]["first_k_dense_replace"] = 1
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="do not match DeepSeek-OCR-2"):
        load_bundle(str(directory))


def test_published_ocr2_config_fields_give_the_released_architecture():
    """deepseek-ai/DeepSeek-OCR-2's config.json fields (no tiny extras) translate to the released
    model: the same sizes as `real_config()` (the converted checkpoint's config), parameter for
    parameter, and the tensor names the official code would save are exactly what the loader maps."""
    lang = {"bos_token_id": 0, "eos_token_id": 1, "first_k_dense_replace": 1, "hidden_size": 1280,
            "intermediate_size": 6848, "kv_lora_rank": None, "lm_head": True, "max_position_embeddings": 8192,
            "moe_intermediate_size": 896, "n_group": 1, "n_routed_experts": 64, "n_shared_experts": 2,
            "num_attention_heads": 10, "num_experts_per_tok": 6, "num_hidden_layers": 12, "num_key_value_heads": 10,
            "q_lora_rank": None, "qk_nope_head_dim": 0, "qk_rope_head_dim": 0, "rm_head": False, "topk_group": 1,
            "topk_method": "greedy", "use_mla": False, "v_head_dim": 0, "vocab_size": 129280}
    published = {
        "architectures": ["DeepseekOCR2ForCausalLM"], "model_type": "deepseek_vl_v2", "language_config": lang,
        "projector_config": {"input_dim": 896, "model_type": "mlp_projector", "n_embed": 1280,
                             "projector_type": "linear"},
        "vision_config": {
            "image_size": 1024, "mlp_ratio": 3.7362, "model_name": "deepencoderv2", "model_type": "vision",
            "width": {"sam_vit_b": {"downsample_channels": [512, 1024], "global_attn_indexes": [2, 5, 8, 11],
                                    "heads": 12, "layers": 12, "width": 768},
                      "qwen2-0-5b": {"dim": 896}}},
        "candidate_resolutions": [[1024, 1024]], "global_view_pos": "head", "tile_tag": "2D",
    }
    config = ocr2.config_from_official(published, image_token_id=128815)
    real = ocr2.real_config()
    with torch.device("meta"):
        ours = DeepseekOcr2ForConditionalGeneration(config)
        released = DeepseekOcr2ForConditionalGeneration(real)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in released.state_dict().items()}
    assert config.vision_config.encoder_config.rope_parameters["rope_theta"] == 1000000.0
    names = official_ocr2_state_dict(ours)
    assert all(n.startswith(("model.sam_model.", "model.qwen2_model.", "model.projector.layers.", "model.layers.",
                             "model.embed_tokens.", "model.norm.", "lm_head.")) or n == "model.view_seperator"
               for n in names)
    assert "model.layers.1.mlp.experts.63.down_proj.weight" in names and "model.qwen2_model.query_1024.weight" in names
