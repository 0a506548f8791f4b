"""DeepSeek-OCR's and DeepSeek-OCR-2's own prompt ("plain" layout), token for token.

DeepSeek's code (`infer` of both models, and their vLLM processors) builds a prompt as: the BOS id
(0), put there by the code, then the text `<image>...\\n{instruction}` split on `<image>`, each piece
encoded with add_special_tokens=False, each `<image>` expanded into the page's image tokens; no
roles, no newline after the instruction; labels are the answer and EOS. These tests build offline
a tokenizer configured like the released one (byte-level BPE `tokenizer.json` with DeepSeek's
`tokenizer_config.json` fields) and check the project's prompts against an independent
reimplementation of that rule, in training (Collator), decoding (incl. the page-feature path),
the bundle's layout choice, the trainer's bundles and the vLLM engine's requests. The shipped
reader keeps the "raw" layout it was trained on, with its prompt ids pinned.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoProcessor, AutoTokenizer

from deepsynth.data.synthetic import SyntheticConfig, generate
from deepsynth.models.bundle import PROMPT_LAYOUTS, ModelSpec, load_bundle, make_collator, read_spec, save_bundle
from deepsynth.models.collate import IGNORE_INDEX, PLAIN_PROMPT, RAW_PROMPT, Collator, default_prompt_builder
from deepsynth.models.deepseek_ocr2 import (
    DeepseekOcr2PatchReadoutForConditionalGeneration,
    set_crop_mode,
    tiny_config,
    tiny_processor,
)
from deepsynth.models.generate import Decoder, GenerationSettings
from deepsynth.models.registry import resolve
from deepsynth.render import RenderConfig, render_text
from deepsynth.training.config import TrainerConfig
from deepsynth.training.trainer import Trainer

BOS, EOS, PAD, IMAGE = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<image>"
GROUNDING = "<|grounding|>"
# DeepSeek's documented prompts (README, config.py of their vLLM scripts), without the `<image>\n` head.
MARKDOWN = f"{GROUNDING}Convert the document to markdown."
FREE_OCR = "Free OCR."
CORPUS = [
    "Convert the document to markdown.\n", "Free OCR.\n", "Parse the figure.\n", "Describe this image in detail.\n",
    "The total is 42.\n", "Locate the table in the image.\n", "alpha: 12\nbravo: 34\n", "What is the date?\n",
] * 20
PAGE = render_text("alpha: 12\nbravo: 34", RenderConfig.from_preset("tiny"))[0].image
# The shipped reader's prompt ids as the raw layout built them before "plain" existed (17 image
# tokens per 256 px page, then "\n" instruction "\n" in its character tokenizer, no BOS).
READER_ALPHA = [4] * 17 + [101, 15, 26, 30, 22, 15, 87, 101]
READER_TOTAL_TWO_PAGES = [4] * 34 + [101, 60, 29, 34, 15, 26, 87, 101]


# ---- a tokenizer configured like the released one ---------------------------------------------
def deepseek_like_tokenizer_files(folder, adds_bos: bool = False) -> None:
    """tokenizer.json (byte-level BPE trained here on a few sentences) and the tokenizer_config.json
    fields of DeepSeek-OCR's release: LlamaTokenizerFast, add_bos_token true, add_eos_token false,
    BOS id 0, EOS id 1, pad id 2, `<image>` and `<|grounding|>` as added special tokens.
    `adds_bos`: the tokenizer.json also carries a post-processor that prepends BOS (as a tokenizer
    converted by transformers 4 does), so that the tokenizer adds one by itself."""
    core = Tokenizer(models.BPE())
    # Pieces like DeepSeek's pre-tokenizer makes, with punctuation and the newline after it in one
    # piece, so that BPE can merge ".\n" (what a trailing newline does to the last prompt token).
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\s?[A-Za-z]+|\s?[0-9]+|[^A-Za-z0-9\s]+\s*|\s+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[BOS, EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(CORPUS, trainer)
    core.add_special_tokens([IMAGE, GROUNDING])
    if adds_bos:
        core.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                            special_tokens=[(BOS, 0)])
    core.save(str(folder / "tokenizer.json"))

    def added(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                "special": True}

    config = {
        "add_bos_token": True, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        "unk_token": None, "clean_up_tokenization_spaces": False, "legacy": True, "model_max_length": 8192,
        "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizerFast",
        "added_tokens_decoder": {str(core.token_to_id(t)): added(t) for t in (BOS, EOS, PAD, IMAGE, GROUNDING)},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=1))


def deepseek_like_processor(folder, adds_bos: bool = False):
    """A DeepSeek-OCR-2 processor (tiny page size) with that tokenizer, saved and loaded with
    AutoProcessor as a user loads a checkpoint."""
    tok_dir = folder / "tokenizer"
    tok_dir.mkdir(parents=True)
    deepseek_like_tokenizer_files(tok_dir, adds_bos)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    image_processor = tiny_processor().image_processor
    type(tiny_processor())(image_processor=image_processor, tokenizer=tokenizer, patch_size=16,
                           downsample_ratio=4).save_pretrained(folder)
    # the released tokenizer_config.json, not what save_pretrained rewrote
    deepseek_like_tokenizer_files(folder, adds_bos)
    processor = AutoProcessor.from_pretrained(folder)
    set_crop_mode(processor, "none")
    return processor


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    return deepseek_like_processor(tmp_path_factory.mktemp("deepseek-tokenizer"))


@pytest.fixture(scope="module")
def official_adding_bos(tmp_path_factory):
    return deepseek_like_processor(tmp_path_factory.mktemp("deepseek-tokenizer-bos"), adds_bos=True)


def page_tokens(processor) -> int:
    """Image tokens the processor gives one page (its own count)."""
    enc = processor(images=[PAGE], text=[processor.image_token], add_special_tokens=False, return_tensors="pt")
    return int((enc["input_ids"] == processor.image_token_id).sum())


def official_ids(processor, prompt: str, tokens_per_page: int) -> list[int]:
    """DeepSeek's rule, written out on its own: split on `<image>`, encode each piece without
    special tokens, each `<image>` becomes the page's image tokens, BOS id 0 in front."""
    tokenizer = processor.tokenizer
    pieces = prompt.split("<image>")
    ids: list[int] = []
    for i, piece in enumerate(pieces):
        ids += tokenizer.encode(piece, add_special_tokens=False)
        if i < len(pieces) - 1:
            ids += [tokenizer.convert_tokens_to_ids("<image>")] * tokens_per_page
    return [0] + ids


