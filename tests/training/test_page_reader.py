from dataclasses import replace
import json
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from deepsynth.data.reading import (
    CODE_CHARS,
    INVOICE,
    INVOICE_ANSWERS,
    INVOICE_QUESTION,
    ITEMS,
    JOBS,
    KINDS,
    TRANSCRIBE,
    dictionary,
    invoice_variants,
    is_heldout,
    make_task,
    prose_paragraphs,
    question_phrasings,
)
import deepsynth.models
from deepsynth.inference.engines import make_engine
from deepsynth.models import load_model
from deepsynth.models.collate import IGNORE_INDEX, Collator
from deepsynth.models.generate import GenerationSettings
from deepsynth.models.deepseek_ocr2 import build_tiny_page, grow_decoder, image_tokens
from deepsynth.render import RenderConfig, render_text
from deepsynth.render.renderer import layout
from deepsynth.training.page_reader import (
    ANSWER_AFTER,
    FULL_PAGE,
    PAGE_STAGES,
    PRESET,
    PROBE_FILE,
    READ_FIRST_TOKENS,
    CharSlots,
    PageGate,
    PageStream,
    PageReaderConfig,
    document_task,
    ended_stage,
    evaluate_page_reader,
    fitted,
    heldout_sets,
    page_capacity,
    reader_preset,
    gaze_loss,
    grown,
    make_page_example,
    pretrain_page_reader,
    similarity,
)
from deepsynth.training.reader_pretrain import StageSchedule, render_fingerprint


def test_heldout_paragraphs_names_and_values_never_reach_training_tasks():
    train, held = prose_paragraphs("train"), prose_paragraphs("heldout")
    assert train and held and not set(train) & set(held)
    assert {is_heldout(p) for p in held} == {True} and {is_heldout(p) for p in train} == {False}
    rng = random.Random(0)
    for split in ("train", "heldout"):
        for _ in range(60):
            for kind in ("prose_qa", "form_qa", "invoice_qa"):
                task = make_task(rng, kind, split, max_lines=8)
                assert task.answer and task.answer in task.text  # the answer is on the page
                if task.answer in ITEMS + JOBS:
                    continue  # items and jobs are common words, not held-out entities
                price = kind == "invoice_qa" or task.meta.get("slot") == "price"
                value = task.answer.rsplit(" ", 1)[0] if price else task.answer
                assert is_heldout(value) == (split == "heldout"), (kind, task)


def test_tasks_are_seeded_and_cover_every_kind_and_phrasing():
    def draw(seed):
        rng = random.Random(seed)
        return [make_task(rng, kind, "train", max_lines=6) for kind in KINDS for _ in range(5)]

    assert draw(1) == draw(1) and draw(1) != draw(2)
    rng = random.Random(3)
    asked = {make_task(rng, "prose_qa", "heldout").instruction for _ in range(400)}
    templates = [q for qs in question_phrasings().values() for q in qs]
    assert sum(any(a.startswith(q.split("{")[0]) for a in asked) for q in templates) >= len(templates) - 6
    words = make_task(random.Random(4), "words", "train", max_lines=14).text
    assert len(dictionary()) > 1000 and words.count("\n") < 14
    with pytest.raises(ValueError, match="kind='poem'"):
        make_task(rng, "poem")
    with pytest.raises(ValueError, match="split='test'"):
        make_task(rng, "words", "test")


def test_a_locate_question_asks_for_the_words_after_a_phrase_that_occurs_once():
    rng = random.Random(7)
    counts = set()
    for split in ("train", "heldout"):
        for _ in range(200):
            task = make_task(rng, "locate_qa", split, max_lines=7, line_chars=15)
            quote = task.instruction.split('"')[1]
            words, anchor = task.text.split(), quote.split()
            at = [i for i in range(len(words)) if words[i:i + len(anchor)] == anchor]
            assert len(at) == 1, task  # the phrase says where to read
            count = task.meta["count"]
            assert task.answer == " ".join(words[at[0] + len(anchor):at[0] + len(anchor) + count])
            assert len(task.answer.split()) == count and ("word after" in task.instruction) == (count == 1)
            counts.add(count)
    assert counts == {1, 2, 3}


