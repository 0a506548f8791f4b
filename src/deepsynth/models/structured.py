"""Structured output: answers constrained to a JSON schema while they are generated.

The grammar is lm-format-enforcer's (`JsonSchemaParser`, a character-level parser of a JSON
schema, and `TokenEnforcer`, which maps the characters the parser allows onto the tokenizer's
vocabulary); `JsonSchemaLogitsProcessor` applies it to `generate` as a transformers logits
processor. It works with any vocabulary, the tiny models' one-character tokens included.

What this module adds is the token budget. A schema-constrained answer that runs out of
`max_new_tokens` half-way through a string would not parse, and an untrained or confused model
happily writes strings forever. So every step knows the shortest way to close the JSON from where
it is (`closing`: the parser walked greedily towards its end) and, once the budget left comes
within `margin` characters of it, only tokens after which the JSON can still be closed in time are
allowed; the closing's next character is always among them. The answer therefore parses and
validates however the model behaves. If a model still ends a row unclosed (one token that opens a
long required structure while outside the margin), `complete` appends the closing and the answer
is logged as repaired.

Only schema keywords the parser enforces are accepted (`check_schema` names any other), so
"validates" means against the whole schema, not a part of it.
"""

from __future__ import annotations

import json
import logging

import torch
from transformers import LogitsProcessor

logger = logging.getLogger(__name__)

#: Keywords the parser enforces while decoding.
ENFORCED_KEYWORDS = frozenset({
    "type", "properties", "required", "items", "enum", "const", "anyOf", "allOf", "oneOf", "$ref", "$defs",
    "definitions", "minLength", "maxLength", "pattern", "minItems", "maxItems", "additionalProperties",
})
#: Keywords that describe a schema without constraining values.
ANNOTATION_KEYWORDS = frozenset({
    "title", "description", "default", "examples", "$schema", "$id", "$comment", "readOnly", "writeOnly",
    "deprecated",
})
_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
#: Longest closing searched for; a schema whose shortest answer is longer is refused.
MAX_CLOSING_CHARS = 4096
# Characters tried first when closing outside strings: the ones that end objects and arrays, then
# the separator, then the shortest values. Whitespace is never chosen while anything else is allowed.
_CLOSING_ORDER = '}],0"[{nft-:'
# More allowed characters than this means free text inside a string: close it, or (below its
# minLength) write the first allowed letter.
_FREE_TEXT = 30
#: Whitespace characters in a row the parser allows outside strings (indentation of pretty JSON
#: fits; an untrained model cannot spend its budget on blank space).
MAX_WHITESPACE = 4


class SchemaError(ValueError):
    """A JSON schema that cannot be enforced; `field` is the JSON path of the offending part."""

    def __init__(self, message: str, field: str = "json_schema") -> None:
        super().__init__(message)
        self.message, self.field = message, field


def _walk(schema, path: str) -> None:
    if not isinstance(schema, dict):
        raise SchemaError("a schema must be a JSON object", path)
    for key, value in schema.items():
        if key not in ENFORCED_KEYWORDS and key not in ANNOTATION_KEYWORDS:
            raise SchemaError(f"keyword {key!r} is not enforced by constrained decoding; supported: "
                              f"{', '.join(sorted(ENFORCED_KEYWORDS))}", f"{path}.{key}")
        where = f"{path}.{key}"
        if key == "type":
            types = value if isinstance(value, list) else [value]
            bad = [t for t in types if t not in _TYPES]
            if bad or not types:
                raise SchemaError(f"unknown type {bad[0] if bad else value!r}; use one of {', '.join(sorted(_TYPES))}",
                                  where)
        elif key in ("properties", "$defs", "definitions"):
            if not isinstance(value, dict):
                raise SchemaError(f"{key} must be an object of schemas", where)
            for name, sub in value.items():
                _walk(sub, f"{where}.{name}")
        elif key == "items":
            _walk(value, where)
        elif key == "additionalProperties":
            if not isinstance(value, bool):
                _walk(value, where)
        elif key in ("anyOf", "allOf", "oneOf"):
            if not isinstance(value, list) or not value:
                raise SchemaError(f"{key} must be a non-empty list of schemas", where)
            for i, sub in enumerate(value):
                _walk(sub, f"{where}[{i}]")
        elif key == "required":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise SchemaError("required must be a list of property names", where)
        elif key == "$ref":
            if not isinstance(value, str) or not value.startswith("#/"):
                raise SchemaError("only local references (#/$defs/...) are supported", where)
        elif key in ("minLength", "maxLength", "minItems", "maxItems"):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise SchemaError(f"{key} must be a non-negative integer", where)


def _library():
    try:
        import lmformatenforcer
    except ImportError:
        raise RuntimeError("structured output needs lm-format-enforcer: pip install 'deepsynth[serve]'") from None
    return lmformatenforcer


