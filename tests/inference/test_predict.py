"""The library's `evaluate` and `predict` (`deepsynth.inference.batch`) and the commands over them,
on a tiny local bundle (a copy of the shipped reader): the library gives the command's report, both
share one options dataclass and one model-and-data step, read config.json and deepsynth.json once,
draw every page once, and fail the same way on bad input."""

from __future__ import annotations

import json
import pathlib
import shutil
from collections import Counter

import pytest
from typer.testing import CliRunner

import deepsynth
from deepsynth.cli import app
from deepsynth.data.instruction_dataset import InstructionDataset
from deepsynth.data.synthetic import SyntheticConfig, generate
from deepsynth.inference import batch
from deepsynth.inference.batch import BatchOptions
from deepsynth.models.bundle import BUNDLE_FILE, read_spec
from deepsynth.models.registry import CHECKPOINT_DIR

# Short answers keep the module in the fast tier; the reader's answers to these forms are shorter.
TOKENS = 12
BATCH = 2  # 3 examples: batches of 2 and 1


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A model folder of our own (its deepsynth.json may be rewritten): the shipped reader's files."""
    folder = tmp_path_factory.mktemp("model") / "reader"
    shutil.copytree(CHECKPOINT_DIR / "form-reader", folder,
                    ignore=shutil.ignore_patterns("*.log.jsonl", "reader_pretrain*.json"))
    return folder


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    examples = generate(SyntheticConfig(layout="form"), n_docs=3, kinds=("question",))
    path = tmp_path_factory.mktemp("data") / "forms.jsonl"
    path.write_text("".join(json.dumps(ex.to_dict()) + "\n" for ex in examples), encoding="utf-8")
    return path


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


def test_library_evaluate_gives_the_commands_report_and_predict_its_predictions(bundle, records, tmp_path):
    result = _cli("evaluate", str(records), "-m", str(bundle), "-o", str(tmp_path / "cli.json"), "--no-record",
                  "--max-new-tokens", str(TOKENS), "--batch-size", str(BATCH))
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "cli.json").read_text())

    report = deepsynth.evaluate(records, bundle, tmp_path / "lib.json", record=False, max_new_tokens=TOKENS,
                                batch_size=BATCH)
    assert json.loads(json.dumps(report)) == written == json.loads((tmp_path / "lib.json").read_text())
    assert json.loads(result.stdout)["scores"] == report["scores"]
    assert report["n"] == 3 and len(report["predictions_no_instruction"]) == 3
    assert all(p["instruction"] == "" for p in report["predictions_no_instruction"])
    assert all(p["instruction"] for p in report["predictions"])

    # predict through the same options object: evaluate's predictions with the instruction
    options = BatchOptions(max_new_tokens=TOKENS, batch_size=BATCH)
    records_out = deepsynth.predict(records, bundle, tmp_path / "p.jsonl", options=options)
    assert records_out == report["predictions"]
    assert [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()] == records_out
    assert deepsynth.predict is batch.predict and deepsynth.evaluate is batch.evaluate

    # without the ablation: one pass, the same scores, the run without the instruction absent
    once = deepsynth.evaluate(records, bundle, options=options, record=False, ablation=False)
    assert once["predictions"] == report["predictions"] and once["scores"] == report["scores"]
    assert once["scores_no_instruction"] is once["ablation"] is once["predictions_no_instruction"] is None


def test_each_bundle_file_is_read_once_and_each_page_drawn_once(bundle, records, tmp_path, monkeypatch):
    """Our code reads files through `Path.read_text` (config_file, read_spec): count it per file
    name, and count the pages drawn (`InstructionDataset.__getitem__`) per example."""
    reads: Counter = Counter()
    drawn: Counter = Counter()
    read_text, getitem = pathlib.Path.read_text, InstructionDataset.__getitem__

    def counting_read(self, *args, **kwargs):
        reads[self.name] += 1
        return read_text(self, *args, **kwargs)

    def counting_getitem(self, index):
        drawn[index] += 1
        return getitem(self, index)

    monkeypatch.setattr(pathlib.Path, "read_text", counting_read)
    monkeypatch.setattr(InstructionDataset, "__getitem__", counting_getitem)
    deepsynth.predict(records, bundle, max_new_tokens=TOKENS, batch_size=BATCH)
    assert reads["config.json"] == 1 and reads[BUNDLE_FILE] == 1, reads
    assert drawn == {0: 1, 1: 1, 2: 1}

    reads.clear()
    drawn.clear()
    # with the scores recorded in the bundle: still one read of deepsynth.json (then one write)
    report = deepsynth.evaluate(records, bundle, max_new_tokens=TOKENS, batch_size=BATCH)
    assert reads["config.json"] == 1 and reads[BUNDLE_FILE] == 1, reads
    assert drawn == {0: 1, 1: 1, 2: 1}  # both passes (with and without the instruction) from one drawing
    monkeypatch.undo()
    recorded = read_spec(bundle).evaluation["forms.jsonl"]
    assert recorded == {"scores": report["scores"], "scores_no_instruction": report["scores_no_instruction"]}