def test_a_phase_asks_the_share_of_locate_questions_it_is_given():
    stage = replace(fitted(FULL_PAGE, "reader-large"), question_share=1.0, locate=0.5)
    kinds = [make_page_example(random.Random(i), stage)["kind"] for i in range(80)]
    assert 25 <= kinds.count("locate_qa") <= 55 and len(set(kinds)) == 4
    plain = replace(stage, locate=0.0)
    assert {make_page_example(random.Random(i), plain)["kind"] for i in range(40)} <= {"prose_qa", "form_qa",
                                                                                       "invoice_qa"}
    with pytest.raises(ValueError, match="--locate=2"):
        PageReaderConfig(locate=2.0)


def test_transcription_answer_is_the_text_drawn_and_jitter_keeps_every_mark():
    render = RenderConfig.from_preset(PRESET)
    rng = random.Random(5)
    for _ in range(10):
        example = make_page_example(rng, FULL_PAGE, jitter=0)
        if example["instruction"] == TRANSCRIBE:
            assert example["answer"] == render_text(example["answer"], render)[0].text
    still = make_page_example(random.Random(6), FULL_PAGE, jitter=0)
    moved = make_page_example(random.Random(6), FULL_PAGE, jitter=6)
    assert still["answer"] == moved["answer"]
    ink = [int((np.asarray(e["pages"][0].convert("L")) < 128).sum()) for e in (still, moved)]
    assert ink[0] == ink[1] > 0 and still["pages"][0].tobytes() != moved["pages"][0].tobytes()
    with pytest.raises(ValueError, match="--jitter=9"):
        PageReaderConfig(jitter=9)


def test_the_curriculum_grows_the_page_and_then_moves_it_further():
    assert all(stage.font_size == 0 for stage in PAGE_STAGES)  # the preset's type from the first step
    lines = [stage.max_lines for stage in PAGE_STAGES]
    jitters = [stage.jitter for stage in PAGE_STAGES]
    assert lines == sorted(lines) and jitters == sorted(jitters) and jitters[0] == 0 and FULL_PAGE.jitter == 6
    rng = random.Random(7)
    first = [make_page_example(rng, PAGE_STAGES[0], jitter=6) for _ in range(8)]  # the stage's 0 px wins
    assert all(e["pages"][0].tobytes() == render_text(e["answer"], RenderConfig.from_preset(PRESET))[0].image.tobytes()
               for e in first)
    # Documents (--documents): prose wrapped over 2 or 3 pages, cut to the rung's pages.
    render = RenderConfig.from_preset(PRESET)
    pages = [len(render_text(document_task(random.Random(i)).text, render)) for i in range(12)]
    assert min(pages) >= 2 and 3 in pages
    last = len(PAGE_STAGES) - 1
    assert PAGE_STAGES[last].documents == 0 and PAGE_STAGES[last].max_pages == 2
    stream = PageStream(PageReaderConfig(documents=1.0), None, [], StageSchedule(last))
    stream.rng, stream.render_config = random.Random(3), render
    drawn = [stream.draw(stream.stage(0)) for _ in range(6)]
    assert all(len(e["pages"]) == 2 for e in drawn if e["instruction"] == TRANSCRIBE)
    assert any(e["instruction"] == TRANSCRIBE for e in drawn)
    # --kinds replaces every rung's transcription kinds, e.g. with codes (no word tells the next character).
    stream = PageStream(PageReaderConfig(kinds="codes", question_share=0.0), None, [], StageSchedule(last))
    stream.rng, stream.render_config = random.Random(4), render
    assert stream.stage(0).kinds == ("codes",)
    assert all(set(stream.draw(stream.stage(0))["answer"]) <= set(CODE_CHARS + "\n") for _ in range(4))
    with pytest.raises(ValueError, match="--kinds='words,poems' is invalid"):
        PageReaderConfig(kinds="words,poems")
    codes = make_task(random.Random(8), "codes", "heldout", max_lines=3, line_chars=6)
    assert all(1 <= len(line) <= 6 and set(line) <= set(CODE_CHARS) for line in codes.text.split("\n"))


