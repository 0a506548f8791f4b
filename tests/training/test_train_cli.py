"""`deepsynth train RECIPE --train DIR [--eval DIR] [--set key=value ...]`: a folder written by
`deepsynth prepare --render` is trained on with its stored pages as they are, and `--set`
overrides reach the run's config.yaml."""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import deepsynth.data.instruction_dataset as ID
from deepsynth.cli import app
from deepsynth.data import InstructionExample, write_jsonl
from deepsynth.data import pipeline as P
from deepsynth.render import RenderConfig
from deepsynth.training.config import TrainerConfig
from deepsynth.training.overrides import OverrideError, parse_overrides
from prepare_helpers import squad_rows, stored_pages

FOLDER_PRESET = "small"  # not the recipe's: the folder's pages must be used as they are, not redrawn


def prepare(tmp: Path, name: str, rows: list[dict], cache: str) -> Path:
    src = tmp / f"{name}.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    P.prepare(str(src), tmp / name, cache_dir=cache, render=True, preset=FOLDER_PRESET, shard_size=4, progress=False)
    return tmp / name


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("prepared")
    cache = str(tmp / "hf-cache")
    return prepare(tmp, "train", squad_rows(6), cache), prepare(tmp, "eval", squad_rows(2, start=100), cache)


@pytest.fixture()
def recipe(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({"model_name": "tiny", "output_dir": str(tmp_path / "recipe-run"), "batch_size": 2,
                                    "max_steps": 1, "learning_rate": 1e-3, "render_preset": "tiny", "log_interval": 1,
                                    "eval_max_new_tokens": 4, "seed": 3}))
    return path


def plain(output: str) -> str:
    """CLI output without the error box typer draws around messages, on one line."""
    return " ".join(re.sub(r"[\u2500-\u257f]", " ", output).split())


def test_train_from_a_prepared_folder_uses_its_pages_and_the_set_overrides(folders, recipe, tmp_path, monkeypatch):
    train_dir, _ = folders
    seen: list[dict] = []
    real_getitem = ID.InstructionDataset.__getitem__

    def spy(self, index):
        item = real_getitem(self, index)
        seen.append({"id": item["id"], "pages": [p.tobytes() for p in item["pages"]], "pre": self.pre_rendered})
        return item

    def no_rendering(*args, **kwargs):
        raise AssertionError("a page was rendered although the folder holds rendered pages")

    monkeypatch.setattr(ID.InstructionDataset, "__getitem__", spy)
    monkeypatch.setattr(ID, "render_text", no_rendering)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(recipe), "--train", str(train_dir), "--set", "max_steps=2",
                                      "--set", "learning_rate=5e-4", "--set", "use_lora=false",
                                      "--set", f"output_dir={out}"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["metrics"]["train_steps"] == 2
    drawn = RenderConfig.from_preset(FOLDER_PRESET)
    assert report["render_config"] == json.loads(json.dumps(asdict(drawn)))  # what the pages were drawn with

    # it read the folder's stored pages (at least 2 steps x batch 2 items), each equal to its stored PNGs
    stored = stored_pages(train_dir)
    assert len(seen) >= 4 and all(s["pre"] for s in seen)
    for s in seen:
        assert s["pages"] == stored[s["id"]]

    # the overrides are what the run recorded; the recipe's other fields are kept
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["max_steps"], config["learning_rate"], config["use_lora"]) == (2, 5e-4, False)
    assert (config["batch_size"], config["model_name"], config["seed"]) == (2, "tiny", 3)
    assert not (tmp_path / "recipe-run").exists()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2


def test_train_with_an_eval_folder_reports_eval_scores(folders, recipe, tmp_path):
    train_dir, eval_dir = folders
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(recipe), "--train", str(train_dir), "--eval", str(eval_dir),
                                      "--set", f"output_dir={out}"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["metrics"]["train_steps"] == 1
    assert set(report["metrics"]["eval"]) >= {"em", "f1"}
    assert any("eval" in json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines())


def test_train_from_an_examples_file_renders_with_the_recipe_preset(recipe, tmp_path):
    src = tmp_path / "train.jsonl"
    write_jsonl([InstructionExample(id=f"e{i}", text=f"Item {i} costs {i} dollars.", instruction="Cost?",
                                    answer=str(i)) for i in range(2)], src)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(recipe), "--train", str(src), "--set", "max_steps=1",
                                      "--output-dir", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["metrics"]["train_steps"] == 1
    assert report["render_config"] == json.loads(json.dumps(asdict(RenderConfig.from_preset("tiny"))))


@pytest.mark.parametrize("args, message", [
    (["--set", "max_stepz=5"], "has no field 'max_stepz'"),
    (["--set", "max_steps"], "expected key=value"),
    (["--set", "use_lora=maybe"], "use_lora is a bool"),
    (["--set", "max_steps=lots"], "max_steps is an integer"),
    (["--set", "batch_size=0"], "TrainerConfig.batch_size=0 is invalid: must be >= 1"),
    (["--set", "lr_scheduler=step"], "TrainerConfig.lr_scheduler='step' is invalid"),
])
def test_bad_overrides_are_clear_errors(folders, recipe, args, message):
    result = CliRunner().invoke(app, ["train", str(recipe), "--train", str(folders[0]), *args])
    assert result.exit_code == 2
    assert message in plain(result.output)


def test_a_folder_that_was_not_prepared_is_a_clear_error(recipe, tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    result = CliRunner().invoke(app, ["train", str(recipe), "--train", str(folder)])
    assert result.exit_code == 2
    assert "not a folder written by `deepsynth prepare`" in plain(result.output)


def test_parse_overrides_types_values_by_field():
    got = parse_overrides(["max_steps=5", "use_lora=true", "learning_rate=1e-4", "max_minutes=null",
                           "instruction_prompt=Answer: briefly", "text_encoder_model=~", "report_to=[tensorboard]",
                           "warmup_steps=3", "warmup_steps=4", "max_grad_norm=1"], TrainerConfig)
    assert got == {"max_steps": 5, "use_lora": True, "learning_rate": 1e-4, "max_minutes": None,
                   "instruction_prompt": "Answer: briefly", "text_encoder_model": None,
                   "report_to": ["tensorboard"], "warmup_steps": 4, "max_grad_norm": 1.0}
    assert isinstance(got["learning_rate"], float) and isinstance(got["max_grad_norm"], float)
    with pytest.raises(OverrideError, match="learning_rate is a number"):
        parse_overrides(["learning_rate=fast"], TrainerConfig)
    with pytest.raises(OverrideError, match="report_to is a list of strings"):
        parse_overrides(["report_to={a: 1}"], TrainerConfig)