def parser_for(schema: dict):
    """lm-format-enforcer's parser of `schema` (checked first: see `check_schema`)."""
    JsonSchemaParser = _library().JsonSchemaParser

    try:
        return JsonSchemaParser(schema)
    except Exception as exc:  # the library reports schema problems with many exception types
        raise SchemaError(f"the schema cannot be compiled: {exc}") from None


def closing(parser, limit: int = MAX_CLOSING_CHARS) -> str | None:
    """A short string that completes the JSON from `parser`'s state ("" once it can end).

    Greedy: inside free text, the closing quote (or, below minLength, a letter); elsewhere the first
    allowed character of `_CLOSING_ORDER`, else the first allowed non-whitespace character. None
    when no completion within `limit` characters was found.
    """
    out: list[str] = []
    while not parser.can_end():
        if len(out) >= limit:
            return None
        allowed = parser.get_allowed_characters()
        if len(allowed) > _FREE_TEXT:
            char = '"' if '"' in allowed else next((c for c in allowed if c.isalnum()), None)
        else:
            char = next((c for c in _CLOSING_ORDER if c in allowed), None)
        if char is None:
            char = next((c for c in allowed if not c.isspace()), None)
        if char is None:
            return None
        try:
            parser = parser.add_character(char)
        except Exception:  # the parser refused what it allowed: no completion along this path
            return None
        out.append(char)
    return "".join(out)


def advance(parser, text: str):
    """`parser` after `text`, or None when the schema does not allow `text` there."""
    try:
        for char in text:
            if char not in parser.get_allowed_characters():
                return None
            parser = parser.add_character(char)
    except Exception:
        return None
    return parser


def check_schema(schema, max_new_tokens: int | None = None, field: str = "json_schema") -> dict:
    """`schema` if constrained decoding can enforce it within `max_new_tokens`; else `SchemaError`.

    The budget check counts characters of the shortest answer the schema allows, an upper bound
    of its tokens for vocabularies that hold every character as a token.
    """
    if not isinstance(schema, dict):
        raise SchemaError("the schema must be a JSON object", field)
    try:
        json.dumps(schema)
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"the schema is not JSON: {exc}", field) from None
    _walk(schema, field)
    try:
        shortest = closing(parser_for(schema))
    except SchemaError as exc:
        raise SchemaError(exc.message, field) from None
    except Exception as exc:  # a schema the library accepts but cannot walk
        raise SchemaError(f"the schema cannot be enforced: {type(exc).__name__}: {exc}", field) from None
    if shortest is None:
        raise SchemaError(f"no answer of at most {MAX_CLOSING_CHARS} characters satisfies the schema", field)
    if max_new_tokens is not None and len(shortest) > max_new_tokens:
        raise SchemaError(f"the shortest answer the schema allows takes {len(shortest)} characters "
                          f"({shortest[:80]!r}); raise max_new_tokens (now {max_new_tokens}) or simplify the schema",
                          field)
    return schema


class TokenizerData:
    """lm-format-enforcer's view of a tokenizer (its vocabulary as strings in a prefix tree).

    Built the way the library's transformers integration builds it (which does not import with
    transformers 5): each token decoded after a "0" so word-start tokens keep their space.
    """

    def __init__(self, tokenizer) -> None:
        TokenEnforcerTokenizerData = _library().TokenEnforcerTokenizerData

        special = set(tokenizer.all_special_ids)
        zero = tokenizer.encode("0", add_special_tokens=False)[-1]
        regular = []
        for token in range(len(tokenizer)):
            if token in special:
                continue
            after_zero = tokenizer.decode([zero, token])[1:]
            alone = tokenizer.decode([token])
            regular.append((token, after_zero, len(after_zero) > len(alone)))

        def decode(tokens: list[int]) -> str:
            return tokenizer.decode(tokens).rstrip("\ufffd")

        self.eos_token_id = tokenizer.eos_token_id
        self.data = TokenEnforcerTokenizerData(regular, decode, tokenizer.eos_token_id, False, len(tokenizer))
        self.strings: dict[int, str] = self.data.tokenizer_tree.tokens_to_strs
        # Tokens with control characters: the library's free-text shortcut lets tabs and form
        # feeds into strings, where JSON forbids them.
        self.control = frozenset(t for t, text in self.strings.items() if any(ord(c) < 32 for c in text))
        self.exponent = frozenset(t for t, text in self.strings.items() if "e" in text or "E" in text)
        # the token that writes one character alone, for forcing the closing
        self.single: dict[str, int] = {}
        for token, text, _ in regular:
            if len(text) == 1:
                self.single.setdefault(text, token)