def slot_text(slots: CharSlots, labels, token_row: int, slot_row: int) -> str:
    """One slot row of a page's character-slot targets as text (blank slots as spaces)."""
    chars = {i: ch for ch, i in slots.char_ids.items()}
    return "".join(chars[int(labels[token_row * slots.grid + col, slot_row * slots.cols + c])]
                   for col in range(slots.grid) for c in range(slots.cols))


def test_character_slots_put_every_character_where_the_page_draws_it():
    _, processor = build_tiny_page()
    render = RenderConfig.from_preset(PRESET)
    slots = CharSlots.for_reader(processor, render)
    # 32 px tokens of the 8 px preset's characters: 4 per token and line, 2 lines per token.
    assert (slots.cell, slots.grid, slots.rows, slots.cols) == (32, 8, 2, 4)
    text = "Total: 4,250 euros\nmixed Case words"
    placed = layout(text, render)[0]
    still = slots.labels(placed, render)
    assert still.shape == (64, 8)
    drawn = {(r, s): slot_text(slots, still, r, s) for r in range(8) for s in range(2)}
    # The 8 px margin is one slot; the first line's middle lies in the lower half of the first token
    # row, the second line's (16 px further down) in the upper half of the next.
    assert {k: v.rstrip() for k, v in drawn.items() if v.strip()} == {(0, 1): " Total: 4,250 euros",
                                                                     (1, 0): " mixed Case words"}
    # Moved one character right and one line down: every target moves one slot right, one row down.
    moved = slots.labels(placed, render, dx=8, dy=16)
    assert slot_text(slots, moved, 1, 0).rstrip() == "  Total: 4,250 euros"
    assert slot_text(slots, moved, 1, 1).rstrip() == "  mixed Case words"
    with pytest.raises(ValueError, match="square page"):
        CharSlots.for_reader(processor, RenderConfig.from_preset(PRESET, page_height=320))


def test_the_large_type_preset_puts_a_line_in_each_token_row_and_two_characters_in_a_token():
    _, processor = build_tiny_page()
    render = RenderConfig.from_preset("reader-large")
    assert page_capacity(PRESET) == (14, 30) and page_capacity("reader-large") == (7, 15)
    slots = CharSlots.for_reader(processor, render)
    assert (slots.cell, slots.grid, slots.rows, slots.cols) == (32, 8, 1, 2)
    placed = layout("Total: 4,250\neuros", render)[0]
    labels = slots.labels(placed, render)
    # 16 px characters from the 8 px margin: each one's middle is on a slot's left edge.
    assert slot_text(slots, labels, 0, 0).rstrip() == " Total: 4,250" and slot_text(slots, labels, 1, 0).rstrip() == " euros"
    # The rungs, written for the small type's page, are capped at what the large one holds.
    assert [fitted(s, "reader-large").max_lines for s in PAGE_STAGES] == [3, 6, 7, 7, 7, 7]
    assert {fitted(s, "reader-large").line_chars for s in PAGE_STAGES} == {15} and fitted(FULL_PAGE, PRESET) == FULL_PAGE
    stream = PageStream(PageReaderConfig(preset="reader-large", question_share=0.0), None, [], StageSchedule(4))
    stream.rng, stream.render_config = random.Random(2), render
    drawn = [stream.draw(stream.stage(0)) for _ in range(6)]
    assert all(len(e["pages"]) == 1 and e["answer"].count("\n") < 7 for e in drawn)
    assert max(len(line) for e in drawn for line in e["answer"].split("\n")) <= 15
    # --max-pages lets the last rung's documents run over 3 of these pages (the held-out paragraphs' length).
    stream = PageStream(PageReaderConfig(preset="reader-large", documents=1.0, question_share=0.0, max_pages=3), None,
                        [], StageSchedule(len(PAGE_STAGES) - 1))
    stream.rng, stream.render_config = random.Random(5), render
    assert stream.stage(0).max_pages == 3 and 3 in {len(stream.draw(stream.stage(0))["pages"]) for _ in range(4)}
    with pytest.raises(ValueError, match="--max-pages=9 is invalid"):
        PageReaderConfig(max_pages=9)
    # Held-out sets follow the preset; the questions are the same texts on both, so they compare.
    small, large = heldout_sets(4, preset=PRESET), heldout_sets(4, preset="reader-large")
    for kind in ("prose_qa", "form_qa", "invoice_qa"):
        assert [e["answer"] for e in small[kind]] == [e["answer"] for e in large[kind]]
        assert [e["instruction"] for e in small[kind]] == [e["instruction"] for e in large[kind]]
    assert all(max(len(line) for line in e["answer"].split("\n")) <= 15 for e in large["read"])
    with pytest.raises(ValueError, match="--preset='tiny' is invalid"):
        PageReaderConfig(preset="tiny")


