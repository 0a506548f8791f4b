"""Structured output: answers constrained to a JSON schema parse and validate, from the untrained
tiny model, at any budget the schema fits in, greedy or sampled, batched or streamed, and even
when a processor pushes the model to write one string forever."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from transformers import LogitsProcessor

from deepsynth.inference import InstructionEngine
from deepsynth.inference.interface import Answer
from deepsynth.inference.interface import Engine
from deepsynth.inference.templates import BY_ID, EXTRACT_SCHEMA
from deepsynth.models.structured import (
    JsonSchemaLogitsProcessor,
    SchemaError,
    check_schema,
    closing,
    parser_for,
)

DOC = "Invoice 77. Total: 42 dollars, paid by Ada Lovelace on 3 March 2024."

SCHEMAS = {
    "extract": EXTRACT_SCHEMA,
    "typed": {"type": "object", "required": ["ok", "n", "kind", "inner", "score"], "properties": {
        "ok": {"type": "boolean"}, "n": {"type": "integer"}, "score": {"type": "number"},
        "kind": {"enum": ["paid", "due"]},
        "inner": {"type": "object", "properties": {"x": {"type": "string", "minLength": 3}}, "required": ["x"]}}},
    "list": {"type": "array", "items": {"type": "string", "maxLength": 8}, "minItems": 2, "maxItems": 4},
    "nested": {"type": "object", "required": ["people"], "properties": {"people": {"type": "array", "items": {
        "type": "object", "required": ["name", "age"],
        "properties": {"name": {"type": "string"}, "age": {"type": ["integer", "null"]}}}}}},
    "any_object": {"type": "object"},
    "refs": {"$defs": {"money": {"type": "object", "properties": {"amount": {"type": "string"},
                                                                  "currency": {"enum": ["USD", "EUR"]}},
                                 "required": ["amount", "currency"]}},
             "type": "object", "properties": {"total": {"$ref": "#/$defs/money"}}, "required": ["total"]},
}


@pytest.fixture(scope="module")
def engine():
    torch.manual_seed(0)
    return InstructionEngine("tiny", render_preset="tiny", cache_pages=16)


def valid(answer: str, schema: dict) -> None:
    jsonschema.validate(json.loads(answer), schema)


def shortest(schema: dict) -> int:
    return len(closing(parser_for(schema)))


def test_instruction_engine_is_an_engine(engine):
    assert isinstance(engine, Engine)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_answers_validate_at_every_budget_greedy_and_sampled(engine, name):
    schema = SCHEMAS[name]
    least = shortest(schema)
    for budget, sample in ((least, False), (least + 1, True), (least + 6, False), (least + 40, False),
                           (least + 40, True)):
        settings = engine.settings(max_new_tokens=budget, do_sample=sample, temperature=1.5 if sample else 1.0)
        answers = engine.ask_batch([DOC, DOC], ["Extract the dates.", "Who paid?"], settings, json_schema=schema)
        for a in answers:
            valid(a.answer, schema)
            assert a.new_tokens <= budget and a.stopped in ("eos", "max_new_tokens")


class WriteForever(LogitsProcessor):
    """Pushes one character's token far above the rest at every step (a model stuck in a string)."""

    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.token] += 1e4
        return scores


def test_a_model_stuck_in_a_string_is_closed_in_time(engine):
    schema = {"type": "object", "properties": {"note": {"type": "string"}, "total": {"type": "string"}},
              "required": ["note", "total"]}
    a_token = engine.tokenizer.convert_tokens_to_ids("a")
    for budget in (shortest(schema), 40, 90):
        settings = engine.settings(max_new_tokens=budget, extra={"logits_processor": [WriteForever(a_token)]})
        answer = engine.ask(DOC, "Summarize.", settings, json_schema=schema)
        valid(answer.answer, schema)
        # the model never ends a string by itself: the budget closed the JSON at its last token
        assert answer.new_tokens == budget and answer.stopped == "max_new_tokens"
        if budget > shortest(schema) + 10:
            assert "a" in json.loads(answer.answer)["note"]


def test_stream_and_schema_answers(engine):
    schema = SCHEMAS["typed"]
    pieces = list(engine.stream(DOC, "Extract.", engine.settings(max_new_tokens=70), json_schema=schema))
    final = pieces[-1]
    assert isinstance(final, Answer)
    valid(final.answer, schema)
    assert "".join(p for p in pieces[:-1]).strip() == final.answer or final.stopped == "max_new_tokens"


def test_the_extraction_template_offers_a_schema(engine):
    template = BY_ID["extract"]
    assert template.json_schema == EXTRACT_SCHEMA and template.to_dict()["json_schema"] == EXTRACT_SCHEMA
    answer = engine.ask(DOC, template.fill(), engine.settings(max_new_tokens=60), json_schema=template.json_schema)
    assert set(json.loads(answer.answer)) == {"dates", "names", "amounts"}


def test_unenforceable_schemas_are_refused_by_name():
    with pytest.raises(SchemaError) as err:
        check_schema({"type": "object", "properties": {"n": {"type": "integer", "minimum": 3}}})
    assert err.value.field == "json_schema.properties.n.minimum" and "minimum" in err.value.message
    with pytest.raises(SchemaError, match="unknown type"):
        check_schema({"type": "strin"})
    with pytest.raises(SchemaError, match="local references"):
        check_schema({"$ref": "https://example.com/schema.json"})
    with pytest.raises(SchemaError, match="JSON object"):
        check_schema(["not", "a", "schema"])
    with pytest.raises(SchemaError) as err:
        check_schema(EXTRACT_SCHEMA, max_new_tokens=10)
    assert f"takes {shortest(EXTRACT_SCHEMA)} characters" in err.value.message and "max_new_tokens" in err.value.message
    assert check_schema(EXTRACT_SCHEMA, max_new_tokens=shortest(EXTRACT_SCHEMA)) is EXTRACT_SCHEMA


def test_engine_refuses_a_schema_longer_than_the_budget(engine):
    with pytest.raises(SchemaError):
        engine.ask(DOC, "Extract.", engine.settings(max_new_tokens=5), json_schema=EXTRACT_SCHEMA)


def test_an_answer_cut_unclosed_is_closed(engine):
    processor = JsonSchemaLogitsProcessor(SCHEMAS["nested"], engine.decoder.tokenizer_data(), 0, 100)
    text = '{"people": [{"name": "Ada'
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    closed = processor.complete(ids, text)
    assert closed.startswith(text)
    valid(closed, SCHEMAS["nested"])
