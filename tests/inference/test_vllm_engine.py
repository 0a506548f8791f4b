"""The vLLM engine against the HF engine (vLLM runs in its own environment, `make vllm-env`).

The main environment has no vLLM: the vLLM side runs in a subprocess of the vLLM environment's
python, and these tests are skipped (with the reason) only when that environment is absent.
Each vLLM start takes about a minute on 2 CPU cores, so each test starts as few as it can.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from deepsynth.inference.parity import DEFAULT_EXAMPLES, first_difference, vllm_python
from deepsynth.models.registry import resolve
from deepsynth.models.vllm_export import ExportError, native_config

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
PYTHON = vllm_python()
needs_vllm = pytest.mark.skipif(PYTHON is None, reason="the vLLM environment is absent: run `make vllm-env` "
                                                       "(makes .venv-vllm) or set DEEPSYNTH_VLLM_PYTHON")
READER = resolve("tiny-reader")
DOCUMENTS = [text for text, _ in DEFAULT_EXAMPLES]
INSTRUCTIONS = [instruction for _, instruction in DEFAULT_EXAMPLES]
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
          "additionalProperties": False}
COMPARED = ("answer", "stopped", "new_tokens", "prompt_tokens", "visual_tokens", "pages", "text_tokens")


def run_vllm_side(args: list[str], timeout: float = 1200) -> None:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([PYTHON, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-6000:]


def stock_readout_copy(tmp_path: Path) -> Path:
    """The tiny reader with its config saying the stock DeepSeek-OCR-2 readout (learned queries)."""
    copy = tmp_path / "stock-readout"
    shutil.copytree(READER, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(model_type="deepseek_ocr2", vision_readout="queries",
                  architectures=["DeepseekOcr2ForConditionalGeneration"])
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@needs_vllm
def test_vllm_answers_equal_hf_engine_for_tiny_reader(tmp_path):
    from deepsynth.inference.engine import InstructionEngine

    hf = [a.to_dict() for a in InstructionEngine(READER).ask_batch(DOCUMENTS, INSTRUCTIONS)]
    job = {"model": READER, "documents": DOCUMENTS, "instructions": INSTRUCTIONS,
           "stock_readout_model": str(stock_readout_copy(tmp_path)), "schema": SCHEMA}
    (tmp_path / "job.json").write_text(json.dumps(job))
    run_vllm_side([str(HERE / "vllm_side.py"), str(tmp_path / "job.json"), str(tmp_path / "out.json")])
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["describe"]["engine"] == "vllm"
    for mine, theirs in zip(out["answers"], hf):
        assert {k: mine[k] for k in COMPARED} == {k: theirs[k] for k in COMPARED}
    assert any(a["answer"] for a in hf)
    # streaming: the pieces add up to the answer, and the final answer is the HF one
    assert "".join(out["stream_pieces"]).strip() == out["stream_final"]["answer"] == hf[0]["answer"]
    assert len(out["stream_pieces"]) > 1
    # through the server: our API and the OpenAI-compatible one (text document, image part)
    api = out["api"]
    assert [r.get("answer") for r in api["ours"]] == [h["answer"] for h in hf], api["ours"]
    assert api["openai"] == [h["answer"] for h in hf]
    assert api["openai_image"] == hf[0]["answer"]
    assert api["openai_client"] == hf[0]["answer"]
    assert api["openai_client_stream"].strip() == hf[0]["answer"]
    # structured output through vLLM's guided decoding: valid JSON even from the tiny reader, which
    # was never trained to write any
    for answer in api["schema_answers"]:
        assert "answer" in answer, answer
        jsonschema.validate(json.loads(answer["answer"]), SCHEMA)
    jsonschema.validate(json.loads(api["openai_schema"]), SCHEMA)
    # a schema the grammar backend cannot enforce is refused up front, naming the field
    assert api["unsupported_schema"]["status"] == 422, api["unsupported_schema"]
    assert "xgrammar" in api["unsupported_schema"]["body"]["message"]
    # Without the plugin's patch readout vLLM does not fail: it reads the page differently and
    # answers otherwise. This is what the readout step of deepsynth.vllm_plugin prevents.
    differ = sum(a != h["answer"] for a, h in zip(out["stock_readout_answers"], hf))
    assert differ >= len(hf) // 2, out["stock_readout_answers"]


@needs_vllm
def test_lora_adapter_served_unmerged_gives_merged_answers(tmp_path):
    from deepsynth.data.synthetic import SyntheticConfig, generate
    from deepsynth.inference.engine import InstructionEngine
    from deepsynth.training.config import TrainerConfig
    from deepsynth.training.trainer import Trainer

    config = TrainerConfig(model_name="tiny-reader", output_dir=str(tmp_path / "run"), batch_size=4, max_steps=4,
                           learning_rate=2e-2, use_lora=True, lora_rank=8, lora_alpha=16, lora_dropout=0.0,
                           log_interval=1, seed=3)
    Trainer(config).train(generate(SyntheticConfig(facts_per_doc=2), 16, "train"))
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    merged = [a.to_dict() for a in InstructionEngine(str(adapter)).ask_batch(DOCUMENTS, INSTRUCTIONS)]
    base = [a.answer for a in InstructionEngine(READER).ask_batch(DOCUMENTS, INSTRUCTIONS)]
    assert merged[0]["answer"] is not None
    job = {"model": str(adapter), "dtype": "float32", "kv_cache_gib": 1,
           "items": [{"text": d, "instruction": i} for d, i in zip(DOCUMENTS, INSTRUCTIONS)]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    run_vllm_side(["-m", "deepsynth.inference.vllm_engine", str(tmp_path / "job.json"), str(tmp_path / "out.json")])
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["describe"]["lora"] == str(adapter)  # served as a LoRA module, not merged weights
    for mine, theirs in zip(out["answers"], merged):
        assert {k: mine[k] for k in COMPARED} == {k: theirs[k] for k in COMPARED}
    # the adapter matters: the trained answers are not the base model's
    assert [m["answer"] for m in merged] != base


# The vLLM side of the next test: the prompt ids vLLM reports for the engine's requests, and the answers.
PLAIN_SIDE = """
import json, sys
from deepsynth.inference.vllm_engine import VLLMEngine, VLLMOptions
job = json.load(open(sys.argv[1]))
with VLLMEngine(job["model"], options=VLLMOptions(dtype="float32", kv_cache_gib=1, max_num_seqs=4)) as engine:
    docs = [engine.prepare(d) for d in job["documents"]]
    requests = engine._submit(docs, job["instructions"], engine.generation, None, None)
    ids = [list(engine._wait(r)[0].prompt_token_ids) for r in requests]
    answers = [a.to_dict() for a in engine.ask_batch(job["documents"], job["instructions"])]
