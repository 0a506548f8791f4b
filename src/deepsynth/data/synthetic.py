"""Seeded synthetic document Q&A whose answers can only be found by reading the page.

Two generators:

* :func:`generate` — key/value pages (``"alpha: 07\\nkilo: 42\\n..."``) with short questions
  (``"kilo?"`` -> ``"42"``) and optional transcription examples (``"read"`` -> the full text).
  This exact task trains the project's tiny reader, so its formats and defaults are fixed.
  The value space is split once (per seed) into train values and held-out values; held-out
  documents use held-out values only, so no held-out ``(key, value)`` line is ever seen in
  training, and a reader that ignores the instruction scores :func:`chance_em`. The
  ``"heldout_docs"`` split holds out documents but not values (new pages over the train values).
* :func:`generate_passages` — short prose passages (names, dates, amounts, cities) with
  "Who/When/How much/Where" questions, for examples with larger models.

Everything is a pure function of its arguments: the same config and seed give identical output.
"""

from __future__ import annotations

import datetime as _dt
import functools
import logging
import random
from dataclasses import dataclass
from typing import Iterable, Sequence

from deepsynth.data.schema import InstructionExample

logger = logging.getLogger(__name__)

__all__ = [
    "KEYS",
    "QUESTION_TEMPLATES",
    "TRANSCRIBE_INSTRUCTION",
    "KINDS",
    "TRAIN_SPLITS",
    "HELDOUT_SPLITS",
    "HELDOUT_DOC_SPLITS",
    "SyntheticConfig",
    "split_values",
    "fact_line",
    "make_document",
    "generate",
    "chance_em",
    "generate_passages",
]

KEYS: tuple[str, ...] = ("alpha", "bravo", "delta", "echo", "golf", "kilo", "lima", "oscar")
QUESTION_TEMPLATES: tuple[str, ...] = ("{key}?",)
TRANSCRIBE_INSTRUCTION = "read"
LAYOUTS = ("shuffled", "form")

KINDS: tuple[str, ...] = ("question", "transcribe")
TRAIN_SPLITS: tuple[str, ...] = ("train",)
HELDOUT_SPLITS: tuple[str, ...] = ("heldout", "test", "eval", "validation")
#: Held-out documents over the *train* values (key/value pages only): new pages from their own
#: random stream, so they test finding the asked line apart from reading a never-seen value.
HELDOUT_DOC_SPLITS: tuple[str, ...] = ("heldout_docs",)


def _check_split(split: str, extra: tuple[str, ...] = ()) -> None:
    allowed = TRAIN_SPLITS + HELDOUT_SPLITS + extra
    if split not in allowed:
        raise ValueError(f"split={split!r} is not supported; use one of {list(allowed)}")


@dataclass
class SyntheticConfig:
    facts_per_doc: int = 4  # lines "key: value" per document; keys distinct, order random
    keys: tuple[str, ...] = KEYS
    value_digits: int = 2  # values are zero-padded decimal strings, e.g. "07"
    question_templates: tuple[str, ...] = QUESTION_TEMPLATES
    heldout_fraction: float = 0.2  # share of the value space reserved for held-out splits
    seed: int = 0
    # "shuffled": a random subset of keys in random order (the question must find its line);
    # "form": the first facts_per_doc keys, always in the same order, like the fields of a form
    # (the question names a field whose place is fixed; the value must still be read).
    layout: str = "shuffled"

    def __post_init__(self) -> None:
        # accept lists from YAML/JSON configs but store tuples
        if isinstance(self.keys, str) or isinstance(self.question_templates, str):
            raise ValueError("SyntheticConfig.keys and question_templates must be sequences of str")
        self.keys = tuple(self.keys)
        self.question_templates = tuple(self.question_templates)
        if not self.keys:
            raise ValueError("SyntheticConfig.keys must not be empty")
        for k in self.keys:
            if not isinstance(k, str) or not k.strip() or "\n" in k or ":" in k:
                raise ValueError(
                    f"SyntheticConfig.keys: {k!r} is not a valid key (non-empty str without "
                    "newline or ':')"
                )
        if len(set(self.keys)) != len(self.keys):
            raise ValueError(f"SyntheticConfig.keys must be distinct, got {list(self.keys)}")
        if not isinstance(self.facts_per_doc, int) or not 1 <= self.facts_per_doc <= len(self.keys):
            raise ValueError(
                f"SyntheticConfig.facts_per_doc={self.facts_per_doc!r} must be an int with "
                f"1 <= facts_per_doc <= len(keys)={len(self.keys)}"
            )
        if not isinstance(self.value_digits, int) or not 1 <= self.value_digits <= 6:
            raise ValueError(
                f"SyntheticConfig.value_digits={self.value_digits!r} must be an int with "
                "1 <= value_digits <= 6"
            )
        if not isinstance(self.heldout_fraction, (int, float)) or not 0 < self.heldout_fraction < 1:
            raise ValueError(
                f"SyntheticConfig.heldout_fraction={self.heldout_fraction!r} must satisfy "
                "0 < heldout_fraction < 1"
            )
        if not self.question_templates:
            raise ValueError("SyntheticConfig.question_templates must not be empty")
        for t in self.question_templates:
            if not isinstance(t, str) or "{key}" not in t:
                raise ValueError(
                    f"SyntheticConfig.question_templates: {t!r} must be a str containing '{{key}}'"
                )
            try:
                t.format(key="x")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(
                    f"SyntheticConfig.question_templates: {t!r} may only use the field "
                    f"'{{key}}' ({exc!r})"
                ) from exc
        if not isinstance(self.seed, int):
            raise ValueError(f"SyntheticConfig.seed={self.seed!r} must be an int")
        if self.layout not in LAYOUTS:
            raise ValueError(f"SyntheticConfig.layout={self.layout!r} must be one of {LAYOUTS}")


