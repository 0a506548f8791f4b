import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepsynth.data import (
    DataValidationError,
    InstructionExample,
    read_examples,
    read_jsonl,
    read_parquet,
    write_examples,
    write_jsonl,
    write_parquet,
)


def ex(i=0, **kw):
    d = dict(id=f"ex-{i}", text=f"doc {i}\nline two", instruction="What?", answer=f"ans {i}")
    d.update(kw)
    return InstructionExample(**d)


EXAMPLES = [
    ex(0, meta={"facts": [["a", "1"]], "n": 3, "nested": {"x": None}}),
    ex(1, instruction="", source="squad"),
    ex(2, text="Ünïcødé — 日本語 \"quoted\"\ttab", answer="日本"),
    ex(3, text="crlf\r\nline\u2028sep\x85nel\rcr", answer="a\u2029b"),
]


# ------------------------------------------------------------------ validation


def test_valid_examples_pass():
    for e in EXAMPLES:
        e.validate()


@pytest.mark.parametrize("field", ["id", "text", "answer"])
def test_empty_required_field_names_id_and_field(field):
    e = ex(7, **{field: "   "})
    with pytest.raises(DataValidationError) as info:
        e.validate()
    msg = str(info.value)
    assert field in msg and "empty" in msg
    if field != "id":
        assert "ex-7" in msg
    assert info.value.field == field


def test_empty_instruction_allowed_by_default_but_can_be_forbidden():
    e = ex(3, instruction="")
    e.validate()
    with pytest.raises(DataValidationError, match="instruction"):
        e.validate(allow_empty_instruction=False)


@pytest.mark.parametrize(
    "field,kw,limit_name",
    [
        ("text", "max_text_chars", "max_text_chars=10"),
        ("instruction", "max_instruction_chars", "max_instruction_chars=10"),
        ("answer", "max_answer_chars", "max_answer_chars=10"),
    ],
)
def test_too_long_names_id_field_and_limit(field, kw, limit_name):
    e = ex(4, **{field: "x" * 11})
    with pytest.raises(DataValidationError) as info:
        e.validate(**{kw: 10})
    msg = str(info.value)
    assert "ex-4" in msg and repr(field) in msg and limit_name in msg and "11" in msg


def test_default_limits():
    ex(5, text="x" * 200_000).validate()
    with pytest.raises(DataValidationError, match="max_text_chars=200000"):
        ex(5, text="x" * 200_001).validate()
    with pytest.raises(DataValidationError, match="max_instruction_chars=4000"):
        ex(5, instruction="x" * 4_001).validate()
    with pytest.raises(DataValidationError, match="max_answer_chars=20000"):
        ex(5, answer="x" * 20_001).validate()


@pytest.mark.parametrize("field,value", [("text", 3), ("instruction", None), ("answer", ["a"]), ("source", 1)])
def test_wrong_type_names_field(field, value):
    with pytest.raises(DataValidationError) as info:
        ex(6, **{field: value}).validate()
    assert repr(field) in str(info.value) and "ex-6" in str(info.value) and "str" in str(info.value)


def test_meta_must_be_json_dict():
    with pytest.raises(DataValidationError, match="meta"):
        ex(8, meta=[1]).validate()
    with pytest.raises(DataValidationError, match="JSON"):
        ex(8, meta={"x": object()}).validate()


def test_is_a_value_error():
    assert issubclass(DataValidationError, ValueError)


# ------------------------------------------------------------------ dict conversion


def test_to_dict_from_dict_round_trip():
    for e in EXAMPLES:
        assert InstructionExample.from_dict(e.to_dict()) == e


def test_from_dict_defaults():
    e = InstructionExample.from_dict({"id": "a", "text": "t", "instruction": "q", "answer": "x"})
    assert e.source == "unknown" and e.meta == {}


def test_from_dict_missing_and_unknown_fields_name_where():
    with pytest.raises(DataValidationError) as info:
        InstructionExample.from_dict({"id": "a", "text": "t", "answer": "x"}, where="f.jsonl line 7")
    assert "f.jsonl line 7" in str(info.value) and "instruction" in str(info.value)
    with pytest.raises(DataValidationError) as info:
        InstructionExample.from_dict(
            {"id": "a", "text": "t", "instruction": "q", "answer": "x", "context": "c"}, where="here"
        )
    assert "here" in str(info.value) and "context" in str(info.value)
    with pytest.raises(DataValidationError, match="'id' must be str"):
        InstructionExample.from_dict({"id": 5, "text": "t", "instruction": "q", "answer": "x"})
    with pytest.raises(DataValidationError, match="object"):
        InstructionExample.from_dict(["not", "a", "dict"])


# ------------------------------------------------------------------ JSONL


def test_jsonl_round_trip(tmp_path):
    p = tmp_path / "sub" / "data.jsonl"
    write_jsonl(EXAMPLES, p)
    assert read_jsonl(p) == EXAMPLES
    lines = p.read_text(encoding="utf-8").rstrip("\n").split("\n")  # U+2028 etc. do not split
    assert len(lines) == len(EXAMPLES)
    assert "日本語" in lines[2]  # written as UTF-8, not \u escapes
    assert not list(tmp_path.glob("sub/.*tmp"))  # atomic write leaves no temp file


