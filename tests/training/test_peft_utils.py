"""LoRA targets per backbone, frozen vision, parameter report, gradient checkpointing, QLoRA gate, adapter upload."""

import logging
import re
from pathlib import Path

import pytest
import torch

from deepsynth.models import Collator, load_model
from deepsynth.render import RenderConfig, render_text
from deepsynth.training import peft_utils
from deepsynth.training.config import TrainerConfig
from deepsynth.training.trainer import apply_training_options

PRESET = RenderConfig.from_preset("tiny")
# preset -> (decoder prefix, vision prefix, projector parameter that stays trainable with frozen vision)
BACKBONES = {
    "tiny": ("model.language_model", "model.vision_tower", "model.multi_modal_projector.weight"),
    "tiny-qwen2-vl": ("model.language_model", "model.visual", "model.visual.merger.mlp.0.weight"),
    "tiny-idefics3": ("model.text_model", "model.vision_model", "model.connector.modality_projection.proj.weight"),
}


def batch(processor):
    page = render_text("alpha: 12", PRESET)[0].image
    return Collator(processor)([{"pages": [page], "instruction": "alpha?", "answer": "12"}] * 2)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_lora_targets_decoder_projections_and_frozen_vision_keeps_projector(name):
    decoder, vision, projector = BACKBONES[name]
    model, processor = load_model(name, seed=0)
    targets = peft_utils.lora_target_modules(model)
    matched = [n for n, m in model.named_modules() if re.fullmatch(targets, n)]
    assert matched and all(n.startswith(decoder + ".") for n in matched)
    assert {n.rsplit(".", 1)[-1] for n in matched} >= {"q_proj", "k_proj", "v_proj", "o_proj", "down_proj"}
    config = TrainerConfig(use_lora=True, lora_rank=2, lora_alpha=4, freeze_vision_encoder=True)
    wrapped = apply_training_options(model, config)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    report = peft_utils.trainable_parameter_report(wrapped)
    assert report["trainable"] == report["parts"]["lora"]["trainable"] > 0
    assert report["parts"]["vision"]["trainable"] == 0
    assert sum(p["total"] for p in report["parts"].values()) == report["total"]
    # Without LoRA, frozen vision leaves the projector (also Qwen2-VL's merger, inside `visual`) trainable.
    model, _ = load_model(name, seed=0)
    apply_training_options(model, TrainerConfig(freeze_vision_encoder=True))
    params = dict(model.named_parameters())
    assert params[projector].requires_grad
    assert not any(p.requires_grad for n, p in params.items() if n.startswith(vision + ".") and "merger" not in n)
    # A LoRA forward/backward reaches the adapters.
    model, processor = load_model(name, seed=0)
    wrapped = apply_training_options(model, TrainerConfig(use_lora=True, lora_rank=2, lora_alpha=4))
    wrapped(**batch(processor)).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in wrapped.named_parameters() if "lora_B" in n)


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model, processor = load_model("tiny", seed=5)
        model = apply_training_options(model, TrainerConfig(gradient_checkpointing=checkpointing))
        assert model.is_activation_checkpointing == checkpointing
        model.train()
        model(**batch(processor)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error")
def test_qlora_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="use_qlora.*use_lora"):
        TrainerConfig(use_qlora=True)
    model, _ = load_model("tiny")
    with pytest.raises(RuntimeError, match="QLoRA needs a CUDA GPU"):
        apply_training_options(model, TrainerConfig(use_lora=True, use_qlora=True))


@pytest.mark.gpu
def test_qlora_on_cuda_trains_adapters_on_a_4bit_decoder():
    bnb = pytest.importorskip("bitsandbytes")
    model, processor = load_model("tiny", seed=0)
    wrapped = apply_training_options(model, TrainerConfig(use_lora=True, use_qlora=True, lora_rank=2))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in wrapped.modules())
    loss = wrapped(**{k: v.cuda() for k, v in batch(processor).items()}).loss
    loss.backward()
    assert all("lora_" in n for n, p in wrapped.named_parameters() if p.requires_grad)


def test_push_adapters_to_hub_uploads_adapters_and_never_prints_the_token(monkeypatch, caplog, capsys, tmp_path):
    from huggingface_hub import HfApi

    model, processor = load_model("tiny", seed=0)
    wrapped = apply_training_options(model, TrainerConfig(use_lora=True, lora_rank=2, lora_alpha=4))
    calls = {}

    def create_repo(self, repo_id, private=False, exist_ok=False, repo_type=None, **kw):
        calls["create"] = dict(repo_id=repo_id, private=private, token=self.token)
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, **kw):
        calls["files"] = sorted(p.name for p in Path(folder_path).iterdir())
        calls["upload_repo"] = repo_id

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    secret = "hf_" + "s3cret" * 6
    monkeypatch.setenv("HF_TOKEN", secret)
    with caplog.at_level(logging.DEBUG):
        url = peft_utils.push_adapters_to_hub(wrapped, "me/deepsynth-lora", private=True, processor=processor)
    assert url == "https://huggingface.co/me/deepsynth-lora"
    assert calls["create"] == {"repo_id": "me/deepsynth-lora", "private": True, "token": secret}
    assert calls["upload_repo"] == "me/deepsynth-lora"
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "tokenizer.json"} <= set(calls["files"])
    out = capsys.readouterr()
    assert secret not in caplog.text + out.out + out.err
    # No token anywhere: a clear error; a model without adapters: another.
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    with pytest.raises(RuntimeError, match="no Hugging Face token"):
        peft_utils.push_adapters_to_hub(wrapped, "me/x")
    with pytest.raises(ValueError, match="no LoRA adapters"):
        peft_utils.push_adapters_to_hub(load_model("tiny")[0], "me/x", token="t")
