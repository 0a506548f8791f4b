import pytest
import torch

from deepsynth.models import IGNORE_INDEX, Collator, build_prompt
from deepsynth.models.collate import build_plain_prompt
from deepsynth.models.deepseek_ocr2 import tiny_processor
from deepsynth.render import RenderConfig, render_text

PRESET = RenderConfig.from_preset("tiny")


@pytest.fixture(scope="module")
def processor():
    return tiny_processor()


def page(text):
    return render_text(text, PRESET)[0].image


def test_prompt_layout():
    assert build_plain_prompt(2, "kilo?") == "<image><image>\nkilo?"  # the BOS is an id, not text
    assert build_prompt(2, "kilo?") == "<image><image>\nkilo?\n"  # raw: the shipped reader's
    for build in (build_plain_prompt, build_prompt):
        with pytest.raises(ValueError, match="at least one page"):
            build(0, "x")


def test_plain_prompts_start_with_one_bos(processor):
    ids = Collator(processor).encode_prompts([[page("a")]], ["kilo?"])["input_ids"][0]
    tok = processor.tokenizer
    assert ids == [tok.bos_token_id] + [processor.image_token_id] * 17 + tok.encode("\nkilo?", add_special_tokens=False)


def test_labels_cover_answer_and_eos_only(processor):
    collator = Collator(processor)
    batch = collator([
        {"pages": [page("alpha: 12")], "instruction": "alpha?", "answer": "12"},
        {"pages": [page("bravo: 7"), page("echo: 99")], "instruction": "echo? and more", "answer": "99 ok"},
    ])
    tok = processor.tokenizer
    image_id = processor.image_token_id
    # 17 image tokens per 256 px page: 4x4 patch grid + view separator.
    assert (batch["input_ids"][0] == image_id).sum() == 17
    assert (batch["input_ids"][1] == image_id).sum() == 34
    assert batch["pixel_values"].shape == (3, 3, 256, 256)
    for row, labels, mask, answer in zip(batch["input_ids"], batch["labels"], batch["attention_mask"], ["12", "99 ok"]):
        supervised = labels[labels != IGNORE_INDEX]
        assert tok.decode(supervised[:-1]) == answer
        assert supervised[-1] == tok.eos_token_id
        # Supervised positions carry the same ids as the input; padding is never supervised.
        pos = labels != IGNORE_INDEX
        assert torch.equal(row[pos], labels[pos])
        assert (mask[pos] == 1).all()
    # Right padding on the shorter example.
    assert batch["attention_mask"][0, -1] == 0 and batch["input_ids"][0, -1] == tok.pad_token_id


def test_aux_targets_come_out_per_page_beside_the_batch(processor):
    rows = [{"pages": [page("a")], "instruction": "a?", "answer": "a", "aux_marks": torch.zeros(1, 3)},
            {"pages": [page("b"), page("c")], "instruction": "b?", "answer": "b", "aux_marks": torch.ones(2, 3)}]
    batch = Collator(processor)(rows)
    assert torch.equal(batch["aux_marks"], torch.tensor([[0.0] * 3, [1.0] * 3, [1.0] * 3]))
    assert batch["pixel_values"].shape[0] == batch["aux_marks"].shape[0] == 3


def test_aux_rows_of_different_lengths_are_padded_with_the_ignore_index(processor):
    rows = [{"pages": [page("a")], "instruction": "a?", "answer": "ab", "aux_gaze": torch.tensor([[3, 4]])},
            {"pages": [page("b")], "instruction": "b?", "answer": "b", "aux_gaze": torch.tensor([[5]])}]
    batch = Collator(processor)(rows)
    assert batch["aux_gaze"].tolist() == [[3, 4], [5, IGNORE_INDEX]]


def test_too_long_example_is_an_error_not_a_cut(processor):
    collator = Collator(processor, max_length=30)
    with pytest.raises(ValueError, match="'long-1' needs .* max_length is 30"):
        collator([{"id": "long-1", "pages": [page("x")], "instruction": "q?", "answer": "a" * 40}])


def test_prompt_batch_is_left_padded(processor):
    collator = Collator(processor)
    batch = collator.prompt_batch([[page("a")], [page("b"), page("c")]], ["short?", "a longer instruction?"])
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][0, -1] == 1
    assert batch["attention_mask"][1].all()
    assert batch["pixel_values"].shape[0] == 3
