import random
from collections import Counter

import pytest

from deepsynth.data import (
    KEYS,
    QUESTION_TEMPLATES,
    TRANSCRIBE_INSTRUCTION,
    InstructionExample,
    SyntheticConfig,
    chance_em,
    generate,
    generate_passages,
    make_document,
    read_jsonl,
    split_values,
    write_jsonl,
)
from deepsynth.data.synthetic import HELDOUT_SPLITS, fact_line


def test_defaults_are_the_fixed_task():
    c = SyntheticConfig()
    assert KEYS == ("alpha", "bravo", "delta", "echo", "golf", "kilo", "lima", "oscar")
    assert QUESTION_TEMPLATES == ("{key}?",) and TRANSCRIBE_INSTRUCTION == "read"
    assert (c.facts_per_doc, c.keys, c.value_digits, c.question_templates) == (4, KEYS, 2, ("{key}?",))
    assert (c.heldout_fraction, c.seed) == (0.2, 0)


def test_example_format():
    c = SyntheticConfig()
    exs = generate(c, 5)
    assert [e.id for e in exs] == [f"synth-train-{d:06d}-q0" for d in range(5)]
    for e in exs:
        e.validate()
        lines = e.text.split("\n")
        assert len(lines) == 4
        facts = [tuple(part.strip() for part in line.split(":")) for line in lines]
        assert lines == [fact_line(k, v, KEYS) for k, v in facts]
        assert [list(f) for f in facts] == e.meta["facts"]
        assert len({k for k, _ in facts}) == 4 and all(k in KEYS for k, _ in facts)
        assert all(len(v) == 2 and v.isdigit() for _, v in facts)
        key, value = facts[e.meta["line"]]
        assert e.meta["key"] == key and e.instruction == f"{key}?" and e.answer == value
        assert e.source == "synthetic" and e.meta["split"] == "train"


def test_make_document():
    c = SyntheticConfig(facts_per_doc=3)
    text, facts = make_document(random.Random(1), c, ["01", "02", "03", "04"])
    assert text == "\n".join(fact_line(k, v, c.keys) for k, v in facts)
    assert fact_line("echo", "42", KEYS) == "echo:  42" and fact_line("alpha", "42", KEYS) == "alpha: 42"
    assert len(facts) == 3 and len({v for _, v in facts}) == 3  # distinct values when possible
    text, facts = make_document(random.Random(1), c, ["05"])  # too few values: repeats allowed
    assert [v for _, v in facts] == ["05"] * 3


def test_determinism_and_variation():
    c = SyntheticConfig(seed=3)
    a = generate(c, 20, questions_per_doc=2, transcription=True)
    b = generate(SyntheticConfig(seed=3), 20, questions_per_doc=2, transcription=True)
    assert a == b
    texts = lambda exs: [e.text for e in exs]  # noqa: E731
    assert texts(generate(c, 20, seed_offset=1)) != texts(generate(c, 20))
    assert texts(generate(SyntheticConfig(seed=4), 20)) != texts(generate(c, 20))
    assert texts(generate(c, 20, split="test")) != texts(generate(c, 20, split="eval"))
    # documents do not depend on which kinds of examples are emitted
    q = generate(c, 10, kinds=("question",))
    t = generate(c, 10, kinds=("transcribe",))
    assert texts(q) == texts(t)
    # a prefix of a longer run is the shorter run
    assert generate(c, 30)[:20] == generate(c, 20)


def test_split_values_partition():
    for digits in (1, 2, 3):
        c = SyntheticConfig(value_digits=digits, seed=7)
        train, held = split_values(c)
        assert set(train).isdisjoint(held)
        assert sorted(train + held) == [f"{i:0{digits}d}" for i in range(10**digits)]
        assert len(held) == round(0.2 * 10**digits)
        assert split_values(c) == (train, held)
    assert split_values(SyntheticConfig(seed=1))[1] != split_values(SyntheticConfig(seed=2))[1]


