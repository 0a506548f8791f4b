"""``deepsynth push DIR --repo ID``: publish a model bundle on the hub with a model card.

DIR is any bundle the project writes: full weights (a trainer's `final/`, a checkpoint of a full
run), or LoRA adapters (`adapter/`, a checkpoint of a LoRA run), pushed as adapters or, with
`--merge`, as the merged full model. The upload always holds the bundle (deepsynth.json,
generation_config.json), the processor, the text-encoder projection when the model has one, and a
model card stating base model, render config, instruction channel, training data and evaluation
results. The token comes from `--token`, HF_TOKEN or the stored login and is never printed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import typer

from deepsynth.models.bundle import BUNDLE_FILE, ModelSpec, load_bundle, read_spec, save_bundle

logger = logging.getLogger(__name__)

# Files of a bundle folder that are not part of the model (trainer state of checkpoints).
_NOT_PUBLISHED = ("state", "trainer_state.json")


def resolve_token(token: str | None = None) -> str:
    """`token`, else HF_TOKEN / the stored `hf auth login` token. The token is never logged."""
    from huggingface_hub import get_token

    token = token or os.environ.get("HF_TOKEN") or get_token()
    if not token:
        raise RuntimeError("no Hugging Face token: pass --token, set HF_TOKEN, or run `hf auth login`")
    return token


def model_card(spec: ModelSpec, repo_id: str) -> str:
    """README.md of a pushed bundle: what the model reads, how it is prompted, what it was trained
    on and how it scored."""
    render = spec.render
    channel = spec.instruction_channel
    if channel.get("kind") == "text-encoder":
        how = (f"through the text encoder `{channel['model']}` "
               f"({'fine-tuned, weights included' if channel.get('weights') else 'frozen, loaded by id'}), "
               f"projected to the decoder width (`{channel.get('projection') or 'no projection'}`)")
    else:
        how = f"as prompt text ({spec.prompt_layout} layout)"
    base = spec.base_model or "unknown"
    lines = [
        "---", "library_name: " + ("peft" if spec.weights == "adapter" else "transformers"),
        f"base_model: {base}" if spec.base_model and "/" in base else "base_model: null",
        "tags: [deepsynth, document-vqa, image-text-to-text]", "---", "",
        f"# {repo_id}", "",
        f"{'LoRA adapters for' if spec.weights == 'adapter' else 'A fine-tune of'} `{base}` "
        f"(backend `{spec.backend}`) trained with DeepSynth to follow instructions about rendered document pages.",
        "", "## What it reads", "",
        f"- Pages: {render['page_width']}x{render['page_height']} px, font {render['font']} {render['font_size']} px"
        f"{' bold' if render.get('bold') else ''}, margin {render['margin']} px, line spacing {render['line_spacing']}"
        f"; crop mode: {spec.crop_mode or 'as the processor was saved'}.",
        f"- Instruction: {how}; default instruction: {spec.default_instruction!r}.",
        "- Decoding defaults and loop guards: `generation_config.json` and `deepsynth.json`.", "",
        "## Training", "",
        f"- Data: {json.dumps(spec.training_data) if spec.training_data else 'not recorded'}",
    ]
    if spec.training:
        keys = ("learning_rate", "batch_size", "max_steps", "num_epochs", "use_lora", "lora_rank", "lora_experts",
                "use_text_encoder", "render_preset", "seed")
        lines.append("- Config: " + ", ".join(f"{k}={spec.training[k]}" for k in keys if k in spec.training))
    lines += ["", "## Evaluation", ""]
    if spec.evaluation:
        for name, result in spec.evaluation.items():
            lines.append(f"- `{name}`: `{json.dumps(result, sort_keys=True)}`")
    else:
        lines.append("No evaluation recorded.")
    lines += ["", "## Use", "", "```bash", "pip install deepsynth",
              f"deepsynth ask report.pdf -i \"What was Q3 revenue?\" -m {repo_id}", "```", ""]
    return "\n".join(lines)


def stage_bundle(source: str | Path, out: Path, merge: bool = False) -> ModelSpec:
    """Copy (or, with `merge`, merge and re-save) the bundle at `source` into the empty folder `out`."""
    source = Path(source)
    spec = read_spec(source)
    if spec is None:
        raise ValueError(f"{source} has no {BUNDLE_FILE}: not a DeepSynth model bundle")
    if merge:
        if spec.weights != "adapter":
            raise ValueError(f"--merge: {source} holds full weights already (no adapters to merge)")
        loaded = load_bundle(str(source))
        return save_bundle(out, loaded.model, loaded.processor, loaded.spec)
    for item in source.iterdir():
        if item.name in _NOT_PUBLISHED or item.name.startswith("."):
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, out / item.name)
    return spec


def push_bundle(source: str | Path, repo_id: str, merge: bool = False, private: bool = False,
                token: str | None = None) -> str:
    """Upload the bundle at `source` (see the module docstring); returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=resolve_token(token))
    with tempfile.TemporaryDirectory(prefix="deepsynth-push-") as tmp:
        out = Path(tmp)
        spec = stage_bundle(source, out, merge)
        (out / "README.md").write_text(model_card(spec, repo_id), encoding="utf-8")
        files = sorted(p.name for p in out.iterdir())
        url = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(folder_path=str(out), repo_id=repo_id, repo_type="model",
                          commit_message=f"Upload DeepSynth model ({spec.weights})")
    logger.info("pushed %s to %s (%s)", source, repo_id, ", ".join(files))
    return str(url)


def push_command(
    directory: Path = typer.Argument(..., exists=True, file_okay=False, help="A model bundle folder."),
    repo: str = typer.Option(..., "--repo", help="Hub repository id, e.g. me/deepsynth-squad."),
    merge: bool = typer.Option(False, help="Merge LoRA adapters into the base and push the full model."),
    private: bool = typer.Option(False, help="Create the repository as private."),
    token: Optional[str] = typer.Option(None, help="Hub token (default: HF_TOKEN or the stored login)."),
) -> None:
    """Push a model bundle (full model, merged LoRA model or adapters) with its model card."""
    try:
        url = push_bundle(directory, repo, merge=merge, private=private, token=token)
    except (ValueError, RuntimeError) as exc:
        raise typer.BadParameter(str(exc).replace(token, "***") if token else str(exc)) from None
    typer.echo(url)


def register(app: typer.Typer) -> None:
    app.command("push")(push_command)
