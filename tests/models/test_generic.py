"""Generic backend: tiny random Qwen2-VL / Qwen2.5-VL / Idefics3 through the collator, model, generation and trainer."""

import json

import pytest
import torch

from deepsynth.data.synthetic import SyntheticConfig, generate
from deepsynth.models import IGNORE_INDEX, Collator, load_model
from deepsynth.models.collate import CHAT_TEMPLATE_PROMPT, PLAIN_PROMPT, default_prompt_builder
from deepsynth.models.deepseek_ocr2 import tiny_processor
from deepsynth.models.generate import GenerationSettings, generate_answers
from deepsynth.render import RenderConfig, render_text
from deepsynth.training.config import TrainerConfig
from deepsynth.training.trainer import Trainer

PRESET = RenderConfig.from_preset("tiny")
FAMILIES = {  # preset -> (model class, text that the chat template puts before the answer)
    "tiny-qwen2-vl": ("Qwen2VLForConditionalGeneration", "<|im_start|>assistant\n"),
    "tiny-qwen2.5-vl": ("Qwen2_5_VLForConditionalGeneration", "<|im_start|>assistant\n"),
    "tiny-idefics3": ("Idefics3ForConditionalGeneration", "Assistant:"),
}


def page(text):
    return render_text(text, PRESET)[0].image


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request):
    model, processor = load_model(request.param, seed=1)
    return request.param, model, processor


def test_deepseek_gets_its_plain_layout_and_chat_models_get_their_template(family):
    name, model, processor = family
    assert default_prompt_builder(tiny_processor()) is PLAIN_PROMPT
    assert Collator(processor).prompt_builder is CHAT_TEMPLATE_PROMPT
    assert type(model).__name__ == FAMILIES[name][0]


def test_batch_forward_backward_generate_and_reload(family, tmp_path):
    name, model, processor = family
    collator = Collator(processor)
    batch = collator([
        {"pages": [page("alpha: 12")], "instruction": "alpha?", "answer": "12"},
        {"pages": [page("bravo: 7"), page("echo: 99")], "instruction": "echo?", "answer": "99 ok"},
    ])
    tok = processor.tokenizer
    image_id = model.config.image_token_id
    counts = [(row == image_id).sum().item() for row in batch["input_ids"]]
    assert counts[1] == 2 * counts[0] > 0
    for row, labels, answer in zip(batch["input_ids"], batch["labels"], ["12", "99 ok"]):
        supervised = labels[labels != IGNORE_INDEX]
        assert tok.decode(supervised[:-1]) == answer and supervised[-1] == tok.eos_token_id
        prompt = tok.decode(row[labels == IGNORE_INDEX][: (labels != IGNORE_INDEX).nonzero()[0].item()])
        # The chat template, not the raw layout: the answer follows the assistant header.
        assert prompt.endswith(FAMILIES[name][1]), prompt[-40:]
    if "mm_token_type_ids" in batch:  # per-token inputs padded like the ids, 0 outside the images
        assert batch["mm_token_type_ids"].shape == batch["input_ids"].shape
        assert torch.equal(batch["mm_token_type_ids"].bool(), batch["input_ids"] == image_id)

    model.train()
    loss = model(**batch).loss
    assert torch.isfinite(loss)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert any("lm_head" in n for n in grads) and any(("visual" in n or "vision" in n) for n in grads)
    model.zero_grad(set_to_none=True)

    pages = [[page("alpha: 12")], [page("bravo: 7"), page("echo: 99")]]
    settings = GenerationSettings(max_new_tokens=4)
    answers = generate_answers(model, collator, pages, ["alpha?", "echo?"], settings)
    assert len(answers) == 2
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    # The saved processor names the published class, so AutoProcessor loads it where torchvision exists.
    assert json.loads((tmp_path / "processor_config.json").read_text())["processor_class"] in (
        "Qwen2VLProcessor", "Qwen2_5_VLProcessor", "Idefics3Processor")
    again, processor2 = load_model(str(tmp_path))
    assert generate_answers(again, Collator(processor2), pages, ["alpha?", "echo?"], settings) == answers


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "tiny-idefics3"])
def test_trainer_runs_two_steps(name, tmp_path):
    data = generate(SyntheticConfig(facts_per_doc=2), 4, "train")
    config = TrainerConfig(model_name=name, output_dir=str(tmp_path / "run"), batch_size=2, max_steps=2,
                           learning_rate=1e-3, log_interval=1, seed=3)
    metrics, checkpoints = Trainer(config).train(data)
    assert metrics["train_steps"] == 2 and len(checkpoints) == 1
    assert metrics["loss_first"] is not None and metrics["loss_last"] is not None
    model, _ = load_model(metrics["final_model"])
    assert type(model).__name__ == FAMILIES[name][0]
