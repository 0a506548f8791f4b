"""Text metrics for instruction-following on rendered pages, and which of them score which task.

* Exact match and token F1 use the official SQuAD v1.1 answer normalisation
  (lower case, strip punctuation, drop the articles ``a``/``an``/``the`` as whole
  words, collapse whitespace). For empty answers F1 follows the SQuAD v2.0
  convention: if either side normalises to no tokens, F1 is 1.0 when both are
  empty and 0.0 otherwise.
* ROUGE-1/2/L/Lsum F-measures come from the ``rouge-score`` package (Porter
  stemming on). ``rougeLsum`` is computed on text split into one sentence per line.
* Every score against several gold answers / references is the best one
  (per metric, as in the SQuAD and ``rouge-score`` multi-reference conventions).

Each example is scored by its task (``TASK_METRICS``, ``task_of``): a property of the example
(converters set ``meta["task"]``), so the rules live with the data, below the trainer's validation
and ``deepsynth evaluate``, which both score through ``score_predictions``.

Note: ``rouge-score``'s default tokenizer keeps only ``[a-z0-9]`` tokens, so text
in non-Latin scripts scores 0.0 under ROUGE; use EM/F1 for such data.
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from functools import lru_cache
from typing import Sequence

from tqdm.auto import tqdm

from deepsynth.data.schema import InstructionExample

__all__ = [
    "normalize_answer",
    "exact_match",
    "f1_score",
    "rouge_scores",
    "aggregate",
    "ablation_summary",
    "ROUGE_KEYS",
    "SUPPORTED_METRICS",
    "TASK_METRICS",
    "SHORT_ANSWER_WORDS",
    "task_of",
    "metrics_of_tasks",
    "score_predictions",
    "attach_tasks",
]

logger = logging.getLogger(__name__)

ROUGE_KEYS: tuple[str, ...] = ("rouge1", "rouge2", "rougeL", "rougeLsum")
SUPPORTED_METRICS: tuple[str, ...] = ("em", "f1") + ROUGE_KEYS

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_SENTENCE_SPLIT_RE = re.compile(r"(?<=[.!?])\s+")


# --------------------------------------------------------------------------- helpers


def _check_text(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{field} must be a str, got {type(value).__name__}")
    return value


def _as_list(golds: str | Sequence[str], field: str) -> list[str]:
    """Accept one string or a non-empty sequence of strings."""
    if isinstance(golds, str):
        return [golds]
    if golds is None or not isinstance(golds, Sequence):
        raise TypeError(
            f"{field} must be a str or a sequence of str, got {type(golds).__name__}"
        )
    items = list(golds)
    if not items:
        raise ValueError(f"{field} must contain at least one string, got an empty sequence")
    for i, item in enumerate(items):
        _check_text(item, f"{field}[{i}]")
    return items


# --------------------------------------------------------------------------- SQuAD EM / F1


def normalize_answer(s: str) -> str:
    """Official SQuAD v1.1 normalisation.

    Lower case, remove punctuation, remove articles (``a``, ``an``, ``the`` as
    whole words), collapse whitespace.
    """
    _check_text(s, "s")
    text = s.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES_RE.sub(" ", text)
    return " ".join(text.split())


def _exact_match_single(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def _f1_single(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold_answers: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    _check_text(prediction, "prediction")
    golds = _as_list(gold_answers, "gold_answers")
    return max(_exact_match_single(prediction, g) for g in golds)


def f1_score(prediction: str, gold_answers: str | Sequence[str]) -> float:
    """Best SQuAD token F1 of ``prediction`` over the gold answers."""
    _check_text(prediction, "prediction")
    golds = _as_list(gold_answers, "gold_answers")
    return max(_f1_single(prediction, g) for g in golds)


# --------------------------------------------------------------------------- ROUGE


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)


def _split_sentences(text: str) -> str:
    """One sentence per line, as ``rougeLsum`` expects."""
    stripped = text.strip()
    if not stripped:
        return ""
    return "\n".join(part for part in _SENTENCE_SPLIT_RE.split(stripped) if part)


def rouge_scores(prediction: str, reference: str | Sequence[str]) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum F-measures, each the best over the references."""
    _check_text(prediction, "prediction")
    refs = _as_list(reference, "reference")
    scorer = _rouge_scorer()
    pred = _split_sentences(prediction)
    best = {key: 0.0 for key in ROUGE_KEYS}
    for ref in refs:
        scores = scorer.score(_split_sentences(ref), pred)  # score(target, prediction)
        for key in ROUGE_KEYS:
            best[key] = max(best[key], float(scores[key].fmeasure))
    return best


# --------------------------------------------------------------------------- corpus level


