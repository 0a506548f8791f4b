"""`deepsynth check-parity MODEL`: the same pages and instructions through the HF engine and the vLLM
engine, in float32 with greedy decoding; the first differing token of each answer.

The HF side runs in this process (the project's environment, where models are trained and
evaluated); the vLLM side runs in the vLLM environment (`make vllm-env`), in a subprocess:
`python -m deepsynth.vllm.parity REQUESTS OUT` (`answer_file`), given the rendered pages as PNG
files. Both sides decode with the bundle's guards (n-gram blocking, loop stop), so identical
weights and identical arithmetic give identical tokens; the report names the first token where
they part.

    deepsynth check-parity tiny-reader [--adapter DIR] [--examples FILE.jsonl] [--out report.json]

What the two checks share lives here too: where the vLLM environment is (`vllm_python`), how its
side runs (`run_side`), the first differing token (`first_difference`) and how a report is printed
and turned into an exit status (`report_command`); `deepsynth.vllm.reference` uses them.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer
from PIL import Image

logger = logging.getLogger(__name__)

VLLM_PYTHON_ENV = "DEEPSYNTH_VLLM_PYTHON"
VLLM_VENV = ".venv-vllm"

#: Documents and instructions checked when no --examples file is given: key-value pages (what the
#: tiny reader reads), a transcription and questions.
DEFAULT_EXAMPLES = (
    ("alpha: 07\nbravo: 42\ncharlie: 15", "read"),
    ("alpha: 07\nbravo: 42\ncharlie: 15", "bravo"),
    ("name: Ada\ncity: Oslo\nyear: 1843", "city"),
    ("kilo: 17\nlima: 99\nmike: 3\nnovember: 61", "read"),
)


def vllm_python(explicit: str | None = None) -> str | None:
    """The python of the vLLM environment: `explicit`, $DEEPSYNTH_VLLM_PYTHON, this interpreter when
    vLLM imports here, or .venv-vllm/bin/python in the working directory or the source checkout."""
    if explicit:
        return explicit
    if os.environ.get(VLLM_PYTHON_ENV):
        return os.environ[VLLM_PYTHON_ENV]
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    roots = [Path.cwd(), Path(__file__).resolve().parents[3]]
    for root in roots:
        candidate = root / VLLM_VENV / "bin" / "python"
        if candidate.is_file():
            return str(candidate)
    return None


#: The vLLM side of check-parity (argv before REQUESTS OUT): `main` below.
SIDE_COMMAND = ["-m", "deepsynth.vllm.parity"]


def run_side(command: Sequence[str], job: dict, python: str, workdir: Path, what: str, timeout: float,
             kv_cache_gib: int = 1) -> dict:
    """The vLLM side of a check: `python *command JOB OUT` with `job` written to JOB; what it wrote
    to OUT. RuntimeError naming `what` with the end of its stderr when it fails."""
    requests, out = workdir / "side-job.json", workdir / "side-out.json"
    requests.write_text(json.dumps(job))
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(kv_cache_gib)))
    proc = subprocess.run([python, *command, str(requests), str(out)], capture_output=True, text=True, env=env,
                          timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def run_vllm(job: dict, python: str, workdir: Path, timeout: float = 1800) -> dict:
    """Answer `job` (see `answer_file`) with the vLLM engine in a subprocess of `python`."""
    return run_side(SIDE_COMMAND, job, python, workdir, "the vLLM engine", timeout, job.get("kv_cache_gib") or 1)


def hf_token_ids(engine, pages: Sequence[Sequence], instructions: Sequence[str], settings) -> list[dict]:
    """HF rows (Decoder.run) with each answer's token ids, collected from `generate` through a
    streamer (the Decoder's public hook for new tokens), cut as the Decoder cuts them: at EOS,
    without the padding of rows that stopped early."""
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self) -> None:
            self.steps: list[list[int]] = []
            self.prompt_seen = False

        def put(self, value) -> None:
            if not self.prompt_seen:  # generate hands the prompt over first
                self.prompt_seen = True
                return
            self.steps.append(value.reshape(-1).tolist())

        def end(self) -> None:
            pass

    collect = Collect()
    rows = engine.decoder.run(list(pages), list(instructions), settings, streamer=collect)
    tok = engine.tokenizer
    for r, row in enumerate(rows):
        ids = [step[r] for step in collect.steps]
        if tok.eos_token_id in ids:
            ids = ids[:ids.index(tok.eos_token_id)]
        while ids and ids[-1] == tok.pad_token_id:
            ids.pop()
        row["token_ids"] = ids
    return rows


@dataclass
class Difference:
    """Where two answers' tokens part (index into the answer's tokens)."""

    index: int
    hf_token: int | None
    vllm_token: int | None

    def to_dict(self, tokenizer=None) -> dict:
        """The report's entry; with `tokenizer`, each side's token as text too."""
        out = {"index": self.index, "hf_token": self.hf_token, "vllm_token": self.vllm_token}
        if tokenizer is not None:
            out.update(hf_piece=tokenizer.decode([self.hf_token]) if self.hf_token is not None else None,
                       vllm_piece=tokenizer.decode([self.vllm_token]) if self.vllm_token is not None else None)
        return out


def first_difference(a: Sequence[int], b: Sequence[int]) -> Difference | None:
    """The first index where token lists `a` (HF) and `b` (vLLM) differ; None when equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return Difference(i, x, y)
    if len(a) != len(b):
        i = min(len(a), len(b))
        return Difference(i, a[i] if i < len(a) else None, b[i] if i < len(b) else None)
    return None


