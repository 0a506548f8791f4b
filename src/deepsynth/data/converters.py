"""Public datasets -> :class:`InstructionExample` records.

Every converter reads records in the source's *real* schema (the layout `datasets.load_dataset`
returns for the hub dataset, and the layout of the original release files where they differ) and
is available in two forms:

* a row function ``<name>_row(row, index, **options) -> InstructionExample`` that raises
  :class:`SkipRecord` for a record the chosen policy leaves out (an unanswerable question with
  ``no_answer="skip"``); the pipeline maps these over a ``datasets.Dataset`` with
  ``num_proc`` workers (see :mod:`deepsynth.data.sources`);
* a list function ``convert_<name>(data, **options) -> list[InstructionExample]`` over a
  ``datasets.Dataset`` or any iterable of dicts.

Nothing is dropped silently: skipped records are counted per reason in a
:class:`ConversionStats` (and logged); a record that converts to an invalid example raises
:class:`DataValidationError` naming the row and the field (``errors="raise"``, the default) or is
recorded in ``stats.rejected`` (``errors="collect"``).

Sources and their schemas
-------------------------
SQuAD v1.1 / v2.0 (``rajpurkar/squad``, ``rajpurkar/squad_v2``)
    ``id, title, context, question, answers{text[], answer_start[]}``. An empty ``answers.text``
    is an unanswerable (v2.0) question: ``no_answer="skip"`` leaves it out, any other string is
    used as its answer (e.g. ``"unanswerable"``).
Natural Questions (``google-research-datasets/natural_questions``)
    ``id, document{title, url, html, tokens{token[], is_html[], ...}}, question{text, tokens},
    long_answer_candidates, annotations{id[], long_answer[{start_token, end_token, ...}],
    short_answers[{start_token[], end_token[], text[]}], yes_no_answer[]}`` (``yes_no_answer``:
    -1 none, 0 NO, 1 YES). The "simplified" release (``document_text``, ``question_text``,
    annotations as a list of dicts, ``yes_no_answer`` "NONE"/"YES"/"NO") is read too. The
    document text keeps no HTML markup (block tags become line breaks). Answer priority: short
    answer(s) (several spans joined with ", "), then yes/no, then the long answer; with none,
    ``no_answer`` applies. ``context="long_answer"`` uses the long-answer paragraph as the
    document instead of the whole page.
MS MARCO v1.1 / v2.1 (``microsoft/ms_marco``)
    ``query_id, query, query_type, passages{is_selected[], passage_text[], url[]}, answers[],
    wellFormedAnswers[]``. A well-formed answer is preferred to the plain one. ``"No Answer
    Present."`` is the dataset's explicit no-answer marker: ``no_answer`` applies. The document
    is the numbered passages (``passages="all"``, default) or only the selected ones.
FiQA (BEIR layout: ``corpus{_id, title, text}``, ``queries{_id, text}``, ``qrels{query-id,
corpus-id, score}``)
    Instruction form: the *question* is the instruction; the document is the query's relevant
    passages mixed with ``num_distractors`` passages sampled from the rest of the corpus
    (deterministically from ``seed`` and the query id), shuffled and numbered ``[1]``, ``[2]``...
    ``answer_mode="passage"`` (default) answers with the text of the relevant passage(s) (FiQA's
    answers *are* those opinion passages, so the task is to find and give the answer among
    distractors; the answer is found verbatim in the document); ``answer_mode="index"`` answers
    with their labels (``"[2]"``) and appends "Which passage answers the question?".
CNN/DailyMail (``abisee/cnn_dailymail``): ``id, article, highlights``.
XSum (``EdinburghNLP/xsum``): ``id, document, summary``.
Generic: any ``text_field`` and ``target_field`` (optionally ``instruction_field``, ``id_field``),
    with a default instruction or a list of ``instruction_variants``; a variant is chosen per
    example from a hash of ``seed`` and the example id, so reruns, resumed runs and any number of
    worker processes produce the same records.
Instruction: rows already in the ``InstructionExample`` schema (``id, text, instruction, answer``
    and optional ``source``, ``meta`` as dict or JSON string).
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import random
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

from deepsynth.data.schema import DataValidationError, InstructionExample, parse_json
from deepsynth.render.reflow import reflow_text

logger = logging.getLogger(__name__)

__all__ = [
    "SkipRecord",
    "ConversionStats",
    "CONVERTERS",
    "KNOWN_DATASETS",
    "KnownDataset",
    "MS_MARCO_NO_ANSWER",
    "DEFAULT_SUMMARY_INSTRUCTION",
    "CNN_DAILYMAIL_INSTRUCTION",
    "XSUM_INSTRUCTION",
    "squad_row",
    "natural_questions_row",
    "ms_marco_row",
    "cnn_dailymail_row",
    "xsum_row",
    "generic_row",
    "instruction_row",
    "fiqa_row",
    "convert",
    "convert_squad",
    "convert_natural_questions",
    "convert_ms_marco",
    "convert_cnn_dailymail",
    "convert_xsum",
    "convert_generic",
    "convert_fiqa",
    "fiqa_relevant",
    "detect_converter",
    "check_options",
    "choose_variant",
    "first_answer",
    "nq_tokens_to_text",
    "passages_document",
]

MS_MARCO_NO_ANSWER = "No Answer Present."
DEFAULT_SUMMARY_INSTRUCTION = "Summarize:"
CNN_DAILYMAIL_INSTRUCTION = "Summarize the key points of this article."
XSUM_INSTRUCTION = "Summarize this document in one sentence."
FIQA_INDEX_SUFFIX = "Which passage answers the question?"


class SkipRecord(Exception):
    """Raised by a row function for a record that the chosen policy leaves out.

    ``reason`` is a short, stable key (``"unanswerable"``, ``"no_answer"``) used for counting."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class ConversionStats:
    """What a conversion did with every input record."""

    seen: int = 0
    converted: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    rejected: list[dict] = field(default_factory=list)  # {"row", "id", "reason"}

    def to_dict(self) -> dict:
        return {"seen": self.seen, "converted": self.converted, "skipped": dict(self.skipped),
                "rejected": len(self.rejected)}