json.dump({"prompt_ids": ids, "answers": answers}, open(sys.argv[2], "w"))
"""


@needs_vllm
def test_vllm_serves_a_plain_layout_model_with_the_hf_engines_prompt_ids(tmp_path):
    """DeepSeek's plain prompt (BOS put in front by us, no newline after the instruction) reaches
    vLLM as token ids: the prompt vLLM runs is the HF engine's, token for token, one and two pages."""
    from dataclasses import replace

    from deepsynth.inference.engine import InstructionEngine
    from deepsynth.models.bundle import load_bundle, save_bundle

    reader = load_bundle("tiny-reader")
    model = tmp_path / "plain"
    model.mkdir()
    save_bundle(model, reader.model, reader.processor, replace(reader.spec, prompt_layout="plain"))
    documents = [DOCUMENTS[0], "\n".join(f"item {i}: {7 * i}" for i in range(12))]
    instructions = [INSTRUCTIONS[0], "item 9?"]
    hf_engine = InstructionEngine(str(model))
    docs = [hf_engine.prepare(d) for d in documents]
    assert [len(d.pages) for d in docs][0] == 1 and len(docs[1].pages) > 1
    hf_ids = []
    for doc, instruction in zip(docs, instructions):
        inputs = hf_engine.decoder.prepare_inputs([doc.pages], [instruction])
        hf_ids.append(inputs["input_ids"][0].tolist())
    tok = reader.processor.tokenizer
    assert all(ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1 for ids in hf_ids)
    hf = [a.to_dict() for a in hf_engine.ask_batch(documents, instructions)]
    (tmp_path / "job.json").write_text(json.dumps({"model": str(model), "documents": documents,
                                                   "instructions": instructions}))
    run_vllm_side(["-c", PLAIN_SIDE, str(tmp_path / "job.json"), str(tmp_path / "out.json")])
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["prompt_ids"] == hf_ids
    for mine, theirs in zip(out["answers"], hf):
        assert {k: mine[k] for k in COMPARED} == {k: theirs[k] for k in COMPARED}


