"""Seeded reading tasks for the page reader: transcription of varied text, and questions about
facts written in sentences, on `key: value` forms and on invoices.

Everything the generators write comes from three sources: real prose (the licence texts in
benchmarks/data/licenses.txt, shipped with the repository), the word list of that prose (every
distinct word, the reader's "dictionary"), and small built-in lists of first names, surnames,
cities, items and jobs, with numbers, amounts, dates and codes drawn at random.

Held-out data never meets training data: every string that can be an answer or a page's
paragraph (a name, a city, a number, a prose paragraph) belongs to the held-out side when its
CRC-32 is divisible by `HELDOUT_MODULUS` (`is_heldout`). Training generators reject held-out
strings; held-out generators draw only held-out ones. So held-out questions ask for entity
names and values that no training example contains, and held-out prose pages are paragraphs
no training page showed.

    rng = random.Random(0)
    task = make_task(rng, "prose_qa", split="train", max_lines=8)   # a ReadingTask
"""

from __future__ import annotations

import functools
import random
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["TRANSCRIBE", "KINDS", "ReadingTask", "is_heldout", "make_task", "prose_paragraphs", "dictionary",
           "question_phrasings", "INVOICE", "INVOICE_QUESTION", "INVOICE_ANSWERS", "invoice_variants"]

#: The transcription instruction of DeepSeek-OCR's documented prompts.
TRANSCRIBE = "Free OCR."
KINDS = ("words", "prose", "mixed", "codes", "prose_qa", "form_qa", "invoice_qa", "locate_qa")
#: The characters of "codes" lines: no word, and no prefix, tells the next one.
CODE_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
SPLITS = ("train", "heldout")
HELDOUT_MODULUS = 5  # one string in five is held out

_CORPUS = Path(__file__).resolve().parents[3] / "benchmarks" / "data" / "licenses.txt"

FIRST_NAMES = ("Anna", "Ben", "Carla", "David", "Elena", "Felix", "Greta", "Hugo", "Ines", "Jonas", "Karin",
               "Leo", "Maria", "Nils", "Olga", "Paul", "Quinn", "Rosa", "Sven", "Tara", "Ugo", "Vera",
               "Walter", "Xenia", "Yusuf", "Zoe", "Amir", "Bianca", "Cyril", "Dora", "Emil", "Fatima",
               "Gustav", "Hanna", "Ivan", "Julia", "Kofi", "Lina", "Marco", "Nora", "Oscar", "Priya",
               "Rafael", "Sofia", "Tomas", "Ulla", "Viktor", "Wanda", "Yara", "Zeno")
SURNAMES = ("Berg", "Lopez", "Novak", "Smith", "Keller", "Rossi", "Dubois", "Kowalski", "Jensen", "Silva",
            "Meyer", "Costa", "Horvat", "Nagy", "Fischer", "Moreau", "Ito", "Khan", "Larsen", "Weber",
            "Petrov", "Garcia", "Olsen", "Bauer", "Conti", "Laurent", "Sato", "Ahmed", "Lind", "Vogel",
            "Ricci", "Martin", "Holm", "Popescu", "Brandt", "Ferreira", "Wolf", "Janssen", "Kim", "Eriksen")
CITIES = ("Oslo", "Lyon", "Porto", "Bergen", "Graz", "Turin", "Ghent", "Malmo", "Krakow", "Seville", "Leeds",
          "Bremen", "Basel", "Split", "Aarhus", "Tartu", "Cork", "Nantes", "Bilbao", "Utrecht", "Brno",
          "Lille", "Genoa", "Dublin", "Riga", "Tampere", "Bologna", "Lisbon", "Vienna", "Zurich", "Madrid",
          "Munich", "Prague", "Warsaw", "Athens", "Sofia", "Helsinki", "Naples", "Bordeaux", "Antwerp")
ITEMS = ("printer", "laptop", "bicycle", "piano", "sofa", "camera", "tractor", "boat", "painting", "lamp",
         "violin", "heater", "desk", "tent", "guitar", "kettle", "mirror", "clock", "drone", "carpet")
