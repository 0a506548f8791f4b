import pytest
import torch

from deepsynth.data.synthetic import SyntheticConfig, generate
from deepsynth.models import Collator, load_model
from deepsynth.models.generate import GenerationSettings, generate_answers
from deepsynth.models.text_encoder import MINILM, SoftPromptModel, TextEncoderModule, make_projection
from deepsynth.render import RenderConfig, render_text
from deepsynth.training.config import TrainerConfig
from deepsynth.training.text_encoder import TextEncoderModule as SeedPath
from deepsynth.training.trainer import Trainer

PAGE = render_text("alpha: 12\nbravo: 34", RenderConfig.from_preset("tiny"))[0].image


def batch_for(model, processor):
    return Collator.for_model(model, processor)([
        {"pages": [PAGE], "instruction": "alpha?", "answer": "12"},
        {"pages": [PAGE], "instruction": "what is the value of bravo", "answer": "34"},
    ])


def test_seed_import_path_is_the_same_class():
    assert SeedPath is TextEncoderModule


@pytest.mark.parametrize("name", ["tiny-qwen2", MINILM])
def test_encode_shapes_and_pooling(name):
    enc = TextEncoderModule(name)
    pooled = enc.encode(["hello world", "alpha?"])
    states, mask = enc.encode_tokens(["hello world", "alpha?"])
    assert pooled.shape == (2, enc.hidden_size)
    assert states.shape[:2] == mask.shape and states.shape[2] == enc.hidden_size
    manual = (states[1] * mask[1, :, None]).sum(0) / mask[1].sum()
    assert torch.allclose(pooled[1], manual, atol=1e-5)


def test_projection_created_when_sizes_differ_or_forced():
    assert isinstance(make_projection(384, 192), torch.nn.Linear)
    assert isinstance(make_projection(3584, 1280), torch.nn.Linear)
    assert isinstance(make_projection(192, 192), torch.nn.Identity)
    assert isinstance(make_projection(192, 192, force=True), torch.nn.Linear)


@pytest.mark.parametrize("name,trainable", [("tiny-qwen2", False), ("tiny-qwen2", True), (MINILM, False), (MINILM, True)])
def test_gradients_reach_projection_and_encoder_only_when_trainable(name, trainable):
    model, processor = load_model("tiny", seed=1)
    wrapped = SoftPromptModel(model, TextEncoderModule(name, trainable=trainable))
    batch = batch_for(wrapped, processor)
    # One placeholder per real encoder token, in the prompt only.
    assert batch["instruction_positions"].sum(1).tolist() == batch["instruction_attention_mask"].sum(1).tolist()
    assert not (batch["instruction_positions"] & (batch["labels"] != -100)).any()
    wrapped(**batch).loss.backward()
    assert wrapped.projection.weight.grad.abs().sum() > 0
    enc_grads = [p.grad for p in wrapped.text_encoder.parameters()]
    if trainable:
        assert any(g is not None and g.abs().sum() > 0 for g in enc_grads)
    else:
        assert all(g is None for g in enc_grads)


def test_instruction_changes_the_output():
    model, processor = load_model("tiny", seed=1)
    wrapped = SoftPromptModel(model, TextEncoderModule("tiny-qwen2"))
    collator = Collator.for_model(wrapped, processor)
    a = collator.prompt_batch([[PAGE]], ["alpha?"])
    b = collator.prompt_batch([[PAGE]], ["bravo?"])
    with torch.no_grad():
        la = wrapped(**a).logits[0, -1]
        lb = wrapped(**b).logits[0, -1]
    assert not torch.allclose(la, lb)


def test_trainer_with_text_encoder_saves_and_reloads(tmp_path):
    data = generate(SyntheticConfig(facts_per_doc=2), 8, "train")
    cfg = TrainerConfig(model_name="tiny", output_dir=str(tmp_path), batch_size=2, max_steps=2, use_text_encoder=True,
                        text_encoder_model="tiny-qwen2", text_encoder_trainable=True, learning_rate=1e-3)
    trainer = Trainer(cfg)
    metrics, _ = trainer.train(data)
    loaded, processor = load_model(metrics["final_model"])
    assert isinstance(loaded, SoftPromptModel)
    trained = trainer.accelerator.unwrap_model(trainer._prepared)
    for (n, a), (_, b) in zip(trained.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    settings = GenerationSettings(max_new_tokens=4)
    pages, ins = [[PAGE], [PAGE]], ["alpha?", "bravo?"]
    assert generate_answers(trained, Collator.for_model(trained, processor), pages, ins, settings) == \
        generate_answers(loaded, Collator.for_model(loaded, processor), pages, ins, settings)


def test_projection_gets_its_own_learning_rate():
    from deepsynth.training.trainer import build_optimizer

    cfg = TrainerConfig(model_name="tiny", use_text_encoder=True, text_encoder_model="tiny-qwen2",
                        use_text_projection=True, learning_rate=1e-4, projection_learning_rate=2e-3)
    model, _ = load_model("tiny")
    wrapped = SoftPromptModel(model, TextEncoderModule("tiny-qwen2"), use_projection=True)
    groups = build_optimizer(wrapped, cfg).param_groups
    assert [g["lr"] for g in groups] == [1e-4, 2e-3]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in wrapped.projection.parameters()}
    plain = build_optimizer(model, cfg).param_groups
    assert len(plain) == 1 and plain[0]["lr"] == 1e-4
    with pytest.raises(ValueError, match="projection_learning_rate"):
        TrainerConfig(projection_learning_rate=0.0)
