"""`python -m deepsynth.vllm.check`: the last step of `make vllm-env`.

Fails (exit status 1, naming what is missing) unless, in this environment, vLLM imports, vLLM
finds this project's plugin through its entry point, the plugin registers, and the vLLM engine
module imports. It starts no engine.
"""

from __future__ import annotations

import sys
from importlib.metadata import entry_points


def main() -> int:
    try:
        import vllm
    except ImportError as exc:
        print(f"vLLM does not import here ({exc}); run `make vllm-env` and use .venv-vllm/bin/python",
              file=sys.stderr)
        return 1
    names = [ep.value for ep in entry_points(group="vllm.general_plugins")]
    if "deepsynth.vllm:register" not in names:
        print(f"the entry point vllm.general_plugins -> deepsynth.vllm:register is not installed "
              f"(found {names}); reinstall the project into this environment", file=sys.stderr)
        return 1
    from deepsynth.vllm import register

    register()
    import deepsynth.vllm.engine  # noqa: F401

    print(f"vllm {vllm.__version__}: deepsynth plugin registered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
