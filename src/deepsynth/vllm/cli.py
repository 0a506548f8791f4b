"""The vLLM commands: `deepsynth check-parity MODEL`, `deepsynth check-reference MODEL` and
`deepsynth export-vllm DIR OUT`.

Both import vLLM only where it is installed (`make vllm-env`); registering them costs nothing.
"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add ``check-parity``, ``check-reference`` and ``export-vllm`` to a typer app."""
    from deepsynth.vllm.parity import check_parity_command
    from deepsynth.vllm.reference import check_reference_command
    from deepsynth.vllm.export import export_vllm_command

    app.command("check-parity")(check_parity_command)
    app.command("check-reference")(check_reference_command)
    app.command("export-vllm")(export_vllm_command)