# ---- (a) token-identical prompts, (c) one BOS, (d) no trailing newline ------------------------
@pytest.mark.parametrize("which", ["official", "official_adding_bos"])
def test_plain_prompts_equal_deepseeks_rule_for_one_and_two_pages(which, request):
    processor = request.getfixturevalue(which)
    tokenizer = processor.tokenizer
    assert tokenizer.bos_token_id == 0 and tokenizer.eos_token_id == 1 and processor.image_token_id > 2
    adds = tokenizer("Free OCR.")["input_ids"][0] == 0
    assert adds == (which == "official_adding_bos")  # both kinds of tokenizer are covered
    collator = Collator(processor)
    assert collator.prompt_builder is PLAIN_PROMPT  # a DeepSeek processor without a bundle
    n = page_tokens(processor)
    assert n == 17  # 256 px page: 4 x 4 grid + view separator
    enc = collator.encode_prompts([[PAGE], [PAGE, PAGE]], [MARKDOWN, FREE_OCR])
    assert enc["input_ids"][0] == official_ids(processor, "<image>\n" + MARKDOWN, n)
    assert enc["input_ids"][1] == official_ids(processor, "<image><image>\n" + FREE_OCR, n)
    for ids, instruction in zip(enc["input_ids"], [MARKDOWN, FREE_OCR]):
        assert ids.count(0) == 1 and ids[0] == 0  # exactly one BOS, first
        tail = tokenizer.encode("\n" + instruction, add_special_tokens=False)
        assert ids[-len(tail):] == tail  # the instruction's last token ends the prompt: no "\n" after it
    # generation prompts: left padding, then the same ids
    batch = collator.prompt_batch([[PAGE], [PAGE, PAGE]], [MARKDOWN, FREE_OCR])
    for row, mask, ids in zip(batch["input_ids"], batch["attention_mask"], enc["input_ids"]):
        assert row[mask.bool()].tolist() == ids