JOBS = ("baker", "pilot", "nurse", "lawyer", "farmer", "teacher", "plumber", "chemist", "editor", "dentist",
        "architect", "carpenter", "librarian", "engineer", "painter", "tailor", "surgeon", "welder")
CURRENCIES = ("euros", "dollars", "francs", "pounds", "crowns")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
FORM_KEYS = ("Name", "City", "Date", "Total", "Invoice", "Phone", "Customer", "Amount due", "Order", "Due date",
             "Account", "Reference", "Item", "Quantity", "Price", "Job")
_PUNCT_AFTER = (",", ".", ";", ":", "!", "?", ")", "\"", "'")
_PUNCT_BEFORE = ("(", "\"", "'")


def is_heldout(text: str) -> bool:
    """True when `text` belongs to the held-out side (CRC-32 divisible by HELDOUT_MODULUS)."""
    return zlib.crc32(text.encode()) % HELDOUT_MODULUS == 0


def _side(values, split: str) -> tuple[str, ...]:
    held = split == "heldout"
    chosen = tuple(v for v in values if is_heldout(v) == held)
    if not chosen:
        raise ValueError(f"no {split} values among {values[:3]}...")
    return chosen


@functools.lru_cache(maxsize=1)
def _corpus_text() -> str:
    if not _CORPUS.is_file():
        raise FileNotFoundError(f"the reading corpus {_CORPUS} is missing (it ships in the repository)")
    return _CORPUS.read_text()


@functools.lru_cache(maxsize=4)
def prose_paragraphs(split: str) -> tuple[str, ...]:
    """The corpus's paragraphs (whitespace collapsed, over 40 characters) on one side of the split."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {SPLITS}")
    paragraphs = (re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", _corpus_text()))
    return _side(tuple(p for p in paragraphs if len(p) > 40), split)


@functools.lru_cache(maxsize=1)
def dictionary() -> tuple[str, ...]:
    """Every distinct word (letters only, lower case) of the corpus, sorted."""
    return tuple(sorted({w.lower() for w in re.findall(r"[A-Za-z]+", _corpus_text())}))


@dataclass
class ReadingTask:
    """One example before rendering."""

    text: str  # the document's text (the renderer wraps it; the transcription answer is what it draws)
    instruction: str  # TRANSCRIBE or a question
    answer: str  # the answer; "" for transcription (the drawn text, known after rendering)
    kind: str  # one of KINDS
    meta: dict = field(default_factory=dict)  # e.g. the question's phrasing index


def _number(rng: random.Random, split: str, kind: str) -> str:
    """A value of one kind ("amount", "int", "year", "code", "phone", "date", "time") on the split's side."""
    for _ in range(1000):
        if kind == "amount":
            v = rng.choice((rng.randint(10, 999), rng.randint(1000, 99999)))
            s = f"{v:,}" if rng.random() < 0.7 else f"{v:,}.{rng.randint(0, 99):02d}"
        elif kind == "int":
            s = str(rng.randint(0, 10 ** rng.randint(1, 5)))
        elif kind == "year":
            s = str(rng.randint(1900, 2030))
        elif kind == "code":
            s = f"{rng.choice('ABCDEFGHKMNPRSTXZ')}{rng.choice('ABCDEFGHKMNPRSTXZ')}-{rng.randint(100, 9999)}"
        elif kind == "phone":
            s = f"{rng.randint(100, 999)} {rng.randint(100, 999)} {rng.randint(1000, 9999)}"
        elif kind == "date":
            s = f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1990, 2030)}"
        elif kind == "time":
            s = f"{rng.randint(7, 19)}:{rng.choice(('00', '15', '30', '45'))}"
        else:
            raise ValueError(f"unknown number kind {kind!r}")
        if is_heldout(s) == (split == "heldout"):
            return s
    raise RuntimeError(f"no {split} {kind} found in 1000 draws")