@pytest.mark.parametrize("split", HELDOUT_SPLITS)
def test_heldout_values_never_in_train(split):
    c = SyntheticConfig(seed=11)
    train_values, held_values = split_values(c)
    train = generate(c, 300, questions_per_doc=4, transcription=True)
    held = generate(c, 100, split=split, questions_per_doc=2)
    train_values_seen = {v for e in train for _, v in e.meta["facts"]}
    train_lines_seen = {line for e in train for line in e.text.split("\n")}
    assert train_values_seen <= set(train_values)
    for e in train:
        assert e.answer in train_values or e.meta["kind"] == "transcribe"
    for e in held:
        assert e.meta["split"] == split and e.id.startswith(f"synth-{split}-")
        for key, value in e.meta["facts"]:  # every line of a held-out doc has a held-out value
            assert value in held_values and value not in train_values_seen
            assert fact_line(key, value, c.keys) not in train_lines_seen
        assert e.answer in held_values


def test_answers_are_found_in_text():
    c = SyntheticConfig(facts_per_doc=6, value_digits=3, question_templates=("{key}?", "what is {key}?"))
    for split in ("train", "heldout"):
        for e in generate(c, 50, split=split, questions_per_doc=3, transcription=True):
            if e.meta["kind"] == "question":
                assert fact_line(e.meta["key"], e.answer, c.keys) in e.text.split("\n")
                assert e.instruction in (f"{e.meta['key']}?", f"what is {e.meta['key']}?")
            else:
                assert e.instruction == TRANSCRIBE_INSTRUCTION and e.answer == e.text
    for e in generate_passages(50, seed=2, facts_per_doc=4, questions_per_doc=4):
        assert e.answer in e.text


def test_questions_per_doc_and_kinds():
    c = SyntheticConfig()
    exs = generate(c, 3, questions_per_doc=4, transcription=True)
    assert [e.id for e in exs[:5]] == [
        "synth-train-000000-q0", "synth-train-000000-q1", "synth-train-000000-q2",
        "synth-train-000000-q3", "synth-train-000000-t",
    ]
    assert sorted(e.meta["line"] for e in exs[:4]) == [0, 1, 2, 3]  # distinct lines
    assert len({e.id for e in exs}) == len(exs) == 15
    only_t = generate(c, 3, kinds=("transcribe",))
    assert [e.meta["kind"] for e in only_t] == ["transcribe"] * 3
    assert generate(c, 3, kinds=("transcribe", "question")) == generate(c, 3, transcription=True)
    with pytest.raises(ValueError, match="questions_per_doc"):
        generate(c, 1, questions_per_doc=5)
    with pytest.raises(ValueError, match="kinds"):
        generate(c, 1, kinds=("summary",))
    with pytest.raises(ValueError, match="transcription"):
        generate(c, 1, kinds=("question",), transcription=True)
    with pytest.raises(ValueError, match="split"):
        generate(c, 1, split="dev")


def test_jsonl_round_trip_of_generated(tmp_path):
    exs = generate(SyntheticConfig(), 10, questions_per_doc=2, transcription=True) + generate_passages(5)
    write_jsonl(exs, tmp_path / "s.jsonl")
    assert read_jsonl(tmp_path / "s.jsonl") == exs


