"""How the `deepsynth` command reports a failure: one line on stderr, never a traceback.

`ErrorReportingGroup` is the click group class of the top-level typer app, so every command of every
stage goes through it (the installed script, `python -m deepsynth.cli` and typer's CliRunner alike):

* an exception raised by a command becomes ``error: <message>`` and exit code 1; the message is
  the exception's own (deepsynth's errors say what was wrong, which input, and what to do), on one
  line; an exception of a kind no input should cause (a bug) says so and how to see its traceback;
* a usage error (bad option value, missing argument, unknown command) becomes
  ``error: <message> (see '<command> --help')`` and keeps click's exit code 2;
* ``--debug`` (before the command: ``deepsynth --debug ask ...``) or ``DEEPSYNTH_DEBUG=1`` lets
  the exception through with its full traceback.
"""

from __future__ import annotations

import os
import sys
import traceback

import typer
from typer._click import exceptions as click_errors  # typer 0.2x ships its own click
from typer.core import TyperGroup

DEBUG_ENV = "DEEPSYNTH_DEBUG"
DEBUG_META = "deepsynth.debug"
# Failures a user's input or environment can cause: their message is the report.
EXPECTED = (ValueError, OSError, ImportError, RuntimeError)
# Long third-party messages (a list of every model type transformers knows) are cut here.
MAX_CHARS = 600


def debug_requested(ctx: typer.Context | None = None) -> bool:
    if os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    return bool(ctx is not None and ctx.meta.get(DEBUG_META))


def one_line(text: str) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= MAX_CHARS else line[: MAX_CHARS - 1].rstrip() + "…"


def describe(err: BaseException) -> str:
    """The one-line report of an exception raised by a command."""
    if isinstance(err, OSError) and err.filename is not None and str(err).startswith("[Errno"):
        # "[Errno 2] No such file or directory: 'x'" -> "no such file or directory: x"
        what = (err.strerror or type(err).__name__).rstrip(".")
        return one_line(f"{what[:1].lower()}{what[1:]}: {err.filename}")
    text = str(err) or type(err).__name__
    if isinstance(err, KeyError) and err.args:
        text = str(err.args[0])
    text = _transformers_model_type(text) or text
    if isinstance(err, EXPECTED):
        return one_line(text)
    return one_line(f"internal error ({type(err).__name__}: {text}); rerun with --debug for the traceback "
                    "and report it")


def _transformers_model_type(text: str) -> str | None:
    """transformers' unknown-model errors list every type it knows; keep what was asked and where."""
    if "Unrecognized configuration class" in text:
        return text.split(". Model type should be one of")[0].rstrip(".") + " (not a model type this command can load)"
    if "Unrecognized model in" in text or "does not recognize this architecture" in text:
        first = text.split(". ")[0].rstrip(".")
        return (f"{first}. The checkpoint's config.json names a model type this transformers version does not "
                "know: check the model_type in config.json, or upgrade transformers")
    return None


def _debug_cause(err: click_errors.ClickException) -> None:
    """Under --debug, the traceback of the exception a command turned into this error (commands
    report a model that fails to load as a bad --model value, for instance)."""
    cause = err.__cause__ or err.__context__
    if cause is not None and (getattr(err, "debug", False) or debug_requested(getattr(err, "ctx", None))):
        traceback.print_exception(cause)


class CommandFailed(click_errors.ClickException):
    """A command's exception, reported as one line (exit code 1)."""

    exit_code = 1


class ErrorReportingGroup(TyperGroup):
    """The top-level group: commands' exceptions and usage errors as one line on stderr."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except click_errors.ClickException as err:
            err.debug = debug_requested(ctx)  # `main` reports it after the context is gone
            raise
        except (typer.Exit, typer.Abort):
            raise
        except Exception as err:  # every failure of a command is reported; --debug shows it whole
            if debug_requested(ctx):
                raise
            raise CommandFailed(describe(err)) from err

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click_errors.NoArgsIsHelpError as err:  # bare `deepsynth`: the help, as before
            typer.echo(err.ctx.get_help() if err.ctx else err.format_message(), err=True)
            sys.exit(err.exit_code)
        except click_errors.UsageError as err:
            _debug_cause(err)
            hint = f" (see '{err.ctx.command_path} --help')" if err.ctx is not None else ""
            typer.echo(f"error: {one_line(err.format_message())}{hint}", err=True)
            sys.exit(err.exit_code)
        except click_errors.ClickException as err:
            _debug_cause(err)
            typer.echo(f"error: {one_line(err.format_message())}", err=True)
            sys.exit(err.exit_code)
        except typer.Abort:
            typer.echo("error: aborted", err=True)
            sys.exit(1)
        # Not standalone, click returns an Exit's code (--help, typer.Exit(n)) instead of exiting.
        sys.exit(code if isinstance(code, int) else 0)