def check_parity(model: str, examples: Sequence[tuple[str, str]] = DEFAULT_EXAMPLES, adapter: str | None = None,
                 max_new_tokens: int = 48, python: str | None = None, kv_cache_gib: int = 1) -> dict:
    """Answer `examples` ((document, instruction) pairs: text, or page images as the engines take
    them) with both engines; the report per answer."""
    import torch

    from deepsynth.inference.engine import InstructionEngine, encode_png

    python = vllm_python(python)
    if python is None:
        raise FileNotFoundError(f"no vLLM environment found: run `make vllm-env` (it makes {VLLM_VENV}/) or set "
                                f"{VLLM_PYTHON_ENV} to a python that imports vllm")
    engine = InstructionEngine(model, adapter=adapter, dtype=torch.float32)
    engine.model.float()
    settings = engine.settings(None, max_new_tokens=max_new_tokens, do_sample=False)
    pages = [engine.pages_for(text) for text, _ in examples]
    instructions = [instruction for _, instruction in examples]
    hf_rows = hf_token_ids(engine, pages, instructions, settings)
    tok = engine.tokenizer
    # vLLM loads its own copy: drop ours first, so that a real-size model fits twice in turn, not at once
    del engine
    gc.collect()
    with tempfile.TemporaryDirectory(prefix="deepsynth-parity-") as tmp:
        work = Path(tmp)
        items = []
        for i, (doc_pages, instruction) in enumerate(zip(pages, instructions)):
            paths = []
            for k, page in enumerate(doc_pages):
                path = work / f"page-{i}-{k}.png"
                path.write_bytes(encode_png(page))
                paths.append(str(path))
            items.append({"pages": paths, "instruction": instruction})
        job = {"model": model, "adapter": adapter, "dtype": "float32", "kv_cache_gib": kv_cache_gib,
               "settings": {"max_new_tokens": max_new_tokens, "do_sample": False}, "items": items}
        vllm = run_vllm(job, python, work)
    answers = []
    for (text, instruction), hf, vl in zip(examples, hf_rows, vllm["answers"]):
        diff = first_difference(hf["token_ids"], vl["token_ids"])
        document = text[:80] if isinstance(text, str) else f"{len(text)} page image(s)"
        entry = {"instruction": instruction, "document": document, "identical": diff is None and hf["answer"] ==
                 vl["answer"], "hf": {"answer": hf["answer"], "stopped": hf["stopped"], "tokens": len(hf["token_ids"])},
                 "vllm": {"answer": vl["answer"], "stopped": vl["stopped"], "tokens": len(vl["token_ids"])},
                 "first_difference": None}
        if diff is not None:
            entry["first_difference"] = {**diff.to_dict(tok), "common_prefix": tok.decode(
                hf["token_ids"][:diff.index], skip_special_tokens=True)}
        answers.append(entry)
    return {"model": model, "adapter": adapter, "dtype": "float32", "decoding": "greedy",
            "max_new_tokens": max_new_tokens, "identical": sum(a["identical"] for a in answers),
            "answers": answers, "vllm": vllm["describe"]}