def split_values(config: SyntheticConfig) -> tuple[list[str], list[str]]:
    """Partition all ``10**value_digits`` values into (train values, held-out values).

    ``round(heldout_fraction * N)`` values (at least 1, at most N-1) are held out, chosen with
    ``config.seed``; both lists are sorted and disjoint.
    """
    d = config.value_digits
    n = 10**d
    n_held = min(n - 1, max(1, round(n * config.heldout_fraction)))
    rng = random.Random(f"deepsynth.synthetic.values:{config.seed}")
    held_idx = set(rng.sample(range(n), n_held))
    train = [f"{i:0{d}d}" for i in range(n) if i not in held_idx]
    held = [f"{i:0{d}d}" for i in sorted(held_idx)]
    return train, held


def fact_line(key: str, value: str, keys: Sequence[str]) -> str:
    """``"echo:  42"``: the key padded to the longest of ``keys``, so that values share one column.

    Under a monospace font (the tiny preset's) the values then line up like the fields of a form
    and a value's place on the line does not depend on its key, which is what lets a 16-token
    tiny reader learn to read it (README "The tiny models").
    """
    width = max(len(k) for k in keys) + 1
    return f"{key + ':':<{width}} {value}"


def make_document(
    rng: random.Random, config: SyntheticConfig, values: Sequence[str]
) -> tuple[str, list[tuple[str, str]]]:
    """One page: ``facts_per_doc`` lines ``"key: value"`` with distinct keys in random order
    (``"echo:  42"``: keys padded to the longest key so that values share one column).

    Values are distinct within the document when ``values`` has enough of them (so that
    :func:`chance_em` is exact); otherwise they are drawn with replacement.
    """
    if not values:
        raise ValueError("make_document: values must not be empty")
    k = config.facts_per_doc
    keys = list(config.keys[:k]) if config.layout == "form" else rng.sample(config.keys, k)
    if len(values) >= k:
        vals = rng.sample(list(values), k)
    else:
        vals = [rng.choice(values) for _ in range(k)]
    facts = list(zip(keys, vals))
    text = "\n".join(fact_line(key, value, config.keys) for key, value in facts)
    return text, facts


def _resolve_kinds(kinds: Iterable[str] | None, transcription: bool) -> tuple[str, ...]:
    if kinds is None:
        return ("question", "transcribe") if transcription else ("question",)
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(kinds)
    if not kinds:
        raise ValueError(f"kinds must name at least one of {list(KINDS)}")
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"kinds: unknown kind(s) {bad}; use any of {list(KINDS)}")
    if transcription and "transcribe" not in kinds:
        raise ValueError("transcription=True contradicts kinds without 'transcribe'")
    return tuple(k for k in KINDS if k in kinds)  # canonical order, no duplicates


def _example(split: str, doc: int, text: str, facts: list[tuple[str, str]], suffix: str, instruction: str,
             answer: str, key: str | None, line: int | None, kind: str) -> InstructionExample:
    meta = {"facts": [list(f) for f in facts], "key": key, "line": line, "split": split, "kind": kind}
    return InstructionExample(id=f"synth-{split}-{doc:06d}-{suffix}", text=text, instruction=instruction,
                              answer=answer, source="synthetic", meta=meta)


