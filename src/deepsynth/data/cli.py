"""``deepsynth prepare | validate | upload``: public datasets -> instruction data on disk -> hub.

Wire into the main app with ``register(app)``.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Optional

import typer

from deepsynth.data.schema import DataValidationError

logger = logging.getLogger(__name__)

__all__ = ["register", "parse_options"]


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """``["k=v", ...]`` -> dict; a value that parses as JSON (numbers, true/false, lists) is used
    as such, anything else is a string."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise typer.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="'--option'")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def _fail(exc: Exception) -> None:
    from deepsynth.cli_errors import CommandFailed, describe

    raise CommandFailed(describe(exc)) from exc  # one line, the traceback under --debug


def prepare_command(
    source: str = typer.Argument(..., help="Known name (squad, squad_v2, natural_questions, ms_marco, "
                                           "cnn_dailymail, xsum, fiqa), hub id, dataset folder, BEIR folder, "
                                           "or a .json/.jsonl/.csv/.parquet file."),
    out: str = typer.Option(..., "--out", "-o", help="Output folder (data/*.parquet, manifest.json): a local "
                                                     "path or an object-storage URI (s3://..., gs://...)."),
    config: Optional[str] = typer.Option(None, "--config", help="Dataset configuration name."),
    split: Optional[str] = typer.Option(None, "--split", help="Split (default train; test for BEIR folders)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=0, help="Convert only the first N records."),
    converter: Optional[str] = typer.Option(None, "--converter",
                                            help="squad, natural_questions, ms_marco, fiqa, cnn_dailymail, "
                                                 "xsum, generic, instruction (default: from the name/columns)."),
    mapping: Optional[list[str]] = typer.Option(None, "--mapping",
                                                help="Generic converter columns: text=COL,answer=COL"
                                                     "[,instruction=COL][,id=COL] (repeatable)."),
    render: bool = typer.Option(False, "--render/--no-render", help="Store rendered pages (PNG) in an Image column."),
    preset: str = typer.Option("base", "--preset", help="Render preset for --render."),
    num_proc: Optional[int] = typer.Option(None, "--num-proc", min=1,
                                           help="Local engine: worker processes (datasets.map num_proc, "
                                                "default 1). Ray engine without --address: CPUs of the "
                                                "local Ray instance (default: all)."),
    shard_size: int = typer.Option(500, "--shard-size", min=1, help="Examples per Parquet shard."),
    no_answer: Optional[str] = typer.Option(None, "--no-answer",
                                            help="Unanswerable records (SQuAD v2, NQ, MS MARCO): 'skip' or "
                                                 "the answer text to use, e.g. unanswerable."),
    instruction: Optional[str] = typer.Option(None, "--instruction", help="Instruction for summarisation/generic."),
    variants: Optional[list[str]] = typer.Option(None, "--instruction-variant",
                                                 help="Instruction variant sampled per example (repeatable)."),
    option: Optional[list[str]] = typer.Option(None, "--option", help="Other converter option KEY=VALUE (repeatable)."),
    cache_dir: Optional[str] = typer.Option(None, "--cache-dir", help="datasets cache folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the output of a different earlier run."),
    strict: bool = typer.Option(False, "--strict", help="Exit with code 1 when any record was rejected."),
    engine: str = typer.Option("local", "--engine",
                               help="local (datasets.map) or ray (Ray Data tasks; needs the cluster extra). "
                                    "Both write the same output."),
    address: Optional[str] = typer.Option(None, "--address",
                                          help="Ray engine: 'auto' (the cluster this machine belongs to) or "
                                               "ray://HOST:10001; default: RAY_ADDRESS, else a local instance."),
) -> None:
    """Convert a dataset to instruction examples (validated, optionally rendered) in sharded Parquet.

    Running the same command again resumes an interrupted run (with either engine)."""
    from deepsynth import storage
    from deepsynth.cluster import ClusterError, RaySettings
    from deepsynth.data.prepare import prepare
    from deepsynth.data.prepared_folder import PrepareError

    options = parse_options(option)
    if no_answer is not None:
        options["no_answer"] = no_answer
    if instruction is not None:
        options["instruction"] = instruction
    if variants:
        options["instruction_variants"] = list(variants)
    if address is not None and engine != "ray":
        raise typer.BadParameter("--address is for --engine ray", param_hint="'--address'")
    try:
        ray_settings = RaySettings(address=address, num_cpus=num_proc) if engine == "ray" else None
        result = prepare(source, out, config=config, split=split, limit=limit, converter=converter,
                         mapping=mapping, options=options, render=render, preset=preset,
                         num_proc=num_proc or 1, shard_size=shard_size, cache_dir=cache_dir,
                         overwrite=overwrite, engine=engine, ray_settings=ray_settings)
    except (PrepareError, ClusterError, ValueError, DataValidationError, OSError) as exc:
        _fail(exc)
        return
    skipped = ", ".join(f"{k} {v}" for k, v in sorted(result.skipped.items())) or "none"
    typer.echo(f"{result.examples} example(s) from {result.input_rows} record(s) in {result.shards} shard(s) "
               f"({result.shards_written} written, {result.shards_reused} reused) -> {out}")
    typer.echo(f"skipped: {skipped}; rejected: {result.rejected}"
               + (f" (reasons in {storage.join(out, 'rejected.jsonl')})" if result.rejected else ""))
    if strict and result.rejected:
        raise typer.Exit(code=1)


def validate_command(
    path: str = typer.Argument(..., help="A prepared folder, a folder of files, or a .jsonl/.json/.parquet file "
                                         "(local, or an object-storage URI: s3://..., gs://...)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    preset: str = typer.Option("base", "--preset", help="Render preset for page counts of unrendered data."),
    pages: bool = typer.Option(True, "--pages/--no-pages", help="Count pages per document."),
) -> None:
    """Check every record and report counts, errors, duplicate ids, length and page histograms.

    Exits with code 1 when any record is invalid or an id is empty or duplicated."""
    from deepsynth.data.prepared_folder import PrepareError
    from deepsynth.data.validate import format_report, validate_path

    try:
        report = validate_path(path, preset=preset, count_pages=pages, progress=not as_json)
    except (PrepareError, ValueError, OSError) as exc:
        _fail(exc)
        return
    typer.echo(json.dumps(report, indent=1, ensure_ascii=False) if as_json else format_report(report))
    if not report["ok"]:
        raise typer.Exit(code=1)


def upload_command(
    path: str = typer.Argument(..., help="A folder written by `deepsynth prepare` (local, or an "
                                         "object-storage URI: s3://..., gs://...)."),
    repo: str = typer.Option(..., "--repo", help="Hub dataset repo id, e.g. user/name."),
    private: bool = typer.Option(False, "--private", help="Create the repo as private."),
    license: Optional[str] = typer.Option(None, "--license", help="Licence for the card (default: the source's)."),
    message: Optional[str] = typer.Option(None, "--message", help="Commit message."),
) -> None:
    """Push a prepared folder to the hub with a dataset card (token: HF_TOKEN or the stored login)."""
    from deepsynth.data.prepared_folder import PrepareError
    from deepsynth.data.upload import upload

    try:
        url = upload(path, repo, private=private, license=license, commit_message=message)
    except (PrepareError, ValueError, OSError) as exc:
        _fail(exc)
        return
    typer.echo(f"uploaded {path} -> {url}")


def register(app: typer.Typer) -> None:
    """Add the ``prepare``, ``validate`` and ``upload`` commands to ``app``."""
    app.command("prepare")(prepare_command)
    app.command("validate")(validate_command)
    app.command("upload")(upload_command)
