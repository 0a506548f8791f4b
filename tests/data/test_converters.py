"""Converters: fixture records in each source's real schema (plain dicts as in the release files,
and the layout `datasets.load_dataset` gives), awkward records included; the known helpers."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import datasets
import pytest
from PIL import Image

from deepsynth.data import DataValidationError, InstructionExample
from deepsynth.data import converters as C
from deepsynth.data.instruction_dataset import (
    InstructionDataset,
    create_instruction_dataset_from_qa,
    create_instruction_dataset_from_summarization,
)
from deepsynth.render import RenderConfig, render_text

FIX = Path(__file__).parent / "fixtures"
TINY = RenderConfig.from_preset("tiny")


def rows(name: str) -> list[dict]:
    with open(FIX / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def hub(name: str, tmp_path) -> datasets.Dataset:
    """The fixture as `datasets.load_dataset` returns it (dict-of-lists for Sequence-of-dict)."""
    return datasets.load_dataset("json", data_files=str(FIX / name), split="train", cache_dir=str(tmp_path / "c"))


def qrels() -> list[dict]:
    with open(FIX / "fiqa" / "qrels" / "test.tsv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def by_id(examples):
    return {e.id: e for e in examples}


# ------------------------------------------------------------------ SQuAD


def test_squad_answers_unicode_and_unanswerable_skip(tmp_path):
    stats = C.ConversionStats()
    out = C.convert_squad(rows("squad_v2.jsonl"), errors="collect", stats=stats)
    ex = by_id(out)
    assert ex["56be4db0acb8001400a502ec"].answer == "a golden statue of the Virgin Mary"
    assert ex["56be4db0acb8001400a502ed"].meta["answers"] == ["the Basilica of the Sacred Heart",
                                                             "Basilica of the Sacred Heart"]
    jp = ex["5a8d7bf7df8bba001a0f9ab1"]
    assert jp.answer == "東京" and jp.text[jp.meta["answer_start"][0]:].startswith("東京")
    assert all(e.answer in e.text and e.meta["extractive"] for e in out)
    assert stats.seen == 5 and stats.converted == 3
    assert stats.skipped == {"unanswerable": 1}
    # an answers list holding only "" is a data error, reported with the record and the field
    assert len(stats.rejected) == 1 and stats.rejected[0]["id"] == "5a8d7bf7df8bba001a0f9ab3"
    assert "'answer' is empty" in stats.rejected[0]["reason"]
    # the datasets layout gives the same records
    assert C.convert_squad(hub("squad_v2.jsonl", tmp_path), errors="collect") == out


def test_squad_unanswerable_fixed_answer_and_raise():
    out = C.convert_squad(rows("squad_v2.jsonl")[:4], no_answer="unanswerable")
    un = by_id(out)["5a8d7bf7df8bba001a0f9ab2"]
    assert un.answer == "unanswerable" and un.meta["answerable"] is False and not un.meta["extractive"]
    with pytest.raises(DataValidationError, match=r"row 4: .*'answer' is empty") as info:
        C.convert_squad(rows("squad_v2.jsonl"))
    assert info.value.field == "answer"
    with pytest.raises(ValueError, match="no_answer"):
        C.convert_squad(rows("squad_v2.jsonl")[3:4], no_answer="  ")


def test_very_long_document_is_rejected_naming_the_limit():
    row = dict(rows("squad_v2.jsonl")[0], id="long", context="word " * 50_000 + "a golden statue of the Virgin Mary")
    stats = C.ConversionStats()
    assert C.convert_squad([row], errors="collect", stats=stats) == []
    assert "max_text_chars=200000" in stats.rejected[0]["reason"]
    # long but within limits: kept whole, answer still found
    row["context"] = "word " * 20_000 + "a golden statue of the Virgin Mary"
    (ex,) = C.convert_squad([row])
    assert len(ex.text) > 100_000 and ex.answer in ex.text


# ------------------------------------------------------------------ Natural Questions


def test_natural_questions_answer_priority_and_html(tmp_path):
    stats = C.ConversionStats()
    out = C.convert_natural_questions(rows("natural_questions.jsonl"), stats=stats)
    ex = by_id(out)
    assert stats.skipped == {"no_answer": 1} and len(out) == 4
    for e in out:
        assert "<" not in e.text and ">" not in e.text  # no HTML markup
    short = ex["797803103760793766"]
    assert short.answer == "Larry Page and Sergey Brin" and short.meta["answer_type"] == "short"
    assert short.instruction == "who founded google"
    assert short.text.split("\n")[0] == "Google"  # the heading is its own line
    yes = ex["-1220107454853145579"]
    assert yes.answer == "yes" and yes.meta["answer_type"] == "yes_no"
    assert "Müller — 東京" in yes.text
    long = ex["5225754983651766092"]  # first annotation empty, second has the long answer
    assert long.meta["answer_type"] == "long" and long.answer.startswith("The Nile is") and long.answer in long.text
    multi = ex["8466196474705624850"]
    assert multi.answer == "Mountain View, California"
    assert all(s in multi.text for s in multi.meta["answer_spans"])
    assert C.convert_natural_questions(hub("natural_questions.jsonl", tmp_path)) == out


def test_natural_questions_options_and_simplified_schema():
    out = C.convert_natural_questions(rows("natural_questions.jsonl"), no_answer="no answer")
    assert by_id(out)["4549465242785278785"].answer == "no answer"
    para = by_id(C.convert_natural_questions(rows("natural_questions.jsonl"), context="long_answer"))
    assert para["797803103760793766"].text.startswith("Google LLC was founded")
    assert "4549465242785278785" not in para
    (simple,) = C.convert_natural_questions(rows("nq_simplified.jsonl"))
    assert simple.id == "797803103760793766" and simple.answer == "Larry Page and Sergey Brin"
    assert simple.text == by_id(out)["797803103760793766"].text
    with pytest.raises(ValueError, match="context="):
        C.convert_natural_questions(rows("nq_simplified.jsonl"), context="page")


def test_nq_tokens_to_text_blocks():
    toks = ["<Table>", "<Tr>", "<Td>", "a", "</Td>", "<Td>", "b", "</Td>", "</Tr>", "<Tr>", "<Td>", "c", "</Td>", "</Tr>",
            "</Table>", "<P>", "x", "<A>", "y", "</A>", "</P>"]
    html = [t.startswith("<") for t in toks]
    assert C.nq_tokens_to_text(toks, html) == "a b\nc\nx y"


# ------------------------------------------------------------------ MS MARCO


def test_ms_marco_well_formed_preferred_and_no_answer(tmp_path):
    stats = C.ConversionStats()
    out = C.convert_ms_marco(rows("ms_marco.jsonl"), stats=stats)
    ex = by_id(out)
    assert stats.skipped == {"no_answer": 1} and "19699" not in ex
    assert ex["1185869"].answer == "College tuition costs approximately $15,000 per year."
    assert ex["1185869"].meta["answer_type"] == "well_formed"
    assert ex["1185868"].answer == "Yes" and ex["1185868"].meta["answer_type"] == "answer"
    assert ex["1185869"].text.startswith("[1] The average annual cost") and "\n\n[2] Tuition" in ex["1185869"].text
    assert ex["1185869"].meta["selected_passages"] == [1]
    assert "„Straße“" in ex["524332"].text
    assert C.convert_ms_marco(hub("ms_marco.jsonl", tmp_path)) == out
    plain = by_id(C.convert_ms_marco(rows("ms_marco.jsonl"), prefer_well_formed=False))
    assert plain["1185869"].answer == "Approximately $15,000 per year."
    fixed = by_id(C.convert_ms_marco(rows("ms_marco.jsonl"), no_answer=C.MS_MARCO_NO_ANSWER))
    assert fixed["19699"].answer == "No Answer Present." and fixed["19699"].meta["answer_type"] == "no_answer"
    sel = by_id(C.convert_ms_marco(rows("ms_marco.jsonl"), passages="selected"))
    assert "Tuition" not in sel["1185869"].text


# ------------------------------------------------------------------ FiQA


def test_fiqa_relevant_passages_among_distractors():
    corpus, queries = rows("fiqa/corpus.jsonl"), rows("fiqa/queries.jsonl")
    stats = C.ConversionStats()
    out = C.convert_fiqa(corpus, queries, qrels(), num_distractors=2, stats=stats)
    ex = by_id(out)
    assert set(ex) == {"0", "4", "5"}  # query 9 has no qrels: not part of the split
    q0 = ex["0"]
    assert q0.instruction == "What is considered a business expense on a business trip?"
    assert len(q0.meta["passage_ids"]) == 4  # 2 relevant + 2 distractors
    assert set(q0.meta["relevant_ids"]) == {"56", "59"}
    for label, cid in zip(q0.meta["relevant_passages"], sorted(q0.meta["relevant_ids"],
                                                               key=q0.meta["passage_ids"].index)):
        assert q0.meta["passage_ids"][label - 1] == cid and f"[{label}] " in q0.text
    assert all(span in q0.text for span in q0.meta["answer_spans"])
    assert "Business meals" in q0.answer and "Travel expenses" in q0.answer
    # deterministic, seed-dependent
    assert C.convert_fiqa(corpus, queries, qrels(), num_distractors=2) == out
    other = C.convert_fiqa(corpus, queries, qrels(), num_distractors=2, seed=1)
    assert [e.meta["passage_ids"] for e in other] != [e.meta["passage_ids"] for e in out]
    idx = by_id(C.convert_fiqa(corpus, queries, qrels(), answer_mode="index"))
    assert idx["4"].answer == f"[{idx['4'].meta['relevant_passages'][0]}]"
    assert idx["4"].instruction.endswith("Which passage answers the question?")


def test_fiqa_bad_inputs():
    corpus, queries = rows("fiqa/corpus.jsonl"), rows("fiqa/queries.jsonl")
    zero = [{"query-id": "4", "corpus-id": "31", "score": "0"}]
    assert C.convert_fiqa(corpus, queries, zero) == []  # score 0 is not relevant
    with pytest.raises(DataValidationError, match=r"not in the corpus"):
        C.convert_fiqa(corpus, queries, [{"query-id": "4", "corpus-id": "nope", "score": 1}])
    with pytest.raises(ValueError, match="answer_mode"):
        C.convert_fiqa(corpus, queries, qrels(), answer_mode="span")


# ------------------------------------------------------------------ summarisation + generic


def test_cnn_dailymail_and_xsum(tmp_path):
    stats = C.ConversionStats()
    (cnn,) = C.convert_cnn_dailymail(rows("cnn_dailymail.jsonl"), errors="collect", stats=stats)
    assert cnn.instruction == C.CNN_DAILYMAIL_INSTRUCTION and "£20M" in cnn.answer and "\n" in cnn.answer
    assert len(stats.rejected) == 1 and "'answer' is empty" in stats.rejected[0]["reason"]  # empty highlights
    xs = C.convert_xsum(hub("xsum.jsonl", tmp_path))
    assert [e.id for e in xs] == ["35232142", "40143035"] and xs[1].text.endswith("🌧 und das Wetter.")
    assert all(e.instruction == C.XSUM_INSTRUCTION for e in xs)


def test_instruction_variants_are_sampled_stably():
    variants = ["Summarize:", "Give the gist.", "TL;DR?", "One sentence summary."]
    data = [{"document": f"doc {i}", "summary": f"s {i}", "id": str(i)} for i in range(80)]
    a = C.convert_xsum(data, instruction_variants=variants)
    assert [e.instruction for e in a] == [e.instruction for e in C.convert_xsum(data, instruction_variants=variants)]
    picked = {e.id: e.instruction for e in a}
    assert {e.id: e.instruction for e in C.convert_xsum(data[::-1], instruction_variants=variants)} == picked
    assert set(picked.values()) == set(variants)  # all variants used over 80 examples
    assert [e.instruction for e in C.convert_xsum(data, instruction_variants=variants, seed=3)] != list(picked.values())


def test_generic_mapper(tmp_path):
    data = datasets.load_dataset("csv", data_files=str(FIX / "generic.csv"), split="train",
                                 cache_dir=str(tmp_path / "c"))
    stats = C.ConversionStats()
    out = C.convert_generic(data, text_field="body", target_field="tldr", instruction_field="prompt",
                            id_field="uid", errors="collect", stats=stats)
    assert [e.id for e in out] == ["a1", "a2"]
    assert out[0].instruction == "Give a TL;DR." and out[0].text.endswith('"quotes".')
    assert out[1].instruction == C.DEFAULT_SUMMARY_INSTRUCTION  # empty instruction cell -> default
    assert stats.rejected[0]["id"] == "a3"
    plain = C.convert_generic([{"t": "x", "y": ["", "first"]}], text_field="t", target_field="y")
    assert plain[0].id == "0" and plain[0].answer == "first"
    with pytest.raises(DataValidationError, match="text_field='body'"):
        C.convert_generic([{"t": "x", "y": "z"}], text_field="body", target_field="y")


def test_duplicate_ids_are_rejected_not_dropped():
    data = rows("xsum.jsonl") * 2
    with pytest.raises(DataValidationError, match=r"row 2: .*duplicate id"):
        C.convert_xsum(data)
    stats = C.ConversionStats()
    assert len(C.convert_xsum(data, errors="collect", stats=stats)) == 2 and len(stats.rejected) == 2


def test_detection_registry_and_options():
    assert C.detect_converter(["id", "title", "context", "question", "answers"]) == "squad"
    assert C.detect_converter(["id", "document", "question", "long_answer_candidates", "annotations"]) == "natural_questions"
    assert C.detect_converter(["example_id", "document_text", "question_text", "annotations"]) == "natural_questions"
    assert C.detect_converter(["answers", "passages", "query", "query_id", "query_type", "wellFormedAnswers"]) == "ms_marco"
    assert C.detect_converter(["article", "highlights", "id"]) == "cnn_dailymail"
    assert C.detect_converter(["document", "summary", "id"]) == "xsum"
    assert C.detect_converter(["id", "text", "instruction", "answer"]) == "instruction"
    assert C.detect_converter(["a", "b"]) is None
    assert C.KNOWN_DATASETS["squad_v2"].hub_id == "rajpurkar/squad_v2"
    assert C.KNOWN_DATASETS["rajpurkar/squad_v2"].converter == "squad"
    with pytest.raises(ValueError, match=r"has no option\(s\) \['no_answer'\]"):
        C.check_options("xsum", {"no_answer": "skip"})
    with pytest.raises(ValueError, match="unknown converter"):
        C.convert("nope", [])


def test_instruction_row_reads_meta_json():
    ex = C.instruction_row({"id": "a", "text": "t", "instruction": "", "answer": "x", "meta": '{"k": [1]}',
                            "source": None})
    assert ex == InstructionExample(id="a", text="t", instruction="", answer="x", meta={"k": [1]})
    with pytest.raises(DataValidationError, match="meta"):
        C.instruction_row({"id": "a", "text": "t", "instruction": "", "answer": "x", "meta": "{bad"})


# ------------------------------------------------------------------ the known helpers


def test_create_instruction_dataset_from_qa(tmp_path, caplog):
    data = hub("squad_v2.jsonl", tmp_path).select(range(4))
    ds = create_instruction_dataset_from_qa(data, render_config=TINY)
    assert isinstance(ds, InstructionDataset) and len(ds) == 3  # the unanswerable one is skipped...
    assert "skipped {'unanswerable': 1}" in caplog.text  # ...and said so
    item = ds[2]
    assert item["answer"] == "東京" and item["instruction"] == "Quelle est la capitale du Japon ?"
    assert item["pages"][0].size == (256, 256)
    kept = create_instruction_dataset_from_qa(data, no_answer="unanswerable", render_config=TINY)
    assert len(kept) == 4 and kept.examples[3].answer == "unanswerable"
    # answers as a plain list, other field names
    simple = create_instruction_dataset_from_qa([{"doc": "Paris is in France.", "q": "Where is Paris?", "a": ["France"]}],
                                                context_field="doc", question_field="q", answer_field="a")
    assert simple.examples[0].answer == "France" and simple.examples[0].id == "0"


def test_create_instruction_dataset_from_summarization():
    data = [{"text": "A long story about a cat.", "summary": "Cat story."},
            {"text": "Another text.", "summary": "Text."}]
    ds = create_instruction_dataset_from_summarization(data, "text", "summary", render_config=TINY)
    assert [ds[i]["instruction"] for i in range(2)] == ["Summarize:", "Summarize:"]
    assert ds[0]["answer"] == "Cat story."
    varied = create_instruction_dataset_from_summarization(data, "text", "summary", instruction_variants=["A", "B"],
                                                           render_config=TINY)
    assert all(e.instruction in ("A", "B") for e in varied.examples)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_prerendered_pages_from_an_image_column(monkeypatch):
    page_a = Image.new("RGB", (64, 48), (10, 20, 30))
    page_b = Image.new("L", (64, 48), 200)
    features = datasets.Features({"context": datasets.Value("string"), "question": datasets.Value("string"),
                                  "answers": {"text": datasets.List(datasets.Value("string")),
                                              "answer_start": datasets.List(datasets.Value("int32"))},
                                  "Image": datasets.List(datasets.Image())})
    data = datasets.Dataset.from_dict({
        "context": ["no answer here", "red green"], "question": ["?", "What colour?"],
        "answers": [{"text": [], "answer_start": []}, {"text": ["green"], "answer_start": [4]}],
        "Image": [[], [{"bytes": _png(page_a), "path": None}, {"bytes": _png(page_b), "path": None}]],
    }, features=features)
    import deepsynth.data.instruction_dataset as mod

    monkeypatch.setattr(mod, "render_text", lambda *a, **k: pytest.fail("pre-rendered pages must not be re-rendered"))
    ds = create_instruction_dataset_from_qa(data)
    assert len(ds) == 1
    pages = ds[0]["pages"]
    assert [p.size for p in pages] == [(64, 48), (64, 48)] and all(p.mode == "RGB" for p in pages)
    assert pages[0].getpixel((0, 0)) == (10, 20, 30) and pages[1].getpixel((0, 0)) == (200, 200, 200)


def test_instruction_dataset_keeps_its_behaviour():
    ex = [InstructionExample(id="a", text="hello world", instruction="", answer="x")]
    ds = InstructionDataset(ex, TINY, default_instruction="Read:")
    item = ds[0]
    assert set(item) == {"id", "pages", "instruction", "answer"} and item["instruction"] == "Read:"
    assert [p.tobytes() for p in item["pages"]] == [p.image.tobytes() for p in render_text("hello world", TINY)]
    with pytest.raises(ValueError, match="pages has 2 entries"):
        InstructionDataset(ex, TINY, pages=[[], []])