def generate(
    config: SyntheticConfig,
    n_docs: int,
    split: str = "train",
    questions_per_doc: int = 1,
    transcription: bool = False,
    seed_offset: int = 0,
    kinds: Iterable[str] | None = None,
) -> list[InstructionExample]:
    """Generate key/value document Q&A.

    ``kinds`` picks the example types: ``("question",)`` (default), ``("transcribe",)`` or
    both. ``transcription=True`` is shorthand for both. Per document, question examples come
    first (ids ``synth-{split}-{doc:06d}-q{j}``, distinct lines), then the transcription example
    (id ``synth-{split}-{doc:06d}-t``, instruction :data:`TRANSCRIBE_INSTRUCTION`, answer = the
    full text). The documents depend only on ``config``, ``split`` and ``seed_offset`` — not on
    ``kinds`` or ``questions_per_doc``.

    ``split="train"`` draws values from the train values; ``"heldout"``, ``"test"``, ``"eval"``
    and ``"validation"`` from the held-out values only; ``"heldout_docs"`` draws new documents
    (a random stream of their own) over the train values.
    """
    _check_split(split, extra=HELDOUT_DOC_SPLITS)
    kinds_t = _resolve_kinds(kinds, transcription)
    if not isinstance(n_docs, int) or n_docs < 0:
        raise ValueError(f"n_docs={n_docs!r} must be an int >= 0")
    if "question" in kinds_t and not 1 <= questions_per_doc <= config.facts_per_doc:
        raise ValueError(
            f"questions_per_doc={questions_per_doc!r} must satisfy 1 <= questions_per_doc <= "
            f"facts_per_doc={config.facts_per_doc}"
        )
    train_values, held_values = split_values(config)
    values = train_values if split in TRAIN_SPLITS + HELDOUT_DOC_SPLITS else held_values
    base = f"deepsynth.synthetic:{config.seed}:{split}:{seed_offset}"
    doc_rng = random.Random(base + ":docs")
    q_rng = random.Random(base + ":questions")

    out: list[InstructionExample] = []
    for doc in range(n_docs):
        text, facts = make_document(doc_rng, config, values)
        example = functools.partial(_example, split, doc, text, facts)
        if "question" in kinds_t:
            for j, line in enumerate(q_rng.sample(range(len(facts)), questions_per_doc)):
                key, value = facts[line]
                template = q_rng.choice(config.question_templates)
                out.append(example(f"q{j}", template.format(key=key), value, key, line, "question"))
        if "transcribe" in kinds_t:
            out.append(example("t", TRANSCRIBE_INSTRUCTION, text, None, None, "transcribe"))
    logger.debug("generated %d synthetic examples (split=%s, docs=%d)", len(out), split, n_docs)
    return out


def chance_em(config: SyntheticConfig) -> float:
    """EM of a reader that ignores the instruction and answers with a random line's value."""
    return 1.0 / config.facts_per_doc


# --------------------------------------------------------------------------------------------
# Prose passages (for larger models)

_FIRST = (
    "Alice", "Bruno", "Chloe", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas",
    "Kavya", "Liam", "Maya", "Nikos", "Olga", "Pablo", "Quinn", "Rosa", "Sami", "Tariq",
)
_LAST = (
    "Moreau", "Schmidt", "Okafor", "Tanaka", "Silva", "Novak", "Haddad", "Larsen", "Rossi",
    "Kowalski", "Dubois", "Patel",
)
_CITIES = (
    "Lyon", "Porto", "Krakow", "Osaka", "Nairobi", "Quito", "Tallinn", "Adelaide", "Bergen",
    "Seville", "Leipzig", "Montreal", "Cusco", "Hanoi", "Tbilisi", "Valencia",
)
_VERBS = (("paid", "pay"), ("lent", "lend"), ("sent", "send"), ("donated", "donate"))
_FILLER = (
    "The records were kept by the town clerk.",
    "Most of the ledgers were written by hand.",
    "The weather was mild for most of the year.",
    "Several entries were later checked by an auditor.",
)
_MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September",
    "October", "November", "December",
)
QTYPES: tuple[str, ...] = ("who", "when", "how much", "where")


def _passage_names(seed: int, split: str) -> list[str]:
    """Full names, partitioned (per seed) so held-out splits use names never seen in train."""
    names = [f"{f} {l}" for f in _FIRST for l in _LAST]
    random.Random(f"deepsynth.passages.names:{seed}").shuffle(names)
    n_held = len(names) // 5
    return names[n_held:] if split in TRAIN_SPLITS else names[:n_held]