def _code(rng: random.Random, split: str, length: int) -> str:
    """`length` random capital letters and digits, on the split's side from 3 characters on (one or two
    are the alphabet itself, which every page shows: splitting them would hide letters from training)."""
    for _ in range(1000):
        s = "".join(rng.choice(CODE_CHARS) for _ in range(length))
        if length < 3 or is_heldout(s) == (split == "heldout"):
            return s
    raise RuntimeError(f"no {split} code of {length} characters found in 1000 draws")


def _name(rng: random.Random, split: str) -> str:
    for _ in range(1000):
        s = f"{rng.choice(FIRST_NAMES)} {rng.choice(SURNAMES)}"
        if is_heldout(s) == (split == "heldout"):
            return s
    raise RuntimeError(f"no {split} name found in 1000 draws")


def _cased(rng: random.Random, word: str) -> str:
    r = rng.random()
    return word.capitalize() if r < 0.25 else word.upper() if r < 0.32 else word


def _word_line(rng: random.Random, split: str, n_words: int) -> str:
    """Dictionary words in mixed case with names, numbers and punctuation among them."""
    out = []
    for _ in range(n_words):
        r = rng.random()
        if r < 0.1:
            w = _name(rng, split).split()[rng.randint(0, 1)]
        elif r < 0.22:
            w = _number(rng, split, rng.choice(("amount", "int", "year", "code", "time")))
        else:
            w = _cased(rng, rng.choice(dictionary()))
        if rng.random() < 0.15:
            w = w + rng.choice(_PUNCT_AFTER)
        elif rng.random() < 0.04:
            w = rng.choice(_PUNCT_BEFORE) + w
        out.append(w)
    return " ".join(out)


def _prose_window(rng: random.Random, split: str, chars: int) -> str:
    """About `chars` characters of consecutive corpus prose, starting at a word."""
    para = rng.choice(prose_paragraphs(split))
    words = para.split(" ")
    start = rng.randrange(len(words))
    text = " ".join(words[start:])
    while len(text) < chars:  # run on into another paragraph of the same side
        text += " " + rng.choice(prose_paragraphs(split))
    cut = text.rfind(" ", 0, chars)
    return text[: cut if cut > 0 else chars]


#: Fact sentences, each with its questions (several phrasings) and the answer's slot.
_FACTS = (
    ("{name} lives in {city}.", ("Where does {name} live?", "In which city does {name} live?",
                                 "What city does {name} live in?"), "city"),
    ("{name} paid {amount} {cur} for the {item}.", ("How much did {name} pay for the {item}?",
                                                    "What did {name} pay for the {item}?",
                                                    "How much was the {item} that {name} bought?"), "price"),
    ("{name} was born in {year}.", ("When was {name} born?", "In what year was {name} born?",
                                    "What year was {name} born in?"), "year"),
    ("{name} works as a {job}.", ("What does {name} do?", "What is the job of {name}?",
                                  "What does {name} work as?"), "job"),
    ("The meeting with {name} starts at {time}.", ("When does the meeting with {name} start?",
                                                   "What time does the meeting with {name} start?",
                                                   "At what time is the meeting with {name}?"), "time"),
    ("The phone number of {name} is {phone}.", ("What is the phone number of {name}?",
                                                "What is {name}'s phone number?",
                                                "Which number can {name} be called on?"), "phone"),
)
_ANSWER_OF = {"city": "{city}", "price": "{amount} {cur}", "year": "{year}", "job": "{job}", "time": "{time}",
              "phone": "{phone}"}
_INVOICE_TOTAL = ("The total amount due is {amount} {cur}.", "Total amount due: {amount} {cur}",
                  "Please pay the total amount due of {amount} {cur}.", "The amount due in total is {amount} {cur}.")
_INVOICE_QUESTIONS = ("What is the total amount due?", "How much is due in total?", "What is the total due?",
                      "How much has to be paid?")


def question_phrasings() -> dict[str, tuple[str, ...]]:
    """Every question template, by fact slot (and "total" for invoices)."""
    return {slot: qs for _, qs, slot in _FACTS} | {"total": _INVOICE_QUESTIONS}