def aggregate(
    predictions: Sequence[str],
    references: Sequence[str | Sequence[str]],
    metrics: Sequence[str] = ("em", "f1"),
    *,
    progress: bool = False,
) -> dict:
    """Corpus-level mean of each requested metric, plus ``"n"``.

    ``metrics`` may contain ``"em"``, ``"f1"``, ``"rouge1"``, ``"rouge2"``,
    ``"rougeL"``, ``"rougeLsum"`` and the shorthand ``"rouge"`` (all four ROUGE
    variants). Each reference may be one string or a sequence of gold strings.
    """
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be sequences, not a single str")
    if isinstance(metrics, str):
        metrics = (metrics,)
    n_pred, n_ref = len(predictions), len(references)
    if n_pred != n_ref:
        raise ValueError(
            f"predictions and references must have the same length, got {n_pred} and {n_ref}"
        )
    if n_pred == 0:
        raise ValueError("predictions and references are empty; need at least one example")

    wanted: list[str] = []
    for m in metrics:
        names = ROUGE_KEYS if m == "rouge" else (m,)
        for name in names:
            if name not in SUPPORTED_METRICS:
                raise ValueError(
                    f"unknown metric {name!r} in metrics; supported: "
                    f"{', '.join(SUPPORTED_METRICS + ('rouge',))}"
                )
            if name not in wanted:
                wanted.append(name)
    if not wanted:
        raise ValueError("metrics is empty; request at least one metric")
    want_rouge = any(k in wanted for k in ROUGE_KEYS)

    totals = {name: 0.0 for name in wanted}
    pairs = zip(predictions, references)
    for i, (pred, ref) in enumerate(
        tqdm(pairs, total=n_pred, desc="scoring", disable=not progress)
    ):
        _check_text(pred, f"predictions[{i}]")
        golds = _as_list(ref, f"references[{i}]")
        if "em" in totals:
            totals["em"] += exact_match(pred, golds)
        if "f1" in totals:
            totals["f1"] += f1_score(pred, golds)
        if want_rouge:
            scores = rouge_scores(pred, golds)
            for key in ROUGE_KEYS:
                if key in totals:
                    totals[key] += scores[key]

    result: dict = {name: totals[name] / n_pred for name in wanted}
    result["n"] = n_pred
    logger.debug("aggregate over %d examples: %s", n_pred, result)
    return result


def ablation_summary(score: float, score_no_instruction: float, chance: float) -> dict:
    """Summarise an instruction ablation.

    ``drop`` is how much the score falls when the instruction is removed/swapped;
    ``above_chance_without_instruction`` should be near 0 if the model really
    relies on the instruction.
    """
    score, score_no_instruction, chance = float(score), float(score_no_instruction), float(chance)
    return {
        "score": score,
        "score_no_instruction": score_no_instruction,
        "chance": chance,
        "drop": score - score_no_instruction,
        "above_chance_without_instruction": score_no_instruction - chance,
    }


# How each task is scored. Extractive QA: SQuAD's EM/F1. Summaries and long free-form answers:
# ROUGE-1/2/L (EM of a paraphrase is meaningless). Short free-form answers (yes/no, MS MARCO's
# short answers): both.
TASK_METRICS: dict[str, tuple[str, ...]] = {
    "extractive_qa": ("em", "f1"),
    "short_answer": ("em", "f1", "rouge1", "rouge2", "rougeL"),
    "free_form": ("rouge1", "rouge2", "rougeL"),
    "summarization": ("rouge1", "rouge2", "rougeL"),
}
# Longest answer (in words) still scored with EM/F1 when its task is not given.
SHORT_ANSWER_WORDS = 10


def task_of(answer: str, text: str | None = None, meta: dict | None = None) -> str:
    """The task an example is scored as: ``meta["task"]`` when a converter or helper set it
    (SQuAD rows: extractive_qa; summarisation rows and helpers: summarization); otherwise from
    the answer: up to SHORT_ANSWER_WORDS words and extractive (``meta["extractive"]``, or, when
    unmarked, found verbatim in ``text``) -> extractive_qa; up to that length otherwise ->
    short_answer; longer -> free_form."""
    meta = meta or {}
    task = meta.get("task")
    if task is not None:
        if task not in TASK_METRICS:
            raise ValueError(f"meta['task']={task!r} is unknown: use one of {', '.join(TASK_METRICS)}")
        return task
    if len(answer.split()) > SHORT_ANSWER_WORDS:
        return "free_form"
    extractive = meta.get("extractive")
    if extractive is None:
        extractive = text is not None and answer.strip() != "" and answer.strip() in text
    return "extractive_qa" if extractive else "short_answer"


def metrics_of_tasks(tasks: Sequence[str]) -> list[str]:
    """Every metric the tasks are scored with, in one stable order."""
    order = ("em", "f1", "rouge1", "rouge2", "rougeL")
    wanted = {m for t in set(tasks) for m in TASK_METRICS[t]}
    return [m for m in order if m in wanted]


def score_predictions(records: Sequence[dict], metrics: Sequence[str] | None = None) -> dict:
    """Scores of prediction records against their answers, overall and per task (``by_task``:
    {task: {"n", metric: mean}}), and how often each stop reason occurred.

    metrics: None scores each record with its task's metrics (``TASK_METRICS``; a record's
    ``task``, else `task_of` its answer); the overall value of a metric is then its mean over the
    records scored with it. Given, every record is scored with those metrics."""
    tasks = [r.get("task") or task_of(r["answer"]) for r in records]
    by_task: dict[str, dict] = {}
    for task in sorted(set(tasks)):
        rows = [r for r, t in zip(records, tasks) if t == task]
        by_task[task] = aggregate([r["prediction"] for r in rows], [r["answer"] for r in rows],
                                  metrics=tuple(metrics) if metrics else TASK_METRICS[task])
    names = [m for m in next(iter(by_task.values())) if m != "n"] if metrics else metrics_of_tasks(tasks)
    scores: dict = {}
    for name in names:
        scored = [(v[name], v["n"]) for v in by_task.values() if name in v]
        scores[name] = sum(value * n for value, n in scored) / sum(n for _, n in scored)
    scores["n"] = len(records)
    scores["by_task"] = by_task
    stops = [r["stopped"] for r in records]
    scores["stopped"] = {k: sum(s == k for s in stops) for k in sorted(set(stops))}
    return scores


def attach_tasks(records: list[dict], examples: Sequence[InstructionExample]) -> list[dict]:
    """Record each prediction's task (`task_of` its example) in the record, in order."""
    if examples and len(examples) != len(records):
        raise ValueError(f"{len(records)} predictions for {len(examples)} examples")
    for i, record in enumerate(records):
        ex = examples[i] if examples else None
        record["task"] = task_of(record["answer"], ex.text if ex else None, ex.meta if ex else None)
    return records
