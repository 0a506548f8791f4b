"""The path a user walks, end to end on local fixtures, through the CLI:

prepare (SQuAD- and CNN/DM-shaped files, rendered at a non-tiny preset) -> train a tiny model from
the prepared folders with a recipe at that preset -> evaluate (EM/F1, and ROUGE on summaries) ->
ask and serve with no preset or decoding flags (they read the model's bundle, report its render
config, and answer an eval example exactly as `evaluate` recorded) -> push (hub mocked).
"""

import json
from pathlib import Path

import huggingface_hub
import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from deepsynth.cli import app
from deepsynth.render import RenderConfig

FIX = Path(__file__).parent / "data" / "fixtures"
PRESET = "small"


def run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("user-path")
    cache = str(root / "hf-cache")
    for name, source in (("squad", "squad_v2.jsonl"), ("cnndm", "cnn_dailymail.jsonl")):
        run("prepare", str(FIX / source), "--out", str(root / name), "--render", "--preset", PRESET,
            "--cache-dir", cache)
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model_name": "tiny", "render_preset": PRESET, "batch_size": 2, "max_steps": 3,
                                      "learning_rate": 1e-3, "seed": 7, "output_dir": str(root / "run"),
                                      "instruction_prompt": "Answer the question."}))
    run("train", str(recipe), "--train", str(root / "squad"), "--eval", str(root / "squad"))
    return root


def test_the_bundle_states_the_pages_the_model_was_trained_on(trained):
    spec = json.loads((trained / "run" / "final" / "deepsynth.json").read_text())
    assert RenderConfig(**spec["render"]) == RenderConfig.from_preset(PRESET)
    assert spec["training_data"]["pages"] == "prepared" and spec["training"]["max_steps"] == 3
    assert "eval" in spec["evaluation"]


def test_evaluate_ask_and_serve_give_the_same_answers_from_the_bundle(trained):
    model = str(trained / "run" / "final")
    run("evaluate", str(trained / "squad"), "-m", model, "-o", str(trained / "eval-squad.json"))
    squad = json.loads((trained / "eval-squad.json").read_text())
    assert {"em", "f1"} <= set(squad["scores"]) and "rouge1" not in squad["scores"]
    run("evaluate", str(trained / "cnndm"), "-m", model, "-o", str(trained / "eval-cnndm.json"))
    cnndm = json.loads((trained / "eval-cnndm.json").read_text())
    assert {"rouge1", "rouge2", "rougeL"} <= set(cnndm["scores"])
    assert {"rouge1", "rouge2", "rougeL"} <= set(cnndm["scores_no_instruction"])
    recorded = json.loads((Path(model) / "deepsynth.json").read_text())["evaluation"]
    assert {"squad", "cnndm"} <= set(recorded)

    # One eval example, asked as a plain text file with no flags.
    record = json.loads((FIX / "squad_v2.jsonl").read_text().splitlines()[0])
    prediction = next(p for p in squad["predictions"] if p["instruction"] == record["question"])
    doc = trained / "context.txt"
    doc.write_text(record["context"], encoding="utf-8")
    answer = json.loads(run("ask", str(doc), "-i", record["question"], "-m", model, "--json"))
    assert RenderConfig(**answer["served_with"]["render"]) == RenderConfig.from_preset(PRESET)
    assert answer["answer"] == prediction["prediction"]

    from deepsynth.serve.cli import build_app

    with TestClient(build_app(model)) as client:
        response = client.post("/api/inference/instruct", json={"text": record["context"],
                                                               "instruction": record["question"]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert RenderConfig(**body["render"]) == RenderConfig.from_preset(PRESET)
    assert body["answer"] == prediction["prediction"]


def test_push_uploads_the_bundle_and_a_card(trained, monkeypatch):
    uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, **kwargs):
        uploaded.update({p.name: p.read_bytes() for p in Path(folder_path).iterdir() if p.is_file()})

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token_value")
    out = run("push", str(trained / "run" / "final"), "--repo", "me/tiny-squad")
    assert "hf_secret_token_value" not in out
    assert {"deepsynth.json", "generation_config.json", "config.json", "model.safetensors", "README.md"} <= set(uploaded)
    card = uploaded["README.md"].decode()
    for fact in ("base", "512x512 px", "prompt text", "Data:", "eval"):
        assert fact in card, fact
