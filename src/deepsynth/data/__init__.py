"""Instruction data: the record schema, its file formats, and synthetic document Q&A."""

from deepsynth.data.schema import (
    DataValidationError,
    InstructionExample,
    check_unique_ids,
    read_examples,
    read_json,
    read_jsonl,
    read_parquet,
    write_examples,
    write_json,
    write_jsonl,
    write_parquet,
)
from deepsynth.data.synthetic import (
    KEYS,
    QUESTION_TEMPLATES,
    TRANSCRIBE_INSTRUCTION,
    SyntheticConfig,
    chance_em,
    generate,
    generate_passages,
    make_document,
    split_values,
)

__all__ = [
    "DataValidationError",
    "InstructionExample",
    "check_unique_ids",
    "read_examples",
    "read_json",
    "read_jsonl",
    "read_parquet",
    "write_examples",
    "write_json",
    "write_jsonl",
    "write_parquet",
    "KEYS",
    "QUESTION_TEMPLATES",
    "TRANSCRIBE_INSTRUCTION",
    "SyntheticConfig",
    "chance_em",
    "generate",
    "generate_passages",
    "make_document",
    "split_values",
]