# Errors a row function raises for a malformed record: the record is rejected (counted, with its
# reason), never the whole conversion. Anything else is a bug and propagates.
RECORD_ERRORS = (DataValidationError, TypeError, KeyError, AttributeError, IndexError)


def convert_record(fn: Callable[..., InstructionExample], row: Mapping, index: int,
                   options: Mapping[str, Any]) -> tuple[InstructionExample | None, str, str]:
    """One record through a row function with the policy `deepsynth prepare` applies:
    (example, "ok", "") when it converts and validates; (None, "skipped", reason key) when a
    policy leaves it out (SkipRecord: unanswerable, no answer, ...); (the invalid example or None,
    "rejected", "row N: why") when it is malformed (the example, when one was built, names its id)."""
    ex = None
    try:
        ex = fn(row, index, **options)
        ex.validate()
    except SkipRecord as skip:
        return None, "skipped", skip.reason
    except RECORD_ERRORS as exc:
        return ex, "rejected", f"row {index}: {exc}"
    return ex, "ok", ""


# --------------------------------------------------------------------------------------------
# small helpers


def _records(value: Any) -> list[dict]:
    """A `datasets` Sequence-of-dict value as a list of dicts.

    The hub layout stores ``Sequence({...})`` as a dict of equal-length lists; plain JSON (and
    `List({...})` features) as a list of dicts. Both are accepted."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        keys = list(value)
        if not keys:
            return []
        columns = [value[k] if isinstance(value[k], (list, tuple)) else [value[k]] for k in keys]
        n = max(len(c) for c in columns)
        return [{k: (c[i] if i < len(c) else None) for k, c in zip(keys, columns)} for i in range(n)]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, Mapping)]
    raise TypeError(f"expected a list of records or a dict of lists, got {type(value).__name__}")


def _str(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


def _as_list(value: Any) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def first_answer(value: Any) -> str | None:
    """The first non-empty answer string of a SQuAD-style ``{"text": [...]}`` dict, a list of
    strings (or of such dicts), or a plain string; ``None`` when there is none."""
    if value is None:
        return None
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, Mapping):
        return first_answer(value.get("text"))
    if isinstance(value, (list, tuple)):
        for item in value:
            found = first_answer(item)
            if found is not None:
                return found
        return None
    return first_answer(str(value))


def _all_answers(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):
        return _all_answers(value.get("text"))
    if isinstance(value, (list, tuple)):
        out: list[str] = []
        for item in value:
            out.extend(_all_answers(item))
        return out
    return [str(value)]


def _row_id(row: Mapping, index: int, *keys: str) -> str:
    for key in keys:
        value = row.get(key)
        if value is not None and _str(value).strip():
            return _str(value)
    return str(index)


def choose_variant(variants: Sequence[str], key: str, seed: int = 0) -> str:
    """Pick one of ``variants`` from a stable hash of ``seed`` and ``key`` (not Python's
    per-process ``hash``), so every process and every rerun picks the same one."""
    if not variants:
        raise ValueError("instruction_variants is empty")
    digest = hashlib.sha256(f"{seed}\x00{key}".encode("utf-8")).digest()
    return variants[int.from_bytes(digest[:8], "big") % len(variants)]


def _instruction(default: str, variants: Sequence[str] | None, key: str, seed: int) -> str:
    if variants:
        return choose_variant(list(variants), key, seed)
    return default


def _no_answer(no_answer: str, reason: str, detail: str) -> str:
    if no_answer == "skip":
        raise SkipRecord(reason, detail)
    if not isinstance(no_answer, str) or not no_answer.strip():
        raise ValueError(f"no_answer={no_answer!r}: use 'skip' or a non-empty answer text")
    return no_answer


def passages_document(texts: Sequence[str], titles: Sequence[str] | None = None) -> str:
    """Numbered passages ``[1] text`` separated by blank lines (titles, when given, lead)."""
    parts = []
    for i, text in enumerate(texts, start=1):
        title = (titles[i - 1] if titles else "") or ""
        body = f"{title.strip()}\n{text.strip()}" if title.strip() else text.strip()
        parts.append(f"[{i}] {body}")
    return "\n\n".join(parts)


# --------------------------------------------------------------------------------------------
# SQuAD v1.1 / v2.0


def squad_row(row: Mapping, index: int = 0, *, no_answer: str = "skip", source: str = "squad",
              context_field: str = "context", question_field: str = "question",
              answer_field: str = "answers") -> InstructionExample:
    """One SQuAD record. ``no_answer``: ``"skip"`` or the answer text for unanswerable ones."""
    rid = _row_id(row, index, "id")
    answers = row.get(answer_field)
    texts = _all_answers(answers)
    starts = _as_list(answers.get("answer_start")) if isinstance(answers, Mapping) else []
    meta: dict[str, Any] = {}
    if row.get("title") is not None:
        meta["title"] = _str(row.get("title"))
    if not texts:
        answer = _no_answer(no_answer, "unanswerable", f"question {rid!r} has no answer")
        meta.update(answerable=False, extractive=False, answers=[])
    else:
        answer = first_answer(answers)
        if answer is None:  # answers exist but are all empty: a data error, keep it visible
            answer = texts[0]
        meta.update(answerable=True, extractive=True, answers=texts)
        if starts:
            meta["answer_start"] = [int(s) for s in starts]
    # Scored with SQuAD's EM/F1, unanswerable questions included (the v2 convention).
    meta["task"] = "extractive_qa"
    return InstructionExample(id=rid, text=_str(row.get(context_field)),
                              instruction=_str(row.get(question_field)), answer=answer,
                              source=source, meta=meta)


# --------------------------------------------------------------------------------------------
# Natural Questions

_NQ_BLOCK_TAGS = frozenset({
    "p", "div", "br", "table", "tr", "li", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3", "h4",
    "h5", "h6", "caption", "blockquote", "pre", "hr", "section", "article", "title", "tbody",
    "thead", "tfoot",
})
_TAG_NAME = re.compile(r"^</?\s*([A-Za-z][A-Za-z0-9]*)")
_HTML_LIKE = re.compile(r"^<[^<>]*>$")


def _is_block_tag(token: str) -> bool:
    m = _TAG_NAME.match(token)
    return bool(m) and m.group(1).lower() in _NQ_BLOCK_TAGS


def nq_tokens_to_text(tokens: Sequence[str], is_html: Sequence[bool], start: int = 0,
                      end: int | None = None) -> str:
    """Text of ``tokens[start:end]`` without HTML: words joined by spaces, block-level tags
    (``<P>``, ``<Tr>``, ``<Li>``, headings...) as line breaks, other tags dropped."""
    end = len(tokens) if end is None else min(end, len(tokens))
    lines: list[str] = []
    words: list[str] = []
    for i in range(max(0, start), end):
        tok = tokens[i]
        if is_html[i]:
            if _is_block_tag(tok) and words:
                lines.append(" ".join(words))
                words = []
            continue
        tok = tok.strip()
        if tok:
            words.append(tok)
    if words:
        lines.append(" ".join(words))
    return "\n".join(lines)


def _nq_document(row: Mapping) -> tuple[list[str], list[bool], str]:
    doc = row.get("document")
    if isinstance(doc, Mapping):
        tok = doc.get("tokens")
        if isinstance(tok, Mapping):
            tokens = [_str(t) for t in _as_list(tok.get("token"))]
            html = [bool(h) for h in _as_list(tok.get("is_html"))]
        else:
            recs = _records(tok)
            tokens = [_str(r.get("token")) for r in recs]
            html = [bool(r.get("is_html")) for r in recs]
        if len(html) != len(tokens):
            raise DataValidationError(
                f"record {row.get('id')!r}: field 'document.tokens' has {len(tokens)} tokens but "
                f"{len(html)} is_html flags", record_id=_str(row.get("id")), field="document.tokens")
        return tokens, html, _str(doc.get("title"))
    text = row.get("document_text")
    if text is None:
        raise DataValidationError(
            f"record {row.get('id', row.get('example_id'))!r}: Natural Questions record has neither "
            "'document' (hub schema) nor 'document_text' (simplified schema)", field="document")
    tokens = _str(text).split(" ")
    return tokens, [bool(_HTML_LIKE.match(t)) for t in tokens], _str(row.get("document_title"))


def _nq_question(row: Mapping) -> str:
    q = row.get("question")
    if isinstance(q, Mapping):
        if q.get("text") is not None:
            return _str(q.get("text"))
        return " ".join(_str(t) for t in _as_list(q.get("tokens")))
    if q is not None:
        return _str(q)
    return _str(row.get("question_text"))


def _nq_yes_no(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        v = value.strip().upper()
        return {"YES": "yes", "NO": "no"}.get(v)
    try:
        v = int(value)
    except (TypeError, ValueError):
        return None
    return {1: "yes", 0: "no"}.get(v)  # ClassLabel(names=["NO", "YES"]); -1 = none


def _nq_annotations(row: Mapping) -> list[dict]:
    ann = row.get("annotations")
    return _records(ann)


def _nq_span(d: Any) -> tuple[int, int]:
    if not isinstance(d, Mapping):
        return -1, -1
    s, e = d.get("start_token"), d.get("end_token")
    s = -1 if s is None else int(s)
    e = -1 if e is None else int(e)
    return s, e


def natural_questions_row(row: Mapping, index: int = 0, *, no_answer: str = "skip",
                          context: str = "document", source: str = "natural_questions"
                          ) -> InstructionExample:
    """One Natural Questions record (hub or simplified schema).

    ``context``: ``"document"`` (the whole page without HTML) or ``"long_answer"`` (only the
    long-answer paragraph; records without one are skipped as ``"no_long_answer"``)."""
    if context not in ("document", "long_answer"):
        raise ValueError(f"context={context!r}: use 'document' or 'long_answer'")
    rid = _row_id(row, index, "id", "example_id")
    tokens, html, title = _nq_document(row)
    question = _nq_question(row)
    short_spans: list[str] = []
    yes_no: str | None = None
    long_span: tuple[int, int] | None = None
    for ann in _nq_annotations(row):
        if not short_spans:
            spans = []
            for sa in _records(ann.get("short_answers")):
                s, e = _nq_span(sa)
                if 0 <= s < e:
                    spans.append(nq_tokens_to_text(tokens, html, s, e))
                elif sa.get("text"):
                    spans.extend(_as_list(sa.get("text")))
            short_spans = [s for s in spans if _str(s).strip()]
        if yes_no is None:
            yes_no = _nq_yes_no(ann.get("yes_no_answer"))
        if long_span is None:
            s, e = _nq_span(ann.get("long_answer"))
            if 0 <= s < e:
                long_span = (s, e)
    meta: dict[str, Any] = {"title": title}
    long_text = nq_tokens_to_text(tokens, html, *long_span) if long_span else ""
    if context == "long_answer":
        if not long_text.strip():  # no paragraph to read: nothing to ask about
            raise SkipRecord("no_long_answer", f"question {rid!r} has no long answer")
        text = long_text
    else:
        text = nq_tokens_to_text(tokens, html)
    if short_spans:
        answer = ", ".join(short_spans)
        meta.update(answer_type="short", extractive=True, answer_spans=short_spans)
    elif yes_no is not None:
        answer = yes_no
        meta.update(answer_type="yes_no", extractive=False)
    elif context == "document" and long_text.strip():
        answer = long_text
        meta.update(answer_type="long", extractive=True)
    else:
        answer = _no_answer(no_answer, "no_answer", f"question {rid!r} has no answer")
        meta.update(answer_type="none", extractive=False)
    if long_span:
        meta["long_answer_tokens"] = list(long_span)
    return InstructionExample(id=rid, text=text, instruction=question, answer=answer, source=source,
                              meta=meta)


# --------------------------------------------------------------------------------------------
# MS MARCO


def _clean_answers(values: Any) -> list[str]:
    out = []
    for v in _as_list(values):
        s = _str(v).strip()
        if s and s != "[]":
            out.append(s)
    return out


def ms_marco_row(row: Mapping, index: int = 0, *, no_answer: str = "skip", passages: str = "all",
                 prefer_well_formed: bool = True, source: str = "ms_marco") -> InstructionExample:
    """One MS MARCO v1.1/v2.1 record; see the module docstring."""
    if passages not in ("all", "selected"):
        raise ValueError(f"passages={passages!r}: use 'all' or 'selected'")
    rid = _row_id(row, index, "query_id", "id")
    recs = _records(row.get("passages"))
    texts = [_str(r.get("passage_text")) for r in recs]
    selected = [i for i, r in enumerate(recs) if r.get("is_selected") not in (None, 0, False, "0")]
    chosen = selected if passages == "selected" else list(range(len(recs)))
    meta: dict[str, Any] = {
        "query_type": _str(row.get("query_type")),
        "selected_passages": [chosen.index(i) + 1 for i in selected if i in chosen],
        "urls": [_str(recs[i].get("url")) for i in chosen],
        "extractive": False,
    }
    answers = _clean_answers(row.get("answers"))
    well_formed = _clean_answers(row.get("wellFormedAnswers"))
    real = [a for a in answers if a != MS_MARCO_NO_ANSWER]
    if prefer_well_formed and well_formed:
        answer, meta["answer_type"] = well_formed[0], "well_formed"
    elif real:
        answer, meta["answer_type"] = real[0], "answer"
    elif well_formed:
        answer, meta["answer_type"] = well_formed[0], "well_formed"
    else:
        detail = "'No Answer Present.'" if MS_MARCO_NO_ANSWER in answers else "no answers"
        answer = _no_answer(no_answer, "no_answer", f"query {rid!r}: {detail}")
        meta["answer_type"] = "no_answer"
    meta["answers"] = real
    meta["well_formed_answers"] = well_formed
    if not chosen:
        raise SkipRecord("no_passage", f"query {rid!r} has no {'selected ' if passages == 'selected' else ''}"
                                       "passage")
    text = passages_document([texts[i] for i in chosen])
    return InstructionExample(id=rid, text=text, instruction=_str(row.get("query")), answer=answer,
                              source=source, meta=meta)


# --------------------------------------------------------------------------------------------
# summarisation


def _summary_row(row: Mapping, index: int, text_field: str, target_field: str, instruction: str,
                 instruction_variants: Sequence[str] | None, seed: int, source: str,
                 id_fields: tuple[str, ...] = ("id",)) -> InstructionExample:
    rid = _row_id(row, index, *id_fields)
    target = row.get(target_field)
    answer = target if isinstance(target, str) else (first_answer(target) or "")
    return InstructionExample(id=rid, text=_str(row.get(text_field)),
                              instruction=_instruction(instruction, instruction_variants, rid, seed),
                              answer=answer, source=source, meta={"extractive": False, "task": "summarization"})


def cnn_dailymail_row(row: Mapping, index: int = 0, *, instruction: str = CNN_DAILYMAIL_INSTRUCTION,
                      instruction_variants: Sequence[str] | None = None, seed: int = 0,
                      source: str = "cnn_dailymail") -> InstructionExample:
    """One CNN/DailyMail record (``article`` -> ``highlights``, one highlight per line)."""
    return _summary_row(row, index, "article", "highlights", instruction, instruction_variants, seed,
                        source)


def xsum_row(row: Mapping, index: int = 0, *, instruction: str = XSUM_INSTRUCTION,
             instruction_variants: Sequence[str] | None = None, seed: int = 0,
             source: str = "xsum") -> InstructionExample:
    """One XSum record (``document`` -> one-sentence ``summary``)."""
    return _summary_row(row, index, "document", "summary", instruction, instruction_variants, seed,
                        source)


def generic_row(row: Mapping, index: int = 0, *, text_field: str = "text", target_field: str = "target",
                instruction: str = DEFAULT_SUMMARY_INSTRUCTION, instruction_field: str | None = None,
                instruction_variants: Sequence[str] | None = None, id_field: str | None = None,
                seed: int = 0, source: str = "generic", reflow: bool = False,
                task: str | None = None) -> InstructionExample:
    """Any record with a text and a target field. The instruction comes from
    ``instruction_field`` when given (and non-empty), else a sampled variant, else ``instruction``.
    ``task``: how `deepsynth evaluate` scores the records (``meta["task"]``: extractive_qa,
    short_answer, free_form, summarization); None leaves it to the answer's form.
    A target that is a list or a SQuAD-style answers dict gives its first non-empty answer.
    ``reflow``: join the hard-wrapped lines of the text's paragraphs (plain-text corpora; see
    ``deepsynth.render.reflow``), so pages are filled to their width."""
    for name, value in (("text_field", text_field), ("target_field", target_field)):
        if value not in row:
            raise DataValidationError(
                f"row {index}: {name}={value!r} is not a field of the record (fields: {sorted(row)})",
                field=value)
    rid = _row_id(row, index, id_field) if id_field else str(index)
    if instruction_field and _str(row.get(instruction_field)).strip():
        instr = _str(row.get(instruction_field))
    else:
        instr = _instruction(instruction, instruction_variants, rid, seed)
    target = row.get(target_field)
    answer = target if isinstance(target, str) else (first_answer(target) or "")
    text = _str(row.get(text_field))
    return InstructionExample(id=rid, text=reflow_text(text) if reflow else text, instruction=instr,
                              answer=answer, source=source, meta={"task": task} if task else {})


def instruction_row(row: Mapping, index: int = 0, *, source: str | None = None) -> InstructionExample:
    """A record already in the InstructionExample schema (``meta`` may be a JSON string)."""
    d = {k: row[k] for k in ("id", "text", "instruction", "answer", "source", "meta") if k in row}
    if isinstance(d.get("meta"), str):
        try:
            d["meta"] = parse_json(d["meta"], f"row {index}: field 'meta'") if d["meta"].strip() else {}
        except DataValidationError as exc:
            raise DataValidationError(str(exc), record_id=_str(d.get("id")), field="meta") from None
    if d.get("meta") is None:
        d.pop("meta", None)
    if d.get("source") is None:
        d.pop("source", None)
    if source is not None:
        d["source"] = source
    return InstructionExample.from_dict(d, where=f"row {index}")


# --------------------------------------------------------------------------------------------
# FiQA (BEIR layout)


def fiqa_relevant(qrels: Iterable[Mapping]) -> dict[str, list[str]]:
    """``{query id: [relevant corpus ids in file order]}`` from BEIR qrels rows
    (``query-id``, ``corpus-id``, ``score``; a score <= 0 is not relevant)."""
    out: dict[str, list[str]] = {}
    for r in qrels:
        qid = _str(r.get("query-id", r.get("query_id")))
        cid = _str(r.get("corpus-id", r.get("corpus_id")))
        score = r.get("score", 1)
        if score is not None and float(score) <= 0:
            continue
        ids = out.setdefault(qid, [])
        if cid not in ids:
            ids.append(cid)
    return out


def fiqa_row(row: Mapping, index: int = 0, *, corpus: Mapping[str, Mapping] | None = None,
             corpus_ids: Sequence[str] | None = None, relevant: Sequence[str] | None = None,
             num_distractors: int = 3, answer_mode: str = "passage", seed: int = 0,
             source: str = "fiqa") -> InstructionExample:
    """One FiQA query (``_id``, ``text``; its relevant corpus ids in ``relevant`` or in a
    ``relevant`` field of the row) over ``corpus`` (``{_id: {"title", "text"}}``)."""
    if answer_mode not in ("passage", "index"):
        raise ValueError(f"answer_mode={answer_mode!r}: use 'passage' or 'index'")
    if num_distractors < 0:
        raise ValueError(f"num_distractors={num_distractors!r}: must be >= 0")
    if corpus is None:
        raise ValueError("fiqa_row needs corpus= (a mapping corpus id -> {'title', 'text'})")
    qid = _row_id(row, index, "_id", "id")
    rel = list(relevant if relevant is not None else _as_list(row.get("relevant")))
    missing = [c for c in rel if c not in corpus]
    if missing:
        raise DataValidationError(
            f"query {qid!r}: relevant corpus id(s) {missing[:5]} not in the corpus", record_id=qid,
            field="corpus-id")
    if not rel:
        raise SkipRecord("no_relevant_passage", f"query {qid!r} has no relevant passage in qrels")
    ids = list(corpus_ids) if corpus_ids is not None else list(corpus)
    rng = random.Random(f"fiqa\x00{seed}\x00{qid}")
    rel_set = set(rel)
    pool_size = min(len(ids), num_distractors + len(rel))
    distractors = [c for c in rng.sample(ids, pool_size) if c not in rel_set][:num_distractors]
    if len(distractors) < num_distractors:  # tiny corpus: take what exists
        distractors += [c for c in ids if c not in rel_set and c not in distractors][
            : num_distractors - len(distractors)]
    order = rel + distractors
    rng.shuffle(order)
    texts = [_str(corpus[c].get("text")) for c in order]
    titles = [_str(corpus[c].get("title")) for c in order]
    labels = [order.index(c) + 1 for c in rel]
    question = _str(row.get("text"))
    spans = [texts[i - 1].strip() for i in sorted(labels)]
    if answer_mode == "passage":
        answer = "\n\n".join(spans)
        instruction = question
    else:
        answer = ", ".join(f"[{i}]" for i in sorted(labels))
        instruction = f"{question}\n{FIQA_INDEX_SUFFIX}"
    meta = {"passage_ids": order, "relevant_ids": rel, "relevant_passages": sorted(labels),
            "answer_mode": answer_mode, "extractive": answer_mode == "passage"}
    if answer_mode == "passage":
        meta["answer_spans"] = spans
    return InstructionExample(id=qid, text=passages_document(texts, titles), instruction=instruction,
                              answer=answer, source=source, meta=meta)


# --------------------------------------------------------------------------------------------
# registry, detection, list converters

RowFunction = Callable[..., InstructionExample]

CONVERTERS: dict[str, RowFunction] = {
    "squad": squad_row,
    "natural_questions": natural_questions_row,
    "ms_marco": ms_marco_row,
    "cnn_dailymail": cnn_dailymail_row,
    "xsum": xsum_row,
    "generic": generic_row,
    "instruction": instruction_row,
    "fiqa": fiqa_row,
}


@dataclass(frozen=True)
class KnownDataset:
    """A public dataset the pipeline knows by a short name."""

    hub_id: str
    config: str | None
    converter: str
    license: str = "unknown"
    corpus_config: str | None = None  # FiQA: the BEIR corpus/queries repo; qrels in qrels_id
    qrels_id: str | None = None


KNOWN_DATASETS: dict[str, KnownDataset] = {
    "squad": KnownDataset("rajpurkar/squad", None, "squad", "cc-by-sa-4.0"),
    "squad_v2": KnownDataset("rajpurkar/squad_v2", None, "squad", "cc-by-sa-4.0"),
    "natural_questions": KnownDataset("google-research-datasets/natural_questions", "default",
                                      "natural_questions", "cc-by-sa-3.0"),
    "ms_marco": KnownDataset("microsoft/ms_marco", "v2.1", "ms_marco"),
    "cnn_dailymail": KnownDataset("abisee/cnn_dailymail", "3.0.0", "cnn_dailymail", "apache-2.0"),
    "xsum": KnownDataset("EdinburghNLP/xsum", None, "xsum"),
    "fiqa": KnownDataset("BeIR/fiqa", None, "fiqa", qrels_id="BeIR/fiqa-qrels"),
}
for _short, _known in list(KNOWN_DATASETS.items()):
    KNOWN_DATASETS.setdefault(_known.hub_id, _known)
KNOWN_DATASETS["nq"] = KNOWN_DATASETS["natural_questions"]
KNOWN_DATASETS["cnn_dm"] = KNOWN_DATASETS["cnn_dailymail"]


def detect_converter(columns: Iterable[str]) -> str | None:
    """The converter whose source schema has these columns, or ``None``."""
    cols = set(columns)
    if {"text", "instruction", "answer"} <= cols:  # records without an id get a content id
        return "instruction"
    if {"context", "question", "answers"} <= cols:
        return "squad"
    if "annotations" in cols and ({"document", "question"} <= cols or "document_text" in cols):
        return "natural_questions"
    if {"query", "passages", "answers"} <= cols:
        return "ms_marco"
    if {"article", "highlights"} <= cols:
        return "cnn_dailymail"
    if {"document", "summary"} <= cols:
        return "xsum"
    return None


def check_options(converter: str, options: Mapping[str, Any]) -> None:
    """Raise ValueError naming any option ``converter`` does not take (and the ones it takes)."""
    if converter not in CONVERTERS:
        raise ValueError(f"unknown converter {converter!r}; choose one of {', '.join(CONVERTERS)}")
    params = [p for p in inspect.signature(CONVERTERS[converter]).parameters.values()
              if p.kind is inspect.Parameter.KEYWORD_ONLY]
    allowed = {p.name for p in params}
    if converter == "fiqa":  # supplied by convert_fiqa / the pipeline from the BEIR tables
        allowed -= {"corpus", "corpus_ids", "relevant"}
    bad = sorted(set(options) - allowed)
    if bad:
        raise ValueError(f"converter {converter!r} has no option(s) {bad}; its options: {sorted(allowed)}")


def _iter_rows(data: Any) -> Iterable[Mapping]:
    if isinstance(data, Mapping):
        raise TypeError("expected a datasets.Dataset or an iterable of dicts, got a single dict")
    return data


def convert(converter: str | RowFunction, data: Any, *, errors: str = "raise",
            stats: ConversionStats | None = None, **options: Any) -> list[InstructionExample]:
    """Convert every record of ``data`` (a ``datasets.Dataset`` or an iterable of dicts).

    ``errors="raise"``: an invalid example raises :class:`DataValidationError` naming the input
    row; ``errors="collect"``: it is recorded in ``stats.rejected`` instead. Skipped records are
    counted in ``stats.skipped`` and logged."""
    if errors not in ("raise", "collect"):
        raise ValueError(f"errors={errors!r}: use 'raise' or 'collect'")
    if isinstance(converter, str):
        check_options(converter, options)
        fn = CONVERTERS[converter]
    else:
        fn = converter
    stats = stats if stats is not None else ConversionStats()
    out: list[InstructionExample] = []
    seen_ids: dict[str, int] = {}
    for index, row in enumerate(_iter_rows(data)):
        stats.seen += 1
        try:
            ex = fn(row, index, **options)
            ex.validate()
            if ex.id in seen_ids:
                raise DataValidationError(
                    f"record {ex.id!r}: duplicate id (first produced by row {seen_ids[ex.id]})",
                    record_id=ex.id, field="id")
        except SkipRecord as skip:
            stats.skipped[skip.reason] += 1
            continue
        except DataValidationError as exc:
            if errors == "raise":
                raise DataValidationError(f"row {index}: {exc}", record_id=exc.record_id,
                                          field=exc.field) from exc
            stats.rejected.append({"row": index, "id": exc.record_id, "reason": str(exc)})
            continue
        seen_ids[ex.id] = index
        stats.converted += 1
        out.append(ex)
    if stats.skipped:
        logger.info("converted %d of %d records; skipped %s", stats.converted, stats.seen,
                    dict(stats.skipped))
    if stats.rejected:
        logger.warning("rejected %d invalid record(s); first: %s", len(stats.rejected),
                       stats.rejected[0]["reason"])
    return out


def convert_squad(data: Any, *, no_answer: str = "skip", source: str = "squad", errors: str = "raise",
                  stats: ConversionStats | None = None) -> list[InstructionExample]:
    """SQuAD v1.1/v2.0 records -> examples (unanswerable: ``no_answer="skip"`` or an answer text)."""
    return convert("squad", data, errors=errors, stats=stats, no_answer=no_answer, source=source)


def convert_natural_questions(data: Any, *, no_answer: str = "skip", context: str = "document",
                              source: str = "natural_questions", errors: str = "raise",
                              stats: ConversionStats | None = None) -> list[InstructionExample]:
    """Natural Questions records (hub or simplified schema) -> examples."""
    return convert("natural_questions", data, errors=errors, stats=stats, no_answer=no_answer,
                   context=context, source=source)


def convert_ms_marco(data: Any, *, no_answer: str = "skip", passages: str = "all",
                     prefer_well_formed: bool = True, source: str = "ms_marco", errors: str = "raise",
                     stats: ConversionStats | None = None) -> list[InstructionExample]:
    """MS MARCO v1.1/v2.1 records -> examples."""
    return convert("ms_marco", data, errors=errors, stats=stats, no_answer=no_answer,
                   passages=passages, prefer_well_formed=prefer_well_formed, source=source)


def convert_cnn_dailymail(data: Any, *, instruction: str = CNN_DAILYMAIL_INSTRUCTION,
                          instruction_variants: Sequence[str] | None = None, seed: int = 0,
                          source: str = "cnn_dailymail", errors: str = "raise",
                          stats: ConversionStats | None = None) -> list[InstructionExample]:
    """CNN/DailyMail records -> summarisation examples."""
    return convert("cnn_dailymail", data, errors=errors, stats=stats, instruction=instruction,
                   instruction_variants=instruction_variants, seed=seed, source=source)


def convert_xsum(data: Any, *, instruction: str = XSUM_INSTRUCTION,
                 instruction_variants: Sequence[str] | None = None, seed: int = 0, source: str = "xsum",
                 errors: str = "raise", stats: ConversionStats | None = None) -> list[InstructionExample]:
    """XSum records -> summarisation examples."""
    return convert("xsum", data, errors=errors, stats=stats, instruction=instruction,
                   instruction_variants=instruction_variants, seed=seed, source=source)


def convert_generic(data: Any, *, text_field: str, target_field: str,
                    instruction: str = DEFAULT_SUMMARY_INSTRUCTION, instruction_field: str | None = None,
                    instruction_variants: Sequence[str] | None = None, id_field: str | None = None,
                    seed: int = 0, source: str = "generic", errors: str = "raise",
                    stats: ConversionStats | None = None, reflow: bool = False) -> list[InstructionExample]:
    """Any dataset with a text and a target field -> examples (see :func:`generic_row`)."""
    return convert("generic", data, errors=errors, stats=stats, text_field=text_field,
                   target_field=target_field, instruction=instruction,
                   instruction_field=instruction_field, instruction_variants=instruction_variants,
                   id_field=id_field, seed=seed, source=source, reflow=reflow)


def convert_fiqa(corpus: Iterable[Mapping], queries: Iterable[Mapping], qrels: Iterable[Mapping], *,
                 num_distractors: int = 3, answer_mode: str = "passage", seed: int = 0,
                 source: str = "fiqa", errors: str = "raise",
                 stats: ConversionStats | None = None) -> list[InstructionExample]:
    """FiQA in the BEIR layout -> one example per query that has a relevant passage in ``qrels``
    (queries without one are not part of the split and are not counted)."""
    corpus_map = {_str(r.get("_id")): {"title": _str(r.get("title")), "text": _str(r.get("text"))}
                  for r in corpus}
    relevant = fiqa_relevant(qrels)
    rows = [dict(r, relevant=relevant[_str(r.get("_id"))]) for r in queries
            if _str(r.get("_id")) in relevant]
    check_options("fiqa", {"num_distractors": num_distractors, "answer_mode": answer_mode})
    return convert(fiqa_row, rows, errors=errors, stats=stats, corpus=corpus_map,
                   corpus_ids=list(corpus_map), num_distractors=num_distractors,
                   answer_mode=answer_mode, seed=seed, source=source)