def _read_examples(path: Path) -> list[tuple[str, str]]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        pages = record.get("pages") if isinstance(record, dict) else None
        if not isinstance(record, dict) or not isinstance(record.get("instruction"), str) or not (
                isinstance(record.get("text"), str) or (isinstance(pages, list) and pages
                                                        and all(isinstance(p, str) for p in pages))):
            raise typer.BadParameter(f"line {n}: expected {{\"text\": str, \"instruction\": str}} or "
                                     "{\"pages\": [image paths], \"instruction\": str}", param_hint="'--examples'")
        if pages is None:
            out.append((record["text"], record["instruction"]))
            continue
        for page in pages:
            if not (path.parent / page).is_file():
                raise typer.BadParameter(f"line {n}: page image {page!r} not found (paths are relative to "
                                         f"{path.parent})", param_hint="'--examples'")
        out.append(([Image.open(path.parent / page).convert("RGB") for page in pages], record["instruction"]))
    if not out:
        raise typer.BadParameter(f"{path} holds no examples", param_hint="'--examples'")
    return out


def check_parity_command(
    model: str = typer.Argument(..., help="Model directory, adapter bundle, shipped checkpoint or preset."),
    adapter: Optional[str] = typer.Option(None, help="LoRA adapter: merged on the HF side, a LoRA module in vLLM."),
    examples: Optional[Path] = typer.Option(None, exists=True, dir_okay=False,
                                            help="JSONL of {\"text\" or \"pages\" (image paths), \"instruction\"} "
                                                 "(default: built-in pages)."),
    max_new_tokens: int = typer.Option(48, min=1, max=8192, help="Answer length compared."),
    vllm_python_path: Optional[str] = typer.Option(None, "--vllm-python",
                                                   help=f"Python of the vLLM environment (default: "
                                                        f"${VLLM_PYTHON_ENV} or {VLLM_VENV}/bin/python)."),
    out: Optional[Path] = typer.Option(None, help="Write the JSON report here too."),
    kv_cache_gib: int = typer.Option(1, min=1, help="GiB vLLM reserves for the KV cache (a real-size model's "
                                                    "longest sequence in float32 needs more than 1)."),
) -> None:
    """Run the same pages and instructions through the HF and vLLM engines (float32, greedy) and
    report the first differing token of each answer; exit status 1 when any answer differs."""
    pairs = _read_examples(examples) if examples else list(DEFAULT_EXAMPLES)

    def line(a: dict) -> str:
        where = "identical" if a["identical"] else (
            difference_text(a["first_difference"]) if a["first_difference"] else "same tokens, different text")
        return (f"{a['instruction']!r}: {where}  (HF {a['hf']['tokens']} tokens, {a['hf']['stopped']}; "
                f"vLLM {a['vllm']['tokens']} tokens, {a['vllm']['stopped']})")

    report_command(lambda: check_parity(model, pairs, adapter=adapter, max_new_tokens=max_new_tokens,
                                        python=vllm_python_path, kv_cache_gib=kv_cache_gib),
                   (FileNotFoundError,), line,
                   lambda report: f"{report['identical']}/{len(report['answers'])} answers identical",
                   lambda report: report["identical"] == len(report["answers"]), out)