@needs_vllm
def test_check_parity_reports_no_difference_for_tiny_reader(tmp_path):
    report = tmp_path / "parity.json"
    env = {**os.environ, "DEEPSYNTH_VLLM_PYTHON": PYTHON, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run([sys.executable, "-m", "deepsynth.cli", "check-parity", "tiny-reader", "--max-new-tokens",
                           "32", "--out", str(report)], capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    data = json.loads(report.read_text())
    assert data["identical"] == len(data["answers"]) == len(DEFAULT_EXAMPLES)
    assert all(a["first_difference"] is None and a["hf"]["tokens"] > 0 for a in data["answers"])
    assert f"{len(DEFAULT_EXAMPLES)}/{len(DEFAULT_EXAMPLES)} answers identical" in proc.stdout


@needs_vllm
def test_evaluate_and_predict_with_vllm_write_the_local_report(tmp_path):
    """`evaluate --engine vllm --dtype float32` scores the answers vLLM serves: the same report
    (predictions with and without the instruction, scores, stop reasons) as the local engine; and
    `predict --engine vllm` writes its predictions."""
    from typer.testing import CliRunner

    from deepsynth.cli import app
    from deepsynth.data.synthetic import SyntheticConfig, generate

    examples = generate(SyntheticConfig(layout="form"), n_docs=6, kinds=("question",))
    records = tmp_path / "records.jsonl"
    records.write_text("".join(json.dumps(ex.to_dict()) + "\n" for ex in examples), encoding="utf-8")
    common = [str(records), "-m", "tiny-reader", "--no-record", "--max-new-tokens", "24"]
    result = CliRunner().invoke(app, ["evaluate", *common, "-o", str(tmp_path / "local.json")])
    assert result.exit_code == 0, result.output
    run_vllm_side(["-m", "deepsynth.cli", "evaluate", *common, "-o", str(tmp_path / "vllm.json"), "--engine", "vllm",
                   "--dtype", "float32"])
    local, served = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("local", "vllm"))
    assert served == local
    assert sum(p["prediction"] == p["answer"] for p in local["predictions"]) >= 1  # the reader answers some
    # predict: evaluate's predictions (with the instruction), one line per example
    run_vllm_side(["-m", "deepsynth.cli", "predict", *common[:3], "--max-new-tokens", "24", "-o",
                   str(tmp_path / "p.jsonl"), "--engine", "vllm", "--dtype", "float32", "--batch-size", "4"])
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert lines == [p for p in local["predictions"] if p["instruction"]][:len(lines)] and len(lines) == 6


# ---- no vLLM needed -----------------------------------------------------------------------------
def test_evaluate_engine_flags_are_checked(tmp_path):
    from typer.testing import CliRunner

    from deepsynth.cli import app

    records = tmp_path / "r.jsonl"
    records.write_text('{"id": "a", "text": "x: 1", "instruction": "x?", "answer": "1"}\n')
    common = ["evaluate", str(records), "-m", "tiny-reader", "-o", str(tmp_path / "e.json"), "--no-record"]
    result = CliRunner().invoke(app, [*common, "--dtype", "bfloat16"])
    assert result.exit_code == 2 and "--dtype is for --engine vllm" in result.output
    result = CliRunner().invoke(app, [*common, "--engine", "vllm", "--replicas", "2"])
    assert result.exit_code == 2 and "are for --engine ray" in result.output
    result = CliRunner().invoke(app, [*common, "--engine", "onnx"])
    assert result.exit_code == 2 and "local, ray or vllm" in result.output
    try:
        import vllm  # noqa: F401
    except ImportError:  # the project's .venv: the error says where vLLM is
        result = CliRunner().invoke(app, [*common, "--engine", "vllm"])
        assert result.exit_code == 2 and "make vllm-env" in result.output
    assert not (tmp_path / "e.json").exists()


def test_request_vllm_failed_raises_instead_of_answering_empty():
    from types import SimpleNamespace

    from deepsynth.inference.vllm_engine import VLLMOptions, _raise_if_failed

    _raise_if_failed(SimpleNamespace(request_id="r1", outputs=[SimpleNamespace(finish_reason="length")]))
    for reason in ("error", "abort"):
        with pytest.raises(RuntimeError, match=f"finish reason '{reason}'"):
            _raise_if_failed(SimpleNamespace(request_id="r1", outputs=[SimpleNamespace(finish_reason=reason)]))
    with pytest.raises(ValueError, match="structured_backend"):
        VLLMOptions(structured_backend="outlines")


def test_first_difference_names_the_first_differing_token():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    diff = first_difference([1, 2, 3], [1, 5, 3])
    assert (diff.index, diff.hf_token, diff.vllm_token) == (1, 2, 5)
    diff = first_difference([1, 2], [1, 2, 9])  # one answer stopped earlier
    assert (diff.index, diff.hf_token, diff.vllm_token) == (2, None, 9)


def test_export_config_has_vllm_native_layout():
    from deepsynth.models.deepseek_ocr2 import real_config

    native = native_config(real_config().to_dict())
    assert native["architectures"] == ["DeepseekOCR2ForCausalLM"]
    assert {"projector_config", "language_config", "tile_tag", "vision_config"} <= set(native)
    language = native["language_config"]
    assert (language["hidden_size"], language["num_hidden_layers"], language["n_routed_experts"]) == (1280, 12, 64)
    assert language["first_k_dense_replace"] == 1  # the released decoder's first layer is dense
    assert native["projector_config"]["n_embed"] == 1280


def test_export_refuses_tiny_and_patch_readout_models():
    config = json.loads((Path(READER) / "config.json").read_text())
    with pytest.raises(ExportError, match="patch positions"):
        native_config(config)
    config.update(model_type="deepseek_ocr2", vision_readout="queries")
    with pytest.raises(ExportError, match="vision sizes built in"):
        native_config(config)