def test_a_trailing_newline_would_change_the_last_token_not_only_add_one(official):
    # why "plain" has no newline after the instruction: byte-level BPE merges ".\n", so the raw
    # layout's prompt does not even end with the instruction's own last token
    tok = official.tokenizer
    plain = tok.encode("\n" + FREE_OCR, add_special_tokens=False)
    with_newline = tok.encode("\n" + FREE_OCR + "\n", add_special_tokens=False)
    assert with_newline[:len(plain)] != plain
    raw = Collator(official, prompt_builder=RAW_PROMPT).encode_prompts([[PAGE]], [FREE_OCR])["input_ids"][0]
    assert raw != official_ids(official, "<image>\n" + FREE_OCR, page_tokens(official))


def test_v1_processor_gets_the_same_rule(tmp_path):
    from deepsynth.models.deepseek_ocr_v1 import build_tiny_v1

    _, v1 = build_tiny_v1()
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    deepseek_like_tokenizer_files(tok_dir)
    processor = type(v1)(image_processor=v1.image_processor, tokenizer=AutoTokenizer.from_pretrained(tok_dir))
    collator = Collator(processor)
    assert collator.prompt_builder is PLAIN_PROMPT
    n = page_tokens(processor)
    assert n == 4 * 5 + 1  # v1: a newline token after each row of the 4 x 4 grid, one separator
    ids = collator.encode_prompts([[PAGE, PAGE]], [MARKDOWN])["input_ids"][0]
    assert ids == official_ids(processor, "<image><image>\n" + MARKDOWN, n)


# ---- (b) labels --------------------------------------------------------------------------------
def test_labels_are_the_answer_and_eos_only(official_adding_bos):
    processor = official_adding_bos
    tok = processor.tokenizer
    answers = ["The total is 42.", "alpha: 12"]
    batch = Collator(processor)([{"pages": [PAGE], "instruction": MARKDOWN, "answer": answers[0]},
                                 {"pages": [PAGE, PAGE], "instruction": FREE_OCR, "answer": answers[1]}])
    n = page_tokens(processor)
    prompts = [official_ids(processor, "<image>\n" + MARKDOWN, n), official_ids(processor, "<image><image>\n" + FREE_OCR, n)]
    for row, labels, mask, prompt, answer in zip(batch["input_ids"], batch["labels"], batch["attention_mask"],
                                                 prompts, answers):
        target = tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id]
        length = int(mask.sum())
        assert row[:length].tolist() == prompt + target  # the answer follows the instruction directly
        assert labels[:length].tolist() == [IGNORE_INDEX] * len(prompt) + target
        assert (labels[length:] == IGNORE_INDEX).all()


def test_a_tokenizer_without_bos_is_a_clear_error():
    processor = tiny_processor()
    processor.tokenizer.bos_token = None
    with pytest.raises(ValueError, match="'plain' prompt layout starts with a BOS token.*no bos_token"):
        Collator(processor).encode_prompts([[PAGE]], ["x"])