def test_a_reader_folder_tells_the_preset_its_last_phase_read(tmp_path):
    assert reader_preset(str(tmp_path)) == PRESET  # no phases: the preset a reader had before presets were chosen
    (tmp_path / "reader_pretrain.json").write_text(json.dumps({"phases": [{"config": {"preset": "reader-large"}}]}))
    assert reader_preset(str(tmp_path)) == "reader-large"
    (tmp_path / "reader_pretrain.json").write_text(json.dumps({"phases": [{"config": {}}]}))
    assert reader_preset(str(tmp_path)) == PRESET


def test_examples_carry_the_slot_targets_of_every_page_as_moved():
    _, processor = build_tiny_page()
    render = RenderConfig.from_preset(PRESET)
    slots = CharSlots.for_reader(processor, render)
    example = make_page_example(random.Random(3), PAGE_STAGES[-1], jitter=6, slots=slots,
                                render=render)
    targets = example["aux_char_slots"]
    assert targets.shape == (len(example["pages"]), 64, 8)
    batch = Collator(processor, max_length=4096)([example])
    assert batch["aux_char_slots"].shape[0] == batch["pixel_values"].shape[0]
    # Every slot with a character has ink near it; most blank slots of the margin have none.
    ink = np.asarray(example["pages"][0].convert("L")) < 128
    for token, slot in (targets[0] != slots.blank).nonzero().tolist()[:40]:
        y = (token // 8) * 32 + (slot // 4) * 16
        x = (token % 8) * 32 + (slot % 4) * 8
        assert ink[max(0, y - 4):y + 20, max(0, x - 4):x + 12].any()


def test_gaze_targets_point_at_the_token_of_every_answer_character():
    _, processor = build_tiny_page()
    render = RenderConfig.from_preset(PRESET)
    slots = CharSlots.for_reader(processor, render)
    text = "Invoice KT-3381\nTotal due: 4,250 euros"
    placed = layout(text, render)
    drawn = "\n".join(line.text for line, _ in placed[0])
    # A transcription: every character but spaces and line breaks, at the token its slot is in.
    read = slots.gaze(drawn, placed, render, [(0, 0)])
    assert read.shape == (1, len(drawn))
    expected = [IGNORE_INDEX if p is None else p[0] for p in slots.places(placed[0], render)]
    assert read[0].tolist() == expected and sum(t != IGNORE_INDEX for t in expected) == len(drawn.replace(" ", "").replace("\n", ""))
    # A question: the value where the page draws it, also across a line the renderer wrapped;
    # a page moved by one token moves it by one token.
    value = slots.gaze("4,250 euros", placed, render, [(0, 0)])[0]
    assert value.tolist() == expected[drawn.index("4,250"):][:len("4,250 euros")] and value[5] == IGNORE_INDEX
    moved = slots.gaze("4,250 euros", placed, render, [(32, 0)])[0]
    assert torch.equal(moved[moved >= 0], value[value >= 0] + 1)
    assert (slots.gaze("5,000 euros", placed, render, [(0, 0)]) == IGNORE_INDEX).all()
    wrapped = layout("The total amount due is 4,250 euros.", render)
    assert "4,250\neuros" in "\n".join(line.text for line, _ in wrapped[0])
    assert (slots.gaze("4,250 euros", wrapped, render, [(0, 0)]) >= 0).sum() == len("4,250euros")
    # Two pages: one row each, a character's target on the page that draws it.
    two = layout(" ".join(["word"] * 150), render)[:2]
    answer = "\n".join("\n".join(line.text for line, _ in page) for page in two)
    both = slots.gaze(answer, two, render, [(0, 0), (0, 0)])
    first = len("\n".join(line.text for line, _ in two[0]))
    assert (both[1, :first] == IGNORE_INDEX).all() and (both[0, first:] == IGNORE_INDEX).all()
    assert (both[1, first:] >= 0).any()


def test_the_gaze_loss_teaches_the_last_layer_to_look_at_the_characters_it_writes():
    torch.manual_seed(0)
    model, processor = build_tiny_page()
    render = RenderConfig.from_preset(PRESET)
    slots = CharSlots.for_reader(processor, render)
    rng = random.Random(2)
    examples = [make_page_example(rng, PAGE_STAGES[1], render=render, slots=slots, targets=("gaze",)) for _ in range(2)]
    batch = Collator(processor, max_length=4096)([{k: v for k, v in e.items() if k != "kind"} for e in examples])
    targets = batch.pop("aux_gaze")
    attention = model.get_submodule("model.language_model.layers.2.self_attn")
    kept = {}
    attention.register_forward_pre_hook(lambda m, a, kw: kept.update(hidden=kw["hidden_states"],
                                                                      rope=kw["position_embeddings"]), with_kwargs=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)

    def step():
        model(**batch)
        loss, hits = gaze_loss(attention, kept["hidden"], kept["rope"], batch["input_ids"], batch["labels"], targets,
                               processor.image_token_id, 65, heads=2)
        return loss, hits

    first, first_hits = step()
    for _ in range(40):
        optimizer.zero_grad()
        loss, hits = step()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first.item() and hits > max(first_hits, 0.5)
    with pytest.raises(ValueError, match="gaze targets have 3 rows"):
        gaze_loss(attention, kept["hidden"], kept["rope"], batch["input_ids"], batch["labels"],
                  torch.cat([targets, targets[:1]]), processor.image_token_id, 65, heads=2)


def test_tiny_page_preset_reads_a_page_as_a_32_px_token_grid():
    model, processor = build_tiny_page()
    assert image_tokens(processor, 256, 256) == 8 * 8 + 1
    page = render_text("The total amount due is 4,250 euros.", RenderConfig.from_preset(PRESET))[0].image
    batch = Collator(processor, max_length=4096)([{"pages": [page], "instruction": TRANSCRIBE, "answer": "x"}])
    assert int((batch["input_ids"] == processor.image_token_id).sum()) == 8 * 8 + 1
    assert model(**batch).loss.item() > 0
    assert similarity("abc", "abc") == 1.0 and similarity("abcd", "abxd") == pytest.approx(0.75)


def test_a_grown_decoder_answers_as_before_until_its_new_parts_train(tmp_path):
    model, processor = build_tiny_page(seed=3)
    page = render_text("Total due: 4,250 euros.", RenderConfig.from_preset(PRESET))[0].image
    batch = Collator(processor, max_length=4096)([{"pages": [page], "instruction": TRANSCRIBE,
                                                   "answer": "Total due: 4,250 euros."}])
    bigger = grow_decoder(model, layers=5, hidden_size=288, intermediate_size=640)
    text = bigger.config.text_config
    assert (text.num_hidden_layers, text.hidden_size, text.num_attention_heads, text.num_key_value_heads,
            text.head_dim, text.intermediate_size) == (5, 288, 6, 6, 48, 640)
    assert len(bigger.model.language_model.layers) == 5 and text.mlp_layer_types == ["dense"] * 5
    model.eval(), bigger.eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, bigger(**batch).logits, atol=1e-4)
    # What writes the new parts into the residual stream starts at zero and gets a gradient.
    bigger.train()
    bigger(**batch).loss.backward()
    layers = bigger.model.language_model.layers
    assert layers[4].self_attn.o_proj.weight.grad.abs().sum() > 0
    assert layers[0].self_attn.o_proj.weight.grad[192:].abs().sum() > 0  # into the new dimensions
    assert layers[0].mlp.down_proj.weight.grad[:, 512:].abs().sum() > 0  # from the new MLP units
    assert bigger.model.multi_modal_projector.weight.grad[192:].abs().sum() > 0
    with pytest.raises(ValueError, match="would remove some"):
        grow_decoder(model, layers=2)
    with pytest.raises(ValueError, match="multiple of the head size 48"):
        grow_decoder(model, hidden_size=200)
    # A phase's --decoder-* options write the grown reader once, beside the phase's output, with
    # the character-slot probe widened to read the wider image embeddings as before.
    reader = tmp_path / "reader"
    model.save_pretrained(reader)
    processor.save_pretrained(reader)
    save_file({"proj.weight": torch.ones(8, 192), "proj.bias": torch.zeros(8)}, str(reader / PROBE_FILE))
    out = grown(str(reader), tmp_path / "phase.grown", layers=4, hidden_size=240)
    assert json.loads((out / "config.json").read_text())["text_config"]["num_hidden_layers"] == 4
    probe = load_file(str(out / PROBE_FILE))["proj.weight"]
    assert probe.shape == (8, 240) and probe[:, :192].eq(1).all() and probe[:, 192:].eq(0).all()
    assert grown(str(reader), out, layers=6) == out
    with pytest.raises(ValueError, match="--decoder-width=384 is invalid"):
        PageReaderConfig(decoder_width=384)