def difference_text(diff: dict | None) -> str:
    """A report's first difference (`Difference.to_dict`, maybe with "common_prefix") as one phrase."""
    if diff is None:
        return "same tokens"
    text = f"differs at token {diff['index']}: HF {diff.get('hf_piece')!r} vs vLLM {diff.get('vllm_piece')!r}"
    return text + (f" after {diff['common_prefix']!r}" if "common_prefix" in diff else "")


def report_command(run: Callable[[], dict], bad_input: tuple[type[Exception], ...], line: Callable[[dict], str],
                   summary: Callable[[dict], str], agree: Callable[[dict], bool], out: Path | None) -> None:
    """What check-parity and check-reference do with their report: run the check (`bad_input`
    errors are usage errors; a failed vLLM side, a RuntimeError, exits with status 2), print one
    `line` per answer and the `summary`, write the JSON report to `out`, and exit with status 1
    unless the two sides `agree`."""
    try:
        report = run()
    except bad_input as exc:
        raise typer.BadParameter(str(exc)) from None
    except RuntimeError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    for answer in report["answers"]:
        typer.echo(line(answer))
    typer.echo(summary(report))
    if out is not None:
        from deepsynth.atomic import write_text_atomic

        write_text_atomic(out, json.dumps(report, indent=2) + "\n")
    if not agree(report):
        raise typer.Exit(1)


# ---- the vLLM side ---------------------------------------------------------------------------------
def answer_file(requests_path: str | Path, out_path: str | Path) -> dict:
    """Answer the requests of a JSON file with a `VLLMEngine`; write (and return) the answers.

    Input: {"model", "adapter"?, "dtype"?, "kv_cache_gib"?, "settings"? (GenerationSettings
    fields), "items": [{"text" | "pages" (PNG paths), "instruction"}]}.
    Output: {"describe", "answers": [Answer fields + "token_ids"]}.
    """
    from deepsynth.atomic import write_text_atomic
    from deepsynth.inference.interface import Answer
    from deepsynth.vllm.engine import VLLMEngine, VLLMOptions

    job = json.loads(Path(requests_path).read_text())
    options = VLLMOptions(dtype=job.get("dtype", "auto"), kv_cache_gib=job.get("kv_cache_gib"),
                          max_num_seqs=job.get("max_num_seqs", 64))
    engine = VLLMEngine(job["model"], adapter=job.get("adapter"), options=options)
    try:
        settings = engine.settings(None, **job.get("settings", {}))
        documents = []
        for i, item in enumerate(job["items"]):
            if "text" in item:
                documents.append(item["text"])
            elif "pages" in item:
                documents.append([Image.open(p).convert("RGB") for p in item["pages"]])
            else:
                raise ValueError(f"items[{i}] needs 'text' or 'pages'")
        rows = engine.generate_rows(documents, [it["instruction"] for it in job["items"]], settings)
        answers = []
        for row in rows:
            answer = Answer.from_row(row, 0.0).to_dict()
            answer["token_ids"] = row["token_ids"]
            answers.append(answer)
        result = {"describe": engine.describe(), "answers": answers}
    finally:
        engine.close()
    write_text_atomic(Path(out_path), json.dumps(result, indent=1) + "\n")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """vLLM side: `python -m deepsynth.vllm.parity REQUESTS.json OUT.json` (`answer_file`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2:
        print("usage: python -m deepsynth.vllm.parity REQUESTS.json OUT.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        answer_file(argv[0], argv[1])
    except (ValueError, FileNotFoundError) as exc:  # bad documents, bundles and settings are ValueErrors
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # vLLM spawns worker processes: keep the work behind this guard
    sys.exit(main())