# ---- decoding: the page-feature path builds the same prompt ----------------------------------
def test_decoder_feature_path_gives_the_collators_ids(official_adding_bos):
    processor = official_adding_bos
    tok = processor.tokenizer
    torch.manual_seed(0)
    model = DeepseekOcr2PatchReadoutForConditionalGeneration(tiny_config(
        vocab_size=len(tok), image_token_id=processor.image_token_id, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    spec = ModelSpec(backend="deepseek-ocr-2", crop_mode="none", prompt_layout="plain")
    decoder = Decoder(model, make_collator(model, processor, spec), GenerationSettings(max_new_tokens=3),
                      encodes_pages=True)
    assert decoder.encodes_pages
    pages, instructions = [[PAGE], [PAGE, PAGE]], [MARKDOWN, FREE_OCR]
    features = decoder.prepare_inputs(pages, instructions)
    pixels = decoder.collator.prompt_batch(pages, instructions)
    assert torch.equal(features["input_ids"], pixels["input_ids"])
    assert torch.equal(features["attention_mask"], pixels["attention_mask"])
    n = page_tokens(processor)
    rows = decoder.run(pages, instructions)
    assert [r["prompt_tokens"] for r in rows] == [len(official_ids(processor, "<image>\n" + MARKDOWN, n)),
                                                  len(official_ids(processor, "<image><image>\n" + FREE_OCR, n))]


# ---- (e) the shipped reader keeps its layout and ids -----------------------------------------
def test_shipped_reader_keeps_the_raw_layout_and_its_prompt_ids():
    assert read_spec(resolve("form-reader")).prompt_layout == "raw"
    loaded = load_bundle("form-reader")
    decoder = loaded.decoder()
    assert decoder.collator.prompt_builder is RAW_PROMPT and decoder.encodes_pages
    enc = decoder.collator.encode_prompts([[PAGE], [PAGE, PAGE]], ["alpha?", "Total?"])
    assert enc["input_ids"] == [READER_ALPHA, READER_TOTAL_TWO_PAGES]
    features = decoder.prepare_inputs([[PAGE], [PAGE, PAGE]], ["alpha?", "Total?"])
    assert features["input_ids"][0][features["attention_mask"][0].bool()].tolist() == READER_ALPHA
    assert features["input_ids"][1].tolist() == READER_TOTAL_TWO_PAGES


def test_a_bundle_without_a_layout_field_means_raw(tmp_path):
    data = ModelSpec(backend="deepseek-ocr-2").to_dict()
    del data["prompt_layout"]
    assert ModelSpec.from_dict(data).prompt_layout == "raw"
    assert set(PROMPT_LAYOUTS) == {"plain", "raw", "chat-template"}


# ---- (f) what the trainer writes ----------------------------------------------------------------
def _trainer(tmp_path, model_name: str, **options) -> Trainer:
    return Trainer(TrainerConfig(model_name=model_name, output_dir=str(tmp_path), batch_size=2, max_steps=1,
                                 learning_rate=1e-3, seed=5, save_interval=0, **options))


def test_training_a_preset_writes_a_plain_bundle_that_reloads_with_it(tmp_path):
    trainer = _trainer(tmp_path / "run", "tiny")
    assert trainer.base_spec.prompt_layout == "plain"
    metrics, _ = trainer.train(generate(SyntheticConfig(facts_per_doc=2), 4, "train"))
    assert read_spec(metrics["final_model"]).prompt_layout == "plain"
    again = load_bundle(metrics["final_model"])
    assert again.spec.prompt_layout == "plain" and again.decoder().collator.prompt_builder is PLAIN_PROMPT
    ids = again.decoder().collator.encode_prompts([[PAGE]], ["alpha?"])["input_ids"][0]
    tok = again.processor.tokenizer
    assert ids == [tok.bos_token_id] + [again.processor.image_token_id] * 17 + tok.encode("\nalpha?",
                                                                                           add_special_tokens=False)


def test_fine_tuning_keeps_the_layout_of_its_base(tmp_path):
    # the reader (raw bundle) stays raw; a checkpoint folder without a bundle is DeepSeek's plain
    assert _trainer(tmp_path / "reader", "form-reader").spec().prompt_layout == "raw"
    base = load_bundle("tiny")
    base.model.save_pretrained(tmp_path / "hub")
    base.processor.save_pretrained(tmp_path / "hub")
    assert _trainer(tmp_path / "from-hub", str(tmp_path / "hub")).spec().prompt_layout == "plain"
    assert _trainer(tmp_path / "from-preset", "tiny-deepseek-ocr-v1").spec().prompt_layout == "plain"


def test_a_run_can_ask_for_a_layout_and_the_reader_recipe_asks_for_raw(tmp_path):
    from deepsynth.training.reader_pretrain import PretrainConfig, trainer_config

    # `make reader` starts from a fresh tiny model and re-creates the shipped (raw) reader
    assert trainer_config(PretrainConfig(), tmp_path).prompt_layout == "raw"
    trainer = _trainer(tmp_path / "raw", "tiny", prompt_layout="raw")
    assert trainer.spec().prompt_layout == "raw" and trainer.decoder().collator.prompt_builder is RAW_PROMPT
    with pytest.raises(ValueError, match=r"TrainerConfig.prompt_layout='chat' is invalid: must be None or one of"):
        TrainerConfig(prompt_layout="chat")


def test_a_processor_without_a_bundle_gets_plain_and_others_keep_theirs():
    assert default_prompt_builder(tiny_processor()) is PLAIN_PROMPT
    assert load_bundle("tiny").spec.prompt_layout == "plain"


# ---- (g) the vLLM engine's request ----------------------------------------------------------------
def _vllm_prompt(processor, layout: str, pages: int, instruction: str) -> dict:
    from deepsynth.vllm.engine import vllm_prompt

    return vllm_prompt(ModelSpec(backend="deepseek-ocr-2", prompt_layout=layout), processor, [PAGE] * pages,
                       instruction)


def _expand(ids: list[int], image_id: int, n: int) -> list[int]:
    """What vLLM's prompt update does: each page's image token becomes that page's n tokens."""
    return [t for i in ids for t in ([image_id] * n if i == image_id else [i])]


@pytest.mark.parametrize("which", ["official", "official_adding_bos"])
def test_vllm_request_of_a_plain_model_gives_the_official_ids(which, request):
    processor = request.getfixturevalue(which)
    n = page_tokens(processor)
    for pages, instruction in ((1, MARKDOWN), (2, FREE_OCR)):
        prompt = _vllm_prompt(processor, "plain", pages, instruction)
        # token ids, not text: vLLM would tokenize text with the tokenizer's own special tokens
        assert "prompt" not in prompt and len(prompt["multi_modal_data"]["image"] if pages > 1 else [1]) == pages
        ids = prompt["prompt_token_ids"]
        assert ids.count(processor.image_token_id) == pages
        assert _expand(ids, processor.image_token_id, n) == official_ids(
            processor, "<image>" * pages + "\n" + instruction, n)


def test_vllm_request_of_the_reader_stays_text():
    loaded = load_bundle("form-reader")
    prompt = _vllm_prompt(loaded.processor, loaded.spec.prompt_layout, 1, "alpha?")
    assert prompt["prompt"] == "<image>\nalpha?\n"
    ids = loaded.processor.tokenizer(prompt["prompt"])["input_ids"]
    assert _expand(ids, loaded.processor.image_token_id, 17) == READER_ALPHA


def test_a_saved_plain_bundle_round_trips(tmp_path):
    loaded = load_bundle("form-reader")
    save_bundle(tmp_path, loaded.model, loaded.processor, replace(loaded.spec, prompt_layout="plain"))
    assert load_bundle(str(tmp_path)).decoder().collator.prompt_builder is PLAIN_PROMPT


# ---- the text-encoder channel: placeholders in the plain layout -------------------------------
def test_text_encoder_placeholders_follow_the_plain_layout():
    from deepsynth.models.text_encoder import SoftPromptModel, TextEncoderModule

    base, processor = load_bundle("tiny")[:2]
    wrapped = SoftPromptModel(base, TextEncoderModule("tiny-qwen2"))
    batch = Collator.for_model(wrapped, processor)([{"pages": [PAGE], "instruction": "alpha?", "answer": "12"}])
    tok = processor.tokenizer
    k = int(batch["instruction_attention_mask"][0].sum())
    prompt = [tok.bos_token_id] + [processor.image_token_id] * 17 + tok.encode("\n", add_special_tokens=False) \
        + [tok.pad_token_id] * k
    answer = tok.encode("12", add_special_tokens=False) + [tok.eos_token_id]
    assert batch["input_ids"][0].tolist() == prompt + answer
    assert batch["instruction_positions"][0].tolist() == [False] * (len(prompt) - k) + [True] * k + [False] * 3
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * len(prompt) + answer