class _VLLMWouldStart(Exception):
    """Raised where the vLLM engine would start vLLM (not installed in this environment)."""


def test_vllm_engine_is_given_the_model_open_run_resolved(bundle, records, monkeypatch, vllm_plugin_undone):
    """`--engine vllm` resolves the model once: `open_run` hands its `ModelSource` to the engine,
    whose checkpoint step (`deepsynth.vllm.checkpoint.resolve_model`) resolves nothing again. Run up
    to where vLLM itself would start (vLLM is not in this environment: its check is skipped)."""
    from deepsynth.inference import engines
    from deepsynth.models import bundle as bundle_module
    from deepsynth.vllm import checkpoint
    from deepsynth.vllm.engine import VLLMEngine

    resolved: list[str] = []
    reads: Counter = Counter()
    resolve_source, read_text = bundle_module.resolve_source, pathlib.Path.read_text

    def counting_resolve(name, seed=0):
        resolved.append(name)
        return resolve_source(name, seed=seed)

    def counting_read(self, *args, **kwargs):
        reads[self.name] += 1
        return read_text(self, *args, **kwargs)

    def start(engine, found):
        raise _VLLMWouldStart(found)

    monkeypatch.setattr(engines, "require_vllm", lambda: None)
    monkeypatch.setattr(bundle_module, "resolve_source", counting_resolve)
    monkeypatch.setattr(checkpoint, "resolve_source", counting_resolve)
    monkeypatch.setattr(pathlib.Path, "read_text", counting_read)
    monkeypatch.setattr(VLLMEngine, "_start", start)
    with pytest.raises(_VLLMWouldStart) as stopped:
        deepsynth.predict(records, bundle, engine="vllm", max_new_tokens=TOKENS)
    found = stopped.value.args[0]
    assert resolved == [str(bundle)]
    assert reads["config.json"] == 1 and reads[BUNDLE_FILE] == 1, reads
    # what vLLM would load: the bundle as it is (transformers' layout), with the bundle's own spec
    assert found.path == str(bundle) and found.lora is None
    assert found.spec == read_spec(bundle)


def test_options_are_one_dataclass_with_one_name_per_engine():
    assert BatchOptions().engine == "hf"
    with pytest.warns(FutureWarning, match="'local' is the old name of 'hf'"):
        assert BatchOptions(engine="local").engine == "hf"
    for bad, message in ((dict(engine="onnx"), "choose one of hf, vllm, ray"),
                         (dict(dtype="float32"), "--dtype is for --engine vllm"),
                         (dict(engine="vllm", decode="vllm"), "are for --engine ray"),
                         (dict(batch_size=0), "batch_size=0"),
                         (dict(max_new_tokens=0), "max_new_tokens=0")):
        with pytest.raises(ValueError, match=message):
            BatchOptions(**bad)
    assert BatchOptions(engine="ray", decode="vllm", dtype="float32").uses_vllm
    with pytest.raises(TypeError, match="unknown option"):
        deepsynth.predict("x.jsonl", "form-reader", engines="hf")
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        deepsynth.evaluate("x.jsonl", "form-reader", metrics="em,bleu")


def test_both_commands_fail_the_same_way_on_bad_input(bundle, records, tmp_path):
    """A bad model or data: one `error:` line, exit code 1, no output file, the same for both;
    flags that do not go together: a usage error (exit code 2) naming them, the same for both."""
    outs = {"evaluate": tmp_path / "e.json", "predict": tmp_path / "p.jsonl"}
    seen = {}
    for command, out in outs.items():
        no_model = _cli(command, str(records), "-m", str(tmp_path / "absent"), "-o", str(out))
        no_data = _cli(command, str(tmp_path / "absent.jsonl"), "-m", str(bundle), "-o", str(out))
        flags = _cli(command, str(records), "-m", str(bundle), "-o", str(out), "--engine", "vllm", "--replicas", "2")
        seen[command] = [(r.exit_code, r.output.strip().replace(command, "COMMAND")) for r in (no_model, no_data, flags)]
        assert not out.exists()
    assert seen["evaluate"] == seen["predict"]
    (model_code, model_line), (data_code, data_line), (flags_code, flags_line) = seen["predict"]
    assert model_code == 1 and model_line.startswith("error: cannot load model") and "\n" not in model_line
    assert data_code == 1 and data_line.startswith("error: ") and "absent.jsonl" in data_line
    assert flags_code == 2 and "are for --engine ray" in flags_line