def _fact_values(rng: random.Random, split: str) -> dict[str, str]:
    cities = _side(CITIES, split)
    return {"name": _name(rng, split), "city": cities[rng.randrange(len(cities))],
            "amount": _number(rng, split, "amount"), "cur": rng.choice(CURRENCIES), "item": rng.choice(ITEMS),
            "year": _number(rng, split, "year"), "job": rng.choice(JOBS), "time": _number(rng, split, "time"),
            "phone": _number(rng, split, "phone")}


def _prose_qa(rng: random.Random, split: str, max_lines: int) -> ReadingTask:
    """Two to five facts about different people in sentences, with prose between them; one is asked."""
    n_facts = rng.randint(1, max(1, min(5, max_lines // 2)))
    facts, used = [], set()
    while len(facts) < n_facts:
        values = _fact_values(rng, split)
        if values["name"] in used:
            continue
        used.add(values["name"])
        template, questions, slot = rng.choice(_FACTS)
        facts.append((template.format(**values), questions, slot, values))
    sentences = []
    for sentence, *_ in facts:
        if rng.random() < 0.3:
            sentences.append(_prose_window(rng, split, rng.randint(20, 60)).capitalize() + ".")
        sentences.append(sentence)
    sentence, questions, slot, values = rng.choice(facts)
    q = rng.randrange(len(questions))
    return ReadingTask(" ".join(sentences), questions[q].format(**values), _ANSWER_OF[slot].format(**values),
                       "prose_qa", {"phrasing": q, "slot": slot})


def _form_qa(rng: random.Random, split: str, max_lines: int) -> ReadingTask:
    """`key: value` lines, unpadded, in random order; one key is asked in one of three phrasings."""
    keys = rng.sample(FORM_KEYS, rng.randint(1, max(1, min(len(FORM_KEYS), max_lines))))
    values = {}
    for key in keys:
        v = _fact_values(rng, split)
        values[key] = {"Name": v["name"], "Customer": v["name"], "City": v["city"], "Date": _number(rng, split, "date"),
                       "Due date": _number(rng, split, "date"), "Total": v["amount"], "Amount due": v["amount"],
                       "Price": v["amount"], "Invoice": _number(rng, split, "code"), "Order": _number(rng, split, "int"),
                       "Reference": _number(rng, split, "code"), "Account": _number(rng, split, "int"),
                       "Phone": v["phone"], "Item": v["item"], "Quantity": _number(rng, split, "int"),
                       "Job": v["job"]}[key]
    text = "\n".join(f"{k}: {values[k]}" for k in keys)
    key = rng.choice(keys)
    q = rng.randrange(3)
    question = (f"{key}?", f"What is the {key.lower()}?", f"What is the {key}?")[q]
    return ReadingTask(text, question, values[key], "form_qa", {"phrasing": q})


def _invoice_qa(rng: random.Random, split: str, max_lines: int) -> ReadingTask:
    """A short invoice (2 to 4 lines: number, customer, date, total sentence in some order)."""
    v = _fact_values(rng, split)
    total = rng.choice(_INVOICE_TOTAL).format(**v)
    others = [f"Invoice {_number(rng, split, 'code')}", f"Customer: {v['name']}",
              f"Date: {_number(rng, split, 'date')}", f"{rng.randint(1, 9)} x {v['item']}"]
    lines = rng.sample(others, rng.randint(1, min(3, max(1, max_lines - 1))))
    lines.insert(rng.randint(0, len(lines)), total)
    q = rng.randrange(len(_INVOICE_QUESTIONS))
    answer = f"{v['amount']} {v['cur']}"
    return ReadingTask("\n".join(lines), _INVOICE_QUESTIONS[q], answer, "invoice_qa", {"phrasing": q})


_COUNTS = ("one", "two", "three")


def _locate_qa(rng: random.Random, split: str, max_lines: int, line_chars: int) -> ReadingTask:
    """A page of words or prose asked for the one to three words after a quoted phrase of one to
    three words that occurs once on it: copying from the middle of a page, the skill every question
    needs, on any text rather than on the facts' few sentence frames."""
    for _ in range(100):
        words = make_task(rng, rng.choice(("words", "prose", "mixed")), split, max_lines, line_chars).text.split()
        span, count = rng.randint(1, 3), rng.randint(1, 3)
        if len(words) < span + count:
            continue
        start = rng.randint(0, len(words) - span - count)
        anchor = words[start:start + span]
        if sum(words[i:i + span] == anchor for i in range(len(words) - span + 1)) > 1 or '"' in "".join(anchor):
            continue  # a phrase that occurs twice does not say where to read (nor one that breaks the quotes)
        quote = " ".join(anchor)
        question = (f'What is the word after "{quote}"?' if count == 1
                    else f'What are the {_COUNTS[count - 1]} words after "{quote}"?')
        return ReadingTask(" ".join(words), question, " ".join(words[start + span:start + span + count]),
                           "locate_qa", {"span": span, "count": count})
    raise RuntimeError(f"no page with a phrase that occurs once in 100 draws (max_lines={max_lines})")


def make_task(rng: random.Random, kind: str, split: str = "train", max_lines: int = 14,
              line_chars: int = 30) -> ReadingTask:
    """One task of `kind` on `split`'s side: for transcription kinds a text of 1 to `max_lines`
    lines of about `line_chars` characters (the renderer may wrap a line it cannot fit); "codes"
    lines are 1 to `line_chars` random capital letters and digits."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use one of {SPLITS}")
    if max_lines < 1:
        raise ValueError(f"max_lines={max_lines!r} must be >= 1")
    if kind == "prose_qa":
        return _prose_qa(rng, split, max_lines)
    if kind == "form_qa":
        return _form_qa(rng, split, max_lines)
    if kind == "invoice_qa":
        return _invoice_qa(rng, split, max_lines)
    if kind == "locate_qa":
        return _locate_qa(rng, split, max_lines, line_chars)
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: use one of {KINDS}")
    lines = rng.randint(1, max_lines)
    if kind == "codes":
        return ReadingTask("\n".join(_code(rng, split, rng.randint(1, line_chars)) for _ in range(lines)), TRANSCRIBE,
                           "", kind)
    if kind == "prose" or (kind == "mixed" and rng.random() < 0.5):
        # One paragraph the renderer wraps: as many characters as `lines` full lines hold.
        text = _prose_window(rng, split, rng.randint(max(8, (lines - 1) * line_chars), lines * line_chars))
    else:
        text = "\n".join(_word_line(rng, split, rng.randint(1, max(1, line_chars // 7))) for _ in range(lines))
    return ReadingTask(text, TRANSCRIBE, "", kind)


#: The 3-line invoice a new user asked about (the page reader's acceptance check), its question and
#: the answers counted right.
INVOICE = "Invoice 2024-117\nCustomer: Acme Corp\nThe total amount due is 4,250 euros."
INVOICE_QUESTION = "What is the total amount due?"
INVOICE_ANSWERS = ("4,250 euros", "4,250")


def invoice_variants() -> list[str]:
    """`INVOICE` and 20 variants of it: other headers, customers, dates, line orders and phrasings of
    the total (none is a generated task: they are written out, as a user would)."""
    totals = ("The total amount due is 4,250 euros.", "Total amount due: 4,250 euros",
              "Please pay the total amount due of 4,250 euros.", "The amount due in total is 4,250 euros.")
    heads = ("Invoice 2024-117", "Invoice KT-3381", "INVOICE 88", "Invoice no. 5521", "Bill 2025-009")
    others = ("Customer: Acme Corp", "Customer: Nora Lind", "Date: 3 May 2025", "2 x printer", "Client: Brandt GmbH")
    out = [INVOICE]
    for i in range(20):
        head, other, total = heads[i % 5], others[(i * 3 + 1) % 5], totals[i % 4]
        lines = [head, other, total] if i % 3 else [total, head, other] if i % 2 else [head, total, other]
        out.append("\n".join(lines))
    return out
