"""``deepsynth ask``: answer an instruction about a document from the command line.

    deepsynth ask FILE|- --instruction "..." [--model DIR] [--stream] [--json]

FILE may be .txt, .md (laid out as Markdown), .pdf (text layer re-rendered, or its pages as images
when it has no text) or an image. '-' reads stdin: a PDF or an image when the bytes are one,
UTF-8 text otherwise. With --stream the answer is printed as it is generated; with --json the full
answer record (pages, token counts, compression, latency, why generation stopped) is printed as
JSON on stdout, and streamed text, if any, goes to stderr so that stdout stays valid JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from deepsynth.inference.engines import check_dtype


def _read_stdin():
    from deepsynth.inference.documents import DocumentError, Pdf

    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
    if data.startswith(b"%PDF-"):
        return Pdf(data)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        from deepsynth.inference.documents import open_image

        try:
            return open_image(data, field="stdin")
        except DocumentError:
            raise typer.BadParameter("stdin is neither UTF-8 text, a PDF nor an image", param_hint="DOCUMENT") from None


def ask_command(
    document: str = typer.Argument(..., help="A .txt/.md/.pdf file, an image, or '-' for stdin."),
    instruction: str = typer.Option(..., "--instruction", "-i", help="Question or instruction."),
    model: str = typer.Option("tiny-reader", "--model", "-m", help="Model directory, preset or hub id."),
    preset: Optional[str] = typer.Option(None, help="Render preset override (default: the pages the model was "
                                                    "trained on, from its bundle)."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Most tokens the answer may have (default: the "
                                                            "model's decoding default)."),
    as_json: bool = typer.Option(False, "--json", help="Print the full answer record as JSON."),
    stream: bool = typer.Option(False, "--stream", help="Print the answer as it is generated."),
    engine_name: str = typer.Option("hf", "--engine", help="Generation engine: 'hf' (transformers) or 'vllm' "
                                                           "(needs the vLLM environment of `make vllm-env`)."),
    dtype: str = typer.Option("auto", callback=check_dtype,
                              help="Weights' dtype: auto (the checkpoint's; vLLM makes float32 16-bit), float32, "
                                   "bfloat16, float16."),
) -> None:
    """Answer an instruction about a document."""
    from deepsynth.inference.documents import DocumentError, read_document
    from deepsynth.inference.engines import make_engine
    from deepsynth.models.bundle import resolve_generation

    if not instruction.strip():
        raise typer.BadParameter("the instruction is empty", param_hint="'--instruction'")
    if max_new_tokens is not None and not 1 <= max_new_tokens <= 8192:
        raise typer.BadParameter(f"{max_new_tokens} is out of range: allowed [1, 8192]",
                                 param_hint="'--max-new-tokens'")
    try:
        if document == "-":
            doc = _read_stdin()
        elif not Path(document).is_file():
            raise typer.BadParameter(f"no such file: {document}", param_hint="DOCUMENT")
        else:
            doc = read_document(document)
    except DocumentError as exc:
        raise typer.BadParameter(exc.message, param_hint="DOCUMENT") from None
    if isinstance(doc, str) and not doc.strip():
        raise typer.BadParameter("the document is empty", param_hint="DOCUMENT")
    try:
        engine = make_engine(model, engine_name, dtype=dtype, render_preset=preset)
        overrides = {"max_new_tokens": max_new_tokens} if max_new_tokens is not None else {}
        settings = resolve_generation(None, engine.generation, **overrides)
    except (FileNotFoundError, OSError, ValueError) as exc:
        raise typer.BadParameter(f"cannot load model {model!r}: {exc}", param_hint="'--model'") from None
    try:
        _answer(engine, doc, instruction, settings, stream, as_json)
    finally:
        close = getattr(engine, "close", None)  # the vLLM engine's processes
        if close is not None:
            close()


def _answer(engine, doc, instruction: str, settings, stream: bool, as_json: bool) -> None:
    from deepsynth.inference.documents import DocumentError
    from deepsynth.inference.interface import Answer

    try:
        prepared = engine.prepare(doc, field="DOCUMENT")
        if stream:
            out = sys.stderr if as_json else sys.stdout
            result = None
            for piece in engine.stream(prepared, instruction, settings):
                if isinstance(piece, Answer):
                    result = piece
                else:
                    out.write(piece)
                    out.flush()
            out.write("\n")
            out.flush()
            if result is not None and result.stopped == "loop" and not as_json:
                typer.echo("[stopped: the answer repeated itself; repeats removed in --json output]", err=True)
        else:
            result = engine.ask(prepared, instruction, settings)
    except DocumentError as exc:
        raise typer.BadParameter(exc.message, param_hint="DOCUMENT") from None
    if as_json:
        typer.echo(json.dumps({**result.to_dict(), "served_with": engine.describe()}, indent=2, default=list))
    elif not stream:
        typer.echo(result.answer)


def register(app: typer.Typer) -> None:
    """Add the ``ask`` command to a typer app."""
    app.command("ask")(ask_command)