class JsonSchemaLogitsProcessor(LogitsProcessor):
    """Masks every token the schema does not allow next, row by row, and closes the JSON in time.

    prompt_width:   columns of `input_ids` before the first new token (0 when generating from
                    embeddings, where the ids hold new tokens only).
    max_new_tokens: the row's budget.
    margin:         characters of slack left before candidates are checked against the budget.
    keep:           how many allowed candidates (best scores first) a checked step keeps.
    """

    def __init__(self, schema: dict, tokenizer_data: TokenizerData, prompt_width: int, max_new_tokens: int,
                 margin: int = 24, keep: int = 8) -> None:
        TokenEnforcer = _library().TokenEnforcer

        self.schema, self.tok = schema, tokenizer_data
        self.enforcer = TokenEnforcer(tokenizer_data.data, parser_for(schema))
        self.enforcer.root_parser.config.max_consecutive_whitespaces = MAX_WHITESPACE
        self.prompt_width, self.max_new_tokens = prompt_width, max_new_tokens
        self.margin, self.keep = margin, keep
        self.checked_steps = 0  # steps where candidates were checked against the budget (for tests)

    def _row_allowed(self, generated: list[int], scores: torch.Tensor) -> list[int]:
        allowed = list(self.enforcer.get_allowed_tokens(generated).allowed_tokens)
        parser = self.enforcer.prefix_states[tuple(generated)].parser
        key = parser.shortcut_key()
        if isinstance(key, tuple) and key and key[0] == "json_freetext":
            allowed = [t for t in allowed if t not in self.tok.control]
        elif _in_number(parser):
            # no exponents: "1E999" is valid JSON that parsers read as infinity, which no
            # integer or number schema accepts
            allowed = [t for t in allowed if t not in self.tok.exponent]
        left = self.max_new_tokens - len(generated)  # tokens left, this one included
        close = closing(parser)
        if close is None or left - 1 - len(close) >= self.margin:
            return allowed
        self.checked_steps += 1
        kept: list[int] = []
        eos = self.tok.eos_token_id
        forced = self.tok.single.get(close[0]) if close else None
        ids = torch.tensor(allowed, dtype=torch.long, device=scores.device)
        best = scores[ids].argsort(descending=True)[:64]
        for token in ids[best].tolist():
            if token == eos:
                ok = parser.can_end()
            else:
                after = advance(parser, self.tok.strings.get(token, ""))
                rest = closing(after) if after is not None else None
                ok = rest is not None and len(rest) <= left - 1
            if ok:
                kept.append(token)
                if len(kept) >= self.keep:
                    break
        if forced is not None and forced not in kept:
            kept.append(forced)
        if not kept:
            kept = [eos] if parser.can_end() else allowed
        return kept

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        masked = torch.full_like(scores, float("-inf"))
        eos = self.tok.eos_token_id
        for row, ids in enumerate(input_ids[:, self.prompt_width:].tolist()):
            if eos in ids:  # finished row: generate pads it; nothing to constrain
                masked[row] = scores[row]
                continue
            allowed = torch.tensor(self._row_allowed(ids, scores[row]), dtype=torch.long, device=scores.device)
            masked[row, allowed] = scores[row, allowed]
            if torch.isinf(masked[row]).all():
                # every allowed token was removed by an earlier processor (n-gram blocking, top-p):
                # the schema wins, the best of its tokens by the raw logits stays
                masked[row, allowed] = 0.0
        return masked

    def complete(self, generated: list[int], text: str) -> str:
        """`text`, a row's answer decoded from its `generated` tokens, closed when the budget (or
        a cancellation) ended it unfinished."""
        states = self.enforcer.prefix_states
        known = next((k for k in range(len(generated), -1, -1) if tuple(generated[:k]) in states), -1)
        for k in range(known + 1, len(generated) + 1):  # each step's state follows from the one before
            self.enforcer.get_allowed_tokens(list(generated[:k]))
        return _closed(text, closing(states[tuple(generated)].parser))


def close_text(schema: dict, text: str) -> str:
    """`text`, a schema-constrained answer that the budget (or a cancellation) cut, closed from the
    schema's parser run over the text (for an engine that keeps no enforcer states: vLLM's)."""
    parser = advance(parser_for(schema), text)
    return _closed(text, closing(parser) if parser is not None else None)


def _closed(text: str, rest: str | None) -> str:
    """`text` + `rest` (its closing, None: none found, `text` kept), with a warning when it was cut."""
    if rest is None:
        logger.warning("a schema-constrained answer cannot be closed: %r", text[:200])
        return text
    if rest:
        logger.warning("a schema-constrained answer ran out of tokens unclosed; appended %r", rest[:80])
    return text + rest


def _in_number(parser) -> bool:
    """Whether `parser` (or one branch of a union) is inside a number that has digits."""
    from lmformatenforcer.characterlevelparser import UnionParser
    from lmformatenforcer.jsonschemaparser import NumberParsingState

    if isinstance(parser, UnionParser):
        return any(_in_number(p) for p in parser.parsers)
    stack = getattr(parser, "object_stack", None)
    return bool(stack) and isinstance(stack[-1], NumberParsingState) and stack[-1].seen_digit
