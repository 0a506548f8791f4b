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

from deepsynth.models.registry import resolve
from deepsynth.vllm.export import ExportError, native_config
from deepsynth.vllm.parity import DEFAULT_EXAMPLES, first_difference, vllm_python

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
PYTHON = vllm_python()
needs_vllm = pytest.mark.skipif(PYTHON is None, reason="the vLLM environment is absent: run `make vllm-env` "
                                                       "(makes .venv-vllm) or set DEEPSYNTH_VLLM_PYTHON")
READER = resolve("form-reader")
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
    assert out["is_engine"]  # the server's Engine interface, without subclassing the HF engine
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
    # answers otherwise. This is what the readout step of deepsynth.vllm prevents.
    differ = sum(a != h["answer"] for a, h in zip(out["stock_readout_answers"], hf))
    assert differ >= len(hf) // 2, out["stock_readout_answers"]


@needs_vllm
def test_lora_adapter_served_unmerged_gives_merged_answers(tmp_path):
    from deepsynth.data.synthetic import SyntheticConfig, generate
    from deepsynth.inference.engine import InstructionEngine
    from deepsynth.training.config import TrainerConfig
    from deepsynth.training.trainer import Trainer

    config = TrainerConfig(model_name="form-reader", output_dir=str(tmp_path / "run"), batch_size=4, max_steps=4,
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
    run_vllm_side(["-m", "deepsynth.vllm.parity", str(tmp_path / "job.json"), str(tmp_path / "out.json")])
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["describe"]["lora"] == str(adapter)  # served as a LoRA module, not merged weights
    for mine, theirs in zip(out["answers"], merged):
        assert {k: mine[k] for k in COMPARED} == {k: theirs[k] for k in COMPARED}
    # the adapter matters: the trained answers are not the base model's
    assert [m["answer"] for m in merged] != base


# The vLLM side of the next test: the prompt ids vLLM reports for the engine's requests, and the answers.
PLAIN_SIDE = """
import json, sys
from deepsynth.vllm.driver import wait
from deepsynth.vllm.engine import VLLMEngine, VLLMOptions
job = json.load(open(sys.argv[1]))
with VLLMEngine(job["model"], options=VLLMOptions(dtype="float32", kv_cache_gib=1, max_num_seqs=4)) as engine:
    docs = [engine.prepare(d) for d in job["documents"]]
    requests = engine._submit(docs, job["instructions"], engine.generation, None, None)
    ids = [list(wait(r)[0].prompt_token_ids) for r in requests]
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

    reader = load_bundle("form-reader")
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
    proc = subprocess.run([sys.executable, "-m", "deepsynth.cli", "check-parity", "form-reader", "--max-new-tokens",
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
    common = [str(records), "-m", "form-reader", "--no-record", "--max-new-tokens", "24"]
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
    common = ["evaluate", str(records), "-m", "form-reader", "-o", str(tmp_path / "e.json"), "--no-record"]
    result = CliRunner().invoke(app, [*common, "--dtype", "bfloat16"])
    assert result.exit_code == 2 and "--dtype is for --engine vllm" in result.output
    result = CliRunner().invoke(app, [*common, "--engine", "vllm", "--replicas", "2"])
    assert result.exit_code == 2 and "are for --engine ray" in result.output
    result = CliRunner().invoke(app, [*common, "--engine", "onnx"])
    assert result.exit_code == 2 and "choose one of hf, vllm, ray" in result.output
    try:
        import vllm  # noqa: F401
    except ImportError:  # the project's .venv: the error (one line, exit code 1) says where vLLM is
        result = CliRunner().invoke(app, [*common, "--engine", "vllm"])
        assert result.exit_code == 1 and "make vllm-env" in result.output
    assert not (tmp_path / "e.json").exists()


def test_request_vllm_failed_raises_instead_of_answering_empty():
    from types import SimpleNamespace

    from deepsynth.vllm.driver import raise_if_failed
    from deepsynth.vllm.engine import VLLMOptions

    raise_if_failed(SimpleNamespace(request_id="r1", outputs=[SimpleNamespace(finish_reason="length")]))
    for reason in ("error", "abort"):
        with pytest.raises(RuntimeError, match=f"finish reason '{reason}'"):
            raise_if_failed(SimpleNamespace(request_id="r1", outputs=[SimpleNamespace(finish_reason=reason)]))
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


# ---- pages as the HF engine draws them; DeepSeek's own checkpoint layout -------------------------
def checkpoint_layouts():
    """tests/models/test_checkpoint_layouts.py (its writers of tiny official-layout checkpoints)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("checkpoint_layouts", ROOT / "tests/models/test_checkpoint_layouts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def text_page(text: str, width: int, height: int):
    """A non-square page drawn from text (the engines' renderer draws square pages only for presets)."""
    from PIL import Image, ImageDraw

    page = Image.new("RGB", (width, height), "white")
    ImageDraw.Draw(page).multiline_text((6, 6), text, fill="black", spacing=6)
    return page


NON_SQUARE = ((200, 300), (300, 180))


@pytest.fixture(scope="module")
def official_ocr2(tmp_path_factory):
    """A tiny DeepSeek-OCR-2 checkpoint in DeepSeek's own repository layout (768 px view)."""
    layouts = checkpoint_layouts()
    model, processor = layouts.tiny_ocr2(seed=6)
    directory = tmp_path_factory.mktemp("official") / "ocr2-official"
    layouts.write_ocr2_official(model, processor, directory)
    return directory


@pytest.fixture()
def page_files(tmp_path):
    files = []
    for (width, height), text in zip(NON_SQUARE, ("alpha: 07\nbravo: 42", "name: Ada\ncity: Oslo")):
        path = tmp_path / f"page-{width}x{height}.png"
        text_page(text, width, height).save(path)
        files.append(path)
    return files


# The vLLM side of the pixel test: what vLLM's processor (built from the checkpoint, with the engine's
# mm_processor_kwargs) sends the model for each page, and what transformers' stock processor sends.
PIXEL_SIDE = """
import json, sys, torch
from PIL import Image
from deepsynth.vllm.checkpoint import resolve_model, vllm_hf_overrides, vllm_processor_kwargs
from transformers import AutoConfig
from transformers.models.deepseek_ocr2.image_processing_pil_deepseek_ocr2 import DeepseekOcr2ImageProcessorPil
from vllm.config import ModelConfig
from vllm.multimodal import MULTIMODAL_REGISTRY
job = json.load(open(sys.argv[1]))
found = resolve_model(job["model"])
kwargs = vllm_processor_kwargs(found.processor)
config = ModelConfig(model=found.path, tokenizer=found.path, model_impl="transformers", dtype="float32",
                     mm_processor_kwargs=kwargs, hf_overrides=vllm_hf_overrides(AutoConfig.from_pretrained(found.path)))
info = MULTIMODAL_REGISTRY.create_processor(config).info
out = {"vllm": [], "stock": [], "kwargs": kwargs}
for page in job["pages"]:
    image = Image.open(page).convert("RGB")
    hf = info.ctx.call_hf_processor(info.get_hf_processor(**kwargs),
                                    {"text": found.processor.image_token, "images": [image]}, kwargs)
    out["vllm"].append(hf["pixel_values"])
    stock = DeepseekOcr2ImageProcessorPil(**info.get_hf_processor().image_processor.to_dict())
    out["stock"].append(stock(images=[image], return_tensors="pt", **kwargs)["pixel_values"])
torch.save(out, sys.argv[2])
"""


@needs_vllm
def test_vllm_processor_sends_the_hf_engines_pixels_for_non_square_pages(tmp_path, page_files, official_ocr2,
                                                                         monkeypatch):
    """vLLM's own processor (built from the checkpoint in vLLM's environment, with the engine's
    settings) draws non-square pages pixel for pixel as the HF engine's processor: the tiny reader
    (crop mode "none") stretches them to its 256 px view, where transformers' stock processor pads;
    DeepSeek's layout keeps its saved crop setting, under which the 768 px global view is padded."""
    import torch
    from PIL import Image

    from deepsynth.inference.engine import InstructionEngine

    monkeypatch.setenv("DEEPSYNTH_CACHE", str(tmp_path / "cache"))
    for model in (READER, str(official_ocr2)):
        (tmp_path / "job.json").write_text(json.dumps({"model": model, "pages": [str(p) for p in page_files]}))
        run_vllm_side(["-c", PIXEL_SIDE, str(tmp_path / "job.json"), str(tmp_path / "pixels.pt")])
        out = torch.load(tmp_path / "pixels.pt")
        engine = InstructionEngine(model)
        for path, vllm_pixels, stock in zip(page_files, out["vllm"], out["stock"]):
            page = Image.open(path).convert("RGB")
            ours = engine.collator.prompt_batch([[page]], ["x"])["pixel_values"]
            assert ours.shape == vllm_pixels.shape and torch.equal(ours, vllm_pixels), (model, path.name)
            if not out["kwargs"]["crop_to_patches"]:  # stretched, where the stock processor pads
                assert not torch.equal(stock, vllm_pixels), (model, path.name)
        assert out["kwargs"]["crop_to_patches"] == (model != READER)


# The vLLM side of the next test: answers for page images, and the error for a page cut into crops.
PAGES_SIDE = """
import json, sys
from PIL import Image
from deepsynth.inference.documents import DocumentError
from deepsynth.vllm.engine import VLLMEngine, VLLMOptions
job = json.load(open(sys.argv[1]))
out = {}
with VLLMEngine(job["model"], options=VLLMOptions(dtype="float32", kv_cache_gib=1, max_num_seqs=4)) as engine:
    docs = [[Image.open(p).convert("RGB") for p in pages] for pages in job["pages"]]
    out["answers"] = [a.to_dict() for a in engine.ask_batch(docs, job["instructions"],
                                                             max_new_tokens=job["max_new_tokens"])]
    out["crop_mode"] = engine.spec.crop_mode
    try:
        engine.ask_batch([[Image.new("RGB", (1000, 800), "white")]], ["read"])
        out["large_page"] = None
    except DocumentError as exc:
        out["large_page"] = str(exc)
json.dump(out, open(sys.argv[2], "w"))
"""


def _parity_on_pages(model: str, page_files, instructions, tmp_path, env: dict) -> dict:
    examples = tmp_path / "examples.jsonl"
    examples.write_text("".join(json.dumps({"pages": [p.name], "instruction": i}) + "\n"
                                for p, i in zip(page_files, instructions)))
    report = tmp_path / "parity.json"
    proc = subprocess.run([sys.executable, "-m", "deepsynth.cli", "check-parity", model, "--examples", str(examples),
                           "--max-new-tokens", "24", "--out", str(report)], capture_output=True, text=True,
                          env={**env, "DEEPSYNTH_VLLM_PYTHON": PYTHON, "VLLM_CPU_KVCACHE_SPACE": "1"}, timeout=1200)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    return json.loads(report.read_text())


@needs_vllm
@pytest.mark.parametrize("which", ["form-reader", "ocr2-official"])
def test_non_square_pages_answer_as_in_the_hf_engine(which, tmp_path, page_files, official_ocr2, monkeypatch):
    """Non-square pages (200x300, 300x180) through both engines in float32: the same answers, stop
    reasons and prompt token counts, and check-parity finds no differing token. "ocr2-official" is
    DeepSeek's own repository layout, which the vLLM engine converts as load_bundle does; the
    processor it saves keeps the class's crop setting, so a page larger than a tile (768 px) would be
    cut into crops, which the vLLM engine refuses with the reason."""
    import torch

    from PIL import Image

    from deepsynth.inference.engine import InstructionEngine

    monkeypatch.setenv("DEEPSYNTH_CACHE", str(tmp_path / "cache"))
    model = READER if which == "form-reader" else str(official_ocr2)
    instructions = ["bravo", "city"]
    docs = [[Image.open(p).convert("RGB")] for p in page_files]
    hf_engine = InstructionEngine(model, dtype=torch.float32)
    hf = [a.to_dict() for a in hf_engine.ask_batch(docs, instructions, max_new_tokens=24)]
    assert all(a["new_tokens"] > 0 and a["prompt_tokens"] > a["visual_tokens"] > 0 for a in hf)
    job = {"model": model, "pages": [[str(p)] for p in page_files], "instructions": instructions,
           "max_new_tokens": 24}
    (tmp_path / "job.json").write_text(json.dumps(job))
    run_vllm_side(["-c", PAGES_SIDE, str(tmp_path / "job.json"), str(tmp_path / "out.json")])
    out = json.loads((tmp_path / "out.json").read_text())
    for mine, theirs in zip(out["answers"], hf):
        assert {k: mine[k] for k in COMPARED} == {k: theirs[k] for k in COMPARED}
    if which == "ocr2-official":
        assert out["crop_mode"] is None  # as saved: crops for pages larger than a tile
        assert "local crops" in out["large_page"] and "HF engine" in out["large_page"], out["large_page"]
    else:
        assert out["large_page"] is None  # crop mode "none": one view, any page size
    report = _parity_on_pages(model, page_files, instructions, tmp_path, dict(os.environ))
    assert report["identical"] == len(report["answers"]) == len(page_files), report["answers"]
    assert all(a["hf"]["tokens"] > 0 for a in report["answers"])


@needs_vllm
def test_v1_checkpoints_are_refused_with_the_engine_to_use(tmp_path, monkeypatch):
    layouts = checkpoint_layouts()
    from deepsynth.models import deepseek_ocr_v1 as v1

    model, processor = v1.build_tiny_v1(seed=5)
    layouts.write_v1(model, processor, tmp_path / "v1")
    monkeypatch.setenv("DEEPSYNTH_CACHE", str(tmp_path / "cache"))
    proc = subprocess.run([PYTHON, "-c", "import sys\nfrom deepsynth.vllm.checkpoint import vllm_checkpoint\n"
                           "vllm_checkpoint(sys.argv[1])", str(tmp_path / "v1")], capture_output=True, text=True,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}, timeout=600, cwd=ROOT)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "DeepSeek-OCR v1 checkpoints are not served by the vLLM engine" in last and "--engine hf" in last