def _date_str(day: _dt.date) -> str:
    return f"{_MONTHS[day.month - 1]} {day.day}, {day.year}"


def _check_passage_args(n_docs: int, facts_per_doc: int, questions_per_doc: int) -> None:
    if not isinstance(n_docs, int) or n_docs < 0:
        raise ValueError(f"n_docs={n_docs!r} must be an int >= 0")
    if not isinstance(facts_per_doc, int) or not 1 <= facts_per_doc <= len(_CITIES):
        raise ValueError(
            f"facts_per_doc={facts_per_doc!r} must satisfy 1 <= facts_per_doc <= {len(_CITIES)}"
        )
    max_q = facts_per_doc * len(QTYPES)
    if not isinstance(questions_per_doc, int) or not 1 <= questions_per_doc <= max_q:
        raise ValueError(
            f"questions_per_doc={questions_per_doc!r} must satisfy 1 <= questions_per_doc <= "
            f"{max_q} (facts_per_doc * {len(QTYPES)})"
        )


_EPOCH = _dt.date(1990, 1, 1)


def _passage_facts(rng: random.Random, names: list[str], facts_per_doc: int) -> list[dict[str, str]]:
    """The facts of one passage: distinct names, cities, dates and amounts (draws from ``rng`` in
    a fixed order, so a seed gives the same passages)."""
    facts = []
    for name, city, day, amount in zip(
        rng.sample(names, facts_per_doc),
        rng.sample(_CITIES, facts_per_doc),
        rng.sample(range(365 * 35), facts_per_doc),
        rng.sample(range(2, 1000), facts_per_doc),
    ):
        past, base = rng.choice(_VERBS)
        facts.append(
            {
                "name": name,
                "city": city,
                "date": _date_str(_EPOCH + _dt.timedelta(days=day)),
                "amount": f"${amount * 25:,}",
                "verb": past,
                "verb_base": base,
            }
        )
    return facts


def _passage_question(f: dict[str, str], qtype: str) -> tuple[str, str]:
    """(question, answer) of type ``qtype`` about fact ``f``."""
    if qtype == "who":
        return f"Who {f['verb']} {f['amount']} in {f['city']}?", f["name"]
    if qtype == "when":
        return f"When did {f['name']} {f['verb_base']} {f['amount']}?", f["date"]
    if qtype == "how much":
        return f"How much did {f['name']} {f['verb_base']} in {f['city']}?", f["amount"]
    return f"Where did {f['name']} {f['verb_base']} {f['amount']}?", f["city"]


def generate_passages(
    n_docs: int,
    seed: int = 0,
    facts_per_doc: int = 3,
    split: str = "train",
    questions_per_doc: int = 1,
    seed_offset: int = 0,
) -> list[InstructionExample]:
    """Short passages of sentences "On {date}, {name} {verb} {amount} in {city}." plus a filler
    sentence, with Who/When/How much/Where questions whose answers appear only in the text.

    Names, dates, amounts and cities are distinct within a passage, so every question has one
    answer. Held-out splits use a disjoint set of names.
    """
    _check_split(split)
    _check_passage_args(n_docs, facts_per_doc, questions_per_doc)
    names = _passage_names(seed, split)
    rng = random.Random(f"deepsynth.passages:{seed}:{split}:{seed_offset}")
    out: list[InstructionExample] = []
    for doc in range(n_docs):
        facts = _passage_facts(rng, names, facts_per_doc)
        sentences = [
            f"On {f['date']}, {f['name']} {f['verb']} {f['amount']} in {f['city']}." for f in facts
        ]
        sentences.insert(rng.randrange(len(sentences) + 1), rng.choice(_FILLER))
        text = " ".join(sentences)
        pairs = [(i, q) for i in range(facts_per_doc) for q in QTYPES]
        for j, (i, qtype) in enumerate(rng.sample(pairs, questions_per_doc)):
            question, answer = _passage_question(facts[i], qtype)
            out.append(
                InstructionExample(
                    id=f"passage-{split}-{doc:06d}-q{j}",
                    text=text,
                    instruction=question,
                    answer=answer,
                    source="synthetic-passages",
                    meta={
                        "facts": [{k: v for k, v in g.items() if k != "verb_base"} for g in facts],
                        "qtype": qtype,
                        "fact": i,
                        "split": split,
                    },
                )
            )
    return out
