"""examples/instruction_prompting_example.py runs offline (examples 1 and 5 here; 2-4 use the same paths)."""

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parents[1] / "examples" / "instruction_prompting_example.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("instruction_prompting_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_offline_fallback_says_so_in_one_line_and_runs(example, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert example.main(["1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len([line for line in out if line.startswith("offline:")]) == 1
    assert (tmp_path / "squad_instructions.jsonl").read_text().count("\n") == 12
    assert example.main(["5", "--out", str(tmp_path), "--steps", "1"]) == 0
    assert (tmp_path / "ex5-lora" / "adapter" / "adapter_config.json").is_file()
    with pytest.raises(SystemExit):
        example.main(["7"])