@pytest.mark.slow
def test_a_short_phase_saves_a_loadable_reader_scored_on_every_heldout_set(tmp_path):
    out = tmp_path / "page"
    last = len(PAGE_STAGES) - 1
    meta = pretrain_page_reader(PageReaderConfig(out=str(out), max_steps=3, batch_size=2, warmup_steps=1,
                                                 eval_examples=1, eval_every_minutes=1e6, start_stage=last,
                                                 gaze_loss=1.0, read_first=True))
    assert meta["step"] == 3 and meta["final_stage"] == last
    records = [json.loads(line) for line in (tmp_path / "page.run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and not r.get("final")]
    assert steps and all(0 <= r["slot_accuracy"] <= 1 and r["slot_loss"] > 0 for r in steps)
    assert all(0 <= r["gaze_accuracy"] <= 1 and r["gaze_loss"] > 0 for r in steps)
    # The probe trains beside the reader: saved in the checkpoint and beside the reader for a later
    # phase, which starts from it, not in the model.
    assert list((tmp_path / "page.run").glob("checkpoint-*/state/custom_checkpoint_0.pkl"))
    probe = load_file(str(out / PROBE_FILE))
    later = PageReaderConfig(out=str(tmp_path / "later"), init_from=str(out), start_stage=-1)
    stream = PageStream(later, None, [], StageSchedule(last))
    stream.render_config = RenderConfig.from_preset(PRESET)
    reader, processor = load_model(str(out))
    gate = PageGate(later, None, stream)
    [module] = gate.training_modules(SimpleNamespace(processor=processor, model=reader))
    assert torch.equal(module.proj.weight, probe["proj.weight"])
    assert set(meta["eval"]) == {"read", "read_shifted", "read_multipage", "prose_qa", "form_qa", "invoice_qa",
                                 "locate_qa"}
    assert set(meta["eval"]["prose_qa"]) >= {"em", "em_no_instruction"}
    saved = json.loads((out / "reader_pretrain.json").read_text())
    assert saved["render_fingerprint"] == render_fingerprint(PRESET)
    assert saved["phases"][-1]["config"]["preset"] == PRESET == reader_preset(str(out))  # resolved, then recorded
    model, processor = load_model(str(out))
    scores = evaluate_page_reader(model, Collator(processor, max_length=4096), n=1, ablate=False)
    assert 0 <= scores["read"]["char_similarity"] <= 1 and "em_no_instruction" not in scores["form_qa"]
    # A read-first reader says so in its decoding settings: every engine returns its answer alone.
    settings = GenerationSettings.from_model(model)
    assert settings.answer_after == ANSWER_AFTER and settings.max_new_tokens == READ_FIRST_TOKENS


def test_a_read_first_question_is_answered_after_the_pages_text():
    stage = replace(fitted(FULL_PAGE, "reader-large"), question_share=1.0, read_first=True)
    render = RenderConfig.from_preset("reader-large")
    for i in range(20):
        plain = make_page_example(random.Random(i), replace(stage, read_first=False), render=render)
        example = make_page_example(random.Random(i), stage, render=render)
        reading, answer = example["answer"].rsplit(ANSWER_AFTER, 1)
        assert answer == plain["answer"] and len(example["pages"]) == len(plain["pages"])
        assert answer.split(" ")[0] in reading.replace("\n", " ")  # the reading holds the answer
    transcribe = make_page_example(random.Random(0), replace(stage, question_share=0.0))
    assert ANSWER_AFTER not in transcribe["answer"]


def test_a_later_phase_starts_where_the_reader_ended_or_says_what_is_missing(tmp_path):
    (tmp_path / "reader_pretrain.json").write_text(json.dumps({"phases": [{"final_stage": 1}, {"final_stage": 4}]}))
    assert ended_stage(str(tmp_path)) == 4
    with pytest.raises(ValueError, match="reader_pretrain.json is missing"):
        ended_stage(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="-1 with --init-from"):
        PageReaderConfig(start_stage=-1)


SHIPPED_PAGE_READER = Path(deepsynth.models.__file__).parent / "checkpoints" / "tiny-reader"


def test_shipped_page_reader_matches_the_renderer():
    # The reader only reads pages drawn exactly as when it was trained.
    info = json.loads((SHIPPED_PAGE_READER / "reader_pretrain.json").read_text())
    assert info["render_fingerprint"] == render_fingerprint(reader_preset(str(SHIPPED_PAGE_READER)))


def test_shipped_page_reader_reads_text_it_never_saw_through_the_engine_ask_uses():
    # By name, with the page geometry its bundle states; held-out words only (1-2 lines: the
    # benchmark report has the longer pages).
    engine = make_engine("tiny-reader")
    rng = random.Random(5)
    texts = [make_task(rng, "words", "heldout", max_lines=2).text for _ in range(8)]
    answers = [a.answer for a in engine.ask_batch(texts, [TRANSCRIBE] * len(texts))]
    assert sum(similarity(a, t) for a, t in zip(answers, texts)) / len(texts) >= 0.85


def test_the_default_reader_answers_the_issues_invoice_and_its_variants(tmp_path):
    # `deepsynth ask invoice.txt -i "What is the total amount due?"`, no -m: the default reader.
    from typer.testing import CliRunner

    from deepsynth.cli import app

    (tmp_path / "invoice.txt").write_text(INVOICE + "\n")
    result = CliRunner().invoke(app, ["ask", str(tmp_path / "invoice.txt"), "-i", INVOICE_QUESTION])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() in INVOICE_ANSWERS
    docs = invoice_variants()
    answers = [a.answer.strip() for a in make_engine().ask_batch(docs, [INVOICE_QUESTION] * len(docs))]
    assert len(docs) == 21 and all(a in INVOICE_ANSWERS for a in answers), answers
    # The earlier default stays loadable by name (it reads 4-line `key: value` forms, not invoices).
    assert make_engine("form-reader").ask("alpha: 07\nbravo: 42", "bravo?").answer