def test_chance_em_matches_instruction_blind_reader():
    c = SyntheticConfig()
    assert chance_em(c) == 0.25
    assert chance_em(SyntheticConfig(facts_per_doc=8)) == 0.125
    # a reader that ignores the instruction and answers a random line's value
    rng = random.Random(0)
    exs = generate(c, 4000, split="heldout")
    hits = sum(rng.choice(e.text.split("\n")).split(":")[1].strip() == e.answer for e in exs)
    assert abs(hits / len(exs) - chance_em(c)) < 0.03
    # the asked line is uniform, so always answering line 0 is also at chance
    counts = Counter(e.meta["line"] for e in exs)
    assert all(abs(n / len(exs) - 0.25) < 0.03 for n in counts.values())


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(facts_per_doc=0), "facts_per_doc"),
        (dict(facts_per_doc=9), "len\\(keys\\)=8"),
        (dict(value_digits=0), "value_digits"),
        (dict(value_digits=7), "value_digits <= 6"),
        (dict(heldout_fraction=0.0), "heldout_fraction"),
        (dict(heldout_fraction=1.0), "heldout_fraction"),
        (dict(question_templates=("what?",)), "\\{key\\}"),
        (dict(question_templates=("{key} {value}?",)), "question_templates"),
        (dict(question_templates=()), "question_templates"),
        (dict(keys=("a", "a")), "distinct"),
        (dict(keys=()), "keys"),
        (dict(keys=("a:b",)), "keys"),
    ],
)
def test_config_errors_name_field_and_limit(kw, needle):
    with pytest.raises(ValueError, match=needle):
        SyntheticConfig(**kw)


def test_config_accepts_lists():
    c = SyntheticConfig(keys=["x", "y"], facts_per_doc=2, question_templates=["{key}?"])
    assert c.keys == ("x", "y") and c.question_templates == ("{key}?",)


def test_passages():
    a = generate_passages(20, seed=1, facts_per_doc=3, questions_per_doc=2)
    assert a == generate_passages(20, seed=1, facts_per_doc=3, questions_per_doc=2)
    assert a != generate_passages(20, seed=2, facts_per_doc=3, questions_per_doc=2)
    assert len(a) == 40 and len({e.id for e in a}) == 40
    for e in a:
        assert isinstance(e, InstructionExample)
        e.validate()
        assert e.instruction.split()[0] in ("Who", "When", "How", "Where")
        assert e.answer in e.text and e.source == "synthetic-passages"
        f = e.meta["facts"][e.meta["fact"]]
        expected = {"who": f["name"], "when": f["date"], "how much": f["amount"], "where": f["city"]}
        assert e.answer == expected[e.meta["qtype"]]
    qtypes = {e.meta["qtype"] for e in generate_passages(50, questions_per_doc=4)}
    assert qtypes == {"who", "when", "how much", "where"}
    train_names = {f["name"] for e in generate_passages(200) for f in e.meta["facts"]}
    held_names = {f["name"] for e in generate_passages(50, split="heldout") for f in e.meta["facts"]}
    assert train_names.isdisjoint(held_names)
    with pytest.raises(ValueError, match="facts_per_doc"):
        generate_passages(1, facts_per_doc=0)
    with pytest.raises(ValueError, match="questions_per_doc"):
        generate_passages(1, facts_per_doc=1, questions_per_doc=5)


def test_form_layout_keeps_field_order_and_heldout_values():
    from deepsynth.data.synthetic import SyntheticConfig, generate, split_values

    cfg = SyntheticConfig(layout="form", facts_per_doc=4)
    _, held = split_values(cfg)
    for ex in generate(cfg, 20, "heldout"):
        assert [k for k, _ in ex.meta["facts"]] == list(cfg.keys[:4])
        assert all(v in held for _, v in ex.meta["facts"])
    import pytest

    with pytest.raises(ValueError, match="layout"):
        SyntheticConfig(layout="grid")


def test_heldout_docs_are_new_pages_over_train_values():
    cfg = SyntheticConfig(layout="form", facts_per_doc=4)
    train_values, _ = split_values(cfg)
    train_texts = {ex.text for ex in generate(cfg, 500, "train")}
    docs = generate(cfg, 100, "heldout_docs")
    assert all(v in train_values for ex in docs for _, v in ex.meta["facts"])
    assert len({ex.text for ex in docs} & train_texts) == 0
    assert [ex.text for ex in docs] == [ex.text for ex in generate(cfg, 100, "heldout_docs")]
    with pytest.raises(ValueError, match="heldout_docs"):
        generate_passages(1, split="heldout_docs")