def test_jsonl_blank_lines_skipped(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [json.dumps(e.to_dict()) for e in EXAMPLES]
    p.write_text("\n" + rows[0] + "\n\n   \n" + "\n".join(rows[1:]) + "\n\n", encoding="utf-8")
    assert read_jsonl(p) == EXAMPLES


@pytest.mark.parametrize(
    "bad,needle",
    [
        ('{"id": "x", "text": "t", "instruction": "q", "answer": ', "invalid JSON"),
        ('{"id": "x", "text": "t", "answer": "a"}', "instruction"),
        ('{"id": "x", "text": "t", "instruction": "q", "answer": 3}', "answer"),
        ('{"id": "x", "text": "t", "instruction": "q", "answer": "a", "extra": 1}', "extra"),
        ('[1, 2]', "object"),
        ('{"id": "x", "text": "", "instruction": "q", "answer": "a"}', "empty"),
    ],
)
def test_bad_jsonl_line_reports_file_and_line(tmp_path, bad, needle):
    p = tmp_path / "bad.jsonl"
    good = [json.dumps(e.to_dict()) for e in EXAMPLES[:2]]
    # line 1 good, line 2 blank, line 3 good, line 4 bad
    p.write_text(good[0] + "\n\n" + good[1] + "\n" + bad + "\n", encoding="utf-8")
    with pytest.raises(DataValidationError) as info:
        read_jsonl(p)
    msg = str(info.value)
    assert "bad.jsonl line 4" in msg and needle in msg


def test_read_jsonl_without_validate_still_rejects_malformed_but_keeps_empty_text(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"id": "x", "text": "", "instruction": "q", "answer": "a"}\n', encoding="utf-8")
    assert read_jsonl(p, validate=False)[0].text == ""
    p.write_text('{"id": "x", "text": 1, "instruction": "q", "answer": "a"}\n', encoding="utf-8")
    with pytest.raises(DataValidationError, match="line 1"):
        read_jsonl(p, validate=False)


def test_duplicate_ids_rejected_on_write_and_read(tmp_path):
    dup = [ex(1), ex(2), ex(1, answer="other")]
    for suffix in (".jsonl", ".json", ".parquet"):
        with pytest.raises(DataValidationError, match="duplicate id 'ex-1'"):
            write_examples(dup, tmp_path / f"d{suffix}")
        assert not (tmp_path / f"d{suffix}").exists()
    p = tmp_path / "dup.jsonl"
    p.write_text("\n".join(json.dumps(e.to_dict()) for e in dup) + "\n", encoding="utf-8")
    with pytest.raises(DataValidationError) as info:
        read_jsonl(p)
    assert "duplicate id 'ex-1'" in str(info.value) and "line 3" in str(info.value)
    assert "line 1" in str(info.value)


def test_write_validates(tmp_path):
    with pytest.raises(DataValidationError, match="ex-9"):
        write_jsonl([ex(9, answer="")], tmp_path / "x.jsonl")
    assert not (tmp_path / "x.jsonl").exists()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.tuples(
            st.text(min_size=1).filter(str.strip),
            st.text(),
            st.text(min_size=1).filter(str.strip),
            st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3),
        ),
        max_size=5,
    )
)
def test_jsonl_round_trip_property(tmp_path, rows):
    examples = [
        InstructionExample(id=f"id{i}", text=t, instruction=q, answer=a, meta=m)
        for i, (t, q, a, m) in enumerate(rows)
    ]
    p = tmp_path / "prop.jsonl"
    write_jsonl(examples, p)
    assert read_jsonl(p) == examples


# ------------------------------------------------------------------ Parquet / dispatch


def test_parquet_round_trip(tmp_path):
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    write_parquet(EXAMPLES, p)
    assert read_parquet(p) == EXAMPLES
    table = pq.read_table(p)
    assert table.column_names == ["id", "text", "instruction", "answer", "source", "meta"]
    assert json.loads(table.column("meta")[0].as_py()) == EXAMPLES[0].meta


def test_parquet_errors_name_row_and_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": ["a"], "text": ["t"], "answer": ["x"]}), p)
    with pytest.raises(DataValidationError, match="instruction"):
        read_parquet(p)
    pq.write_table(
        pa.table({"id": ["a", "b"], "text": ["t", None], "instruction": ["q", "q"], "answer": ["x", "y"]}), p
    )
    with pytest.raises(DataValidationError, match="row 2.*'text' is null"):
        read_parquet(p)
    # source/meta optional
    pq.write_table(pa.table({"id": ["a"], "text": ["t"], "instruction": ["q"], "answer": ["x"]}), p)
    assert read_parquet(p) == [InstructionExample("a", "t", "q", "x")]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".JSONL"])
def test_read_write_examples_dispatch(tmp_path, suffix):
    p = tmp_path / f"d{suffix}"
    write_examples(EXAMPLES, p)
    assert read_examples(p) == EXAMPLES


def test_json_array_errors_name_record(tmp_path):
    p = tmp_path / "d.json"
    rows = [e.to_dict() for e in EXAMPLES]
    rows[1].pop("answer")
    p.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(DataValidationError, match="record 2.*answer"):
        read_examples(p)


def test_json_suffix_accepts_json_lines(tmp_path):
    p = tmp_path / "d.json"
    write_jsonl(EXAMPLES, tmp_path / "d.jsonl")
    p.write_text((tmp_path / "d.jsonl").read_text(encoding="utf-8"), encoding="utf-8")
    assert read_examples(p) == EXAMPLES


@pytest.mark.parametrize("name", ["d.csv", "d", "d.txt"])
def test_unsupported_suffix(tmp_path, name):
    with pytest.raises(DataValidationError, match="unsupported file type.*jsonl"):
        write_examples(EXAMPLES, tmp_path / name)
    with pytest.raises(DataValidationError, match="unsupported file type"):
        read_examples(tmp_path / name)
