"""Instruction templates offered by the CLI, the HTTP API (`GET /api/templates`) and the web UI."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Template:
    """One instruction template.

    id:          stable identifier used by clients.
    name:        label shown to people.
    instruction: the instruction text; `{input}` is replaced by the user's input when `needs_input`.
    needs_input: the user must type something (a question, or a whole custom instruction).
    input_label: what to ask the user for when `needs_input`.
    json_schema: structured output the template offers: answers are JSON valid against this
                 schema, when a request asks for structured output (`"structured": true`).
    """

    id: str
    name: str
    instruction: str
    needs_input: bool = False
    input_label: str = ""
    json_schema: dict | None = field(default=None, hash=False, compare=False)

    def fill(self, user_input: str | None = None) -> str:
        if not self.needs_input:
            return self.instruction
        if not user_input or not user_input.strip():
            raise ValueError(f"template {self.id!r} needs {self.input_label.lower() or 'an input'}")
        return self.instruction.replace("{input}", user_input.strip())

    def to_dict(self) -> dict:
        return asdict(self)


#: What the extraction template answers: the dates, names and amounts, each as written in the document.
EXTRACT_SCHEMA: dict = {
    "type": "object",
    "properties": {
        "dates": {"type": "array", "items": {"type": "string"}},
        "names": {"type": "array", "items": {"type": "string"}},
        "amounts": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["dates", "names", "amounts"],
}

TEMPLATES: tuple[Template, ...] = (
    Template("question", "Question", "{input}", needs_input=True, input_label="Question"),
    Template("summary", "Summary", "Summarize the document."),
    Template("financial_summary", "Summary of financial aspects",
             "Summarize the financial aspects of the document: amounts, costs, revenue, payments and their dates."),
    Template("key_points", "Key points", "List the key points of the document."),
    Template("extract", "Extract dates, names and amounts",
             "Extract every date, name and amount mentioned in the document.",
             json_schema=EXTRACT_SCHEMA),
    Template("custom", "Custom instruction", "{input}", needs_input=True, input_label="Instruction"),
)

BY_ID: dict[str, Template] = {t.id: t for t in TEMPLATES}


def get_template(template_id: str) -> Template:
    try:
        return BY_ID[template_id]
    except KeyError:
        raise ValueError(f"unknown template {template_id!r}; choose one of {', '.join(BY_ID)}") from None
