"""`deepsynth check-real-size`: the released DeepSeek-OCR-2 / DeepSeek-OCR architectures, exercised offline.

No hub is reachable from the machines this project is tested on, so real weights never load; the
real architecture can still run. The check builds it from its real config
(`deepseek_ocr2.real_config()`, `deepseek_ocr_v1.real_v1_config()`) with random bf16 weights (the
backends' `random-deepseek-ocr-2` / `random-deepseek-ocr` presets) and takes one 1024 px page
through the user's path:

1. the processor in the asked crop mode ("none": one global view, "tiles": the global view plus
   768 px local crops), through the training collator;
2. one LoRA training step with the project's training options (`apply_training_options`: vision
   frozen, LoRA on attention / dense MLP / shared experts, and on the routed experts unless
   `lora_experts` is off);
3. `save_bundle` of the adapters, the trained model dropped, `load_bundle` of the adapter bundle
   (which rebuilds the seeded base) and a comparison of every adapter tensor;
4. a short greedy generation through `LoadedModel.decoder()` (the engine's decoding path).

It reports the page's image tokens next to the features the model produced for it, trainable
parameters by group, seconds per phase, the training step's peak memory and `estimate-memory`'s
figure for the same settings (docs/memory.md compares them). Weights are random: the answer text
means nothing, only that the path runs.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

GiB = 1024**3
# --model name -> (backend preset with random weights, estimate-memory model name)
MODELS = {"deepseek-ocr-2": "random-deepseek-ocr-2", "deepseek-ocr": "random-deepseek-ocr"}
PAGE_TEXT = ("Item 7 has code K49. Item 8 has code K56. The meeting moved to room 12 on Friday.\n" * 12).strip()
INSTRUCTION = "What is the code of item 7?"
ANSWER = "K49"
WEIGHTS_NOTE = "weights are random (real architecture, no hub): answers are meaningless, memory and shapes are real"


# ---- memory readings -------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss() -> int:
    """Resident set size now, in bytes (0 where /proc is missing)."""
    return (_status_kib("VmRSS") or 0) * 1024


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM) at the current RSS (Linux: `5` to clear_refs);
    False where that is not possible (the peak then counts from the process start)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss() -> int:
    """Peak resident set size in bytes: VmHWM (since the last reset), else ru_maxrss (process life)."""
    hwm = _status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def process_peak_rss() -> int:
    """Peak resident set size of the whole process life, in bytes (ru_maxrss)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


# ---- the check ------------------------------------------------------------------------------------
@dataclass
class RealSizeSettings:
    """What the real-size check runs."""

    # "deepseek-ocr-2" or "deepseek-ocr" (v1; one global view per page only).
    model: str = "deepseek-ocr-2"
    # Local crops ("tiles": the global view plus 768 px crops) or one global view ("none").
    crops: bool = False
    # LoRA on the routed experts too (TrainerConfig.lora_experts).
    lora_experts: bool = True
    # LoRA rank (TrainerConfig.lora_rank; alpha is twice the rank as in the recipes).
    lora_rank: int = 16
    # Tokens of the greedy generation after the reload.
    max_new_tokens: int = 4
    # Seed of the random weights (the reload rebuilds the same base from it) and of training.
    seed: int = 0
    # Folder for the adapter bundle; None = a temporary folder, removed afterwards.
    workdir: str | None = None
    # "cpu", or "cuda" on a GPU machine (memory is then the CUDA allocator's peak, not RSS).
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model={self.model!r}: choose one of {sorted(MODELS)}")
        if self.crops and self.model == "deepseek-ocr":
            raise ValueError("crops on: the DeepSeek-OCR v1 port reads one global view per page; use --crops off")
        if not 1 <= self.lora_rank <= 256:
            raise ValueError(f"lora_rank={self.lora_rank} must be in [1, 256]")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r}: choose 'cpu' or 'cuda'")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no CUDA GPU")
        if not 1 <= self.max_new_tokens <= 64:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be in [1, 64]")

    @property
    def crop_mode(self) -> str:
        return "tiles" if self.crops else "none"


def _autocast(device: str):
    return torch.autocast(device, dtype=torch.bfloat16)


def _lora_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if "lora_" in n}


def run_check(settings: RealSizeSettings = RealSizeSettings(),
              clock: Callable[[], float] = time.perf_counter) -> dict:
    """Run the check (see the module doc); returns the report (`format_report` prints it)."""
    preset = MODELS[settings.model]
    report: dict = {"model": settings.model, "preset": preset, "crop_mode": settings.crop_mode,
                    "lora_experts": settings.lora_experts, "lora_rank": settings.lora_rank, "note": WEIGHTS_NOTE,
                    "torch_threads": torch.get_num_threads(), "seconds": {}}
    baseline = current_rss()
    model, processor, spec, backend, page = _build(settings, report, clock)
    model, config, batch, on_device = _collate_page(model, processor, spec, backend, page, settings, report)
    optimizer, loss = _train_step(model, config, on_device, baseline, settings, report, clock)

    # 3. adapters saved as a bundle, the model dropped, the bundle loaded back
    trained = _lora_tensors(model)
    with tempfile.TemporaryDirectory(prefix="real-size-", dir=settings.workdir) as tmp:
        adapter_dir = _save_adapters(Path(tmp), model, processor, spec, config, settings, report, clock)
        # Nothing of the trained model or its step may stay referenced here: the reload's memory is its own.
        del model, optimizer, loss, batch, on_device
        gc.collect()
        reloaded = _reload(adapter_dir, settings, report, clock)
    again = _lora_tensors(reloaded.model)
    report["adapter_tensors"] = len(trained)
    report["adapters_identical"] = trained.keys() == again.keys() and all(
        torch.equal(trained[n], again[n]) for n in trained)
    report["reloaded_crop_mode"] = reloaded.spec.crop_mode
    del trained, again

    _generate(reloaded, page, settings, report, clock)
    report["process_peak_rss_gib"] = process_peak_rss() / GiB
    _compare_with_estimate(report, settings)
    return report


def _build(settings: RealSizeSettings, report: dict, clock: Callable[[], float]):
    """(model with random weights, processor in the asked crop mode, the spec the adapter bundle
    is saved with, the model's backend, the 1024 px page the check reads)."""
    from deepsynth.models.bundle import load_bundle
    from deepsynth.models.registry import backend_of
    from deepsynth.render import RenderConfig, render_text

    start = clock()
    model, processor, spec = load_bundle(report["preset"], seed=settings.seed)
    report["seconds"]["build"] = clock() - start
    report["parameters"] = sum(p.numel() for p in model.parameters())
    report["build_rss_gib"] = current_rss() / GiB
    backend = backend_of(model)
    backend.configure_processor(processor, settings.crop_mode)
    render = RenderConfig.from_preset("large")
    spec = dataclasses.replace(spec, crop_mode=settings.crop_mode, render=asdict(render), base_model=report["preset"],
                               base_seed=settings.seed, default_instruction=INSTRUCTION)
    page = render_text(PAGE_TEXT, render)[0].image
    return model, processor, spec, backend, page


def _collate_page(model, processor, spec, backend, page, settings: RealSizeSettings, report: dict):
    """1. LoRA by the project's training options, the page through the training collator:
    (the model to train, its TrainerConfig, the batch, the batch on the device)."""
    from deepsynth.models.bundle import make_collator
    from deepsynth.training.config import TrainerConfig
    from deepsynth.training.peft_utils import trainable_parameter_report
    from deepsynth.training.trainer import apply_training_options

    config = TrainerConfig(model_name=report["preset"], use_lora=True, lora_experts=settings.lora_experts,
                           lora_rank=settings.lora_rank, lora_alpha=2 * settings.lora_rank,
                           freeze_vision_encoder=True, seed=settings.seed)
    torch.manual_seed(settings.seed)
    model = apply_training_options(model.to(settings.device), config)
    groups = trainable_parameter_report(model)
    report["trainable"] = {"total": groups["trainable"], "percent": groups["percent"],
                           "groups": {g: e for g, e in groups["groups"].items() if e["trainable"]}}
    collator = make_collator(model, processor, spec, max_length=4096)
    batch = collator([{"pages": [page], "instruction": INSTRUCTION, "answer": ANSWER}])
    on_device = {k: v.to(settings.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    report["page_px"] = list(page.size)
    report["image_tokens"] = int((batch["input_ids"] == processor.image_token_id).sum())
    report["image_tokens_formula"] = backend.image_tokens(model.config, *page.size, settings.crop_mode) \
        if backend.image_tokens else None
    report["sequence_tokens"] = int(batch["input_ids"].shape[1])
    return model, config, batch, on_device


def _train_step(model, config, on_device: dict, baseline: int, settings: RealSizeSettings, report: dict,
                clock: Callable[[], float]):
    """2. One training step (forward, backward, AdamW) and its peak memory above the runtime's
    (`baseline`: the RSS before the model was built); returns (optimizer, loss)."""
    from deepsynth.training.trainer import build_optimizer

    optimizer = build_optimizer(model, config)
    model.train()
    gc.collect()
    cuda = settings.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        report["peak_source"] = "torch.cuda.max_memory_allocated during the step"
    else:
        report["peak_source"] = "VmHWM reset before the step" if reset_peak_rss() else "ru_maxrss (process life)"
    start = clock()
    with _autocast(settings.device):  # the recipes' mixed_precision: bf16 (accelerate autocasts the same way)
        loss = model(**on_device).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    report["seconds"]["train_step"] = clock() - start
    if cuda:
        torch.cuda.synchronize()
        step_peak, baseline = torch.cuda.max_memory_allocated(), 0
    else:
        step_peak = peak_rss()
    report["loss"] = float(loss.detach())
    report["runtime_rss_gib"] = baseline / GiB
    report["step_peak_rss_gib"] = step_peak / GiB
    report["measured_gib"] = (step_peak - baseline) / GiB
    if not torch.isfinite(loss):
        raise RuntimeError(f"the training step's loss is {report['loss']}: the real-size path is broken")
    return optimizer, loss


def _save_adapters(folder: Path, model, processor, spec, config, settings: RealSizeSettings, report: dict,
                   clock: Callable[[], float]) -> Path:
    """The trained adapters as a bundle in `folder`/adapter (returned)."""
    from deepsynth.models.bundle import save_bundle
    from deepsynth.models.generate import GenerationSettings

    adapter_dir = folder / "adapter"
    adapter_dir.mkdir()
    start = clock()
    save_bundle(adapter_dir, model, processor, dataclasses.replace(spec, training=asdict(config)),
                generation=GenerationSettings(max_new_tokens=settings.max_new_tokens), adapter_only=True)
    report["seconds"]["save"] = clock() - start
    report["adapter_bytes"] = sum(f.stat().st_size for f in adapter_dir.iterdir())
    return adapter_dir


def _reload(adapter_dir: Path, settings: RealSizeSettings, report: dict, clock: Callable[[], float]):
    """The adapter bundle loaded back (it rebuilds the seeded base), adapters unmerged, on the
    check's device."""
    from deepsynth.models.bundle import load_bundle

    start = clock()
    reloaded = load_bundle(str(adapter_dir), seed=settings.seed, merge_adapters=False)
    reloaded.model.to(settings.device)
    report["seconds"]["reload"] = clock() - start
    return reloaded


def _generate(reloaded, page, settings: RealSizeSettings, report: dict, clock: Callable[[], float]) -> None:
    """4. The reloaded model merged (as `ask` and `serve` load it) and a short greedy generation
    through its decoder."""
    from deepsynth.models.bundle import LoadedModel
    from deepsynth.models.generate import GenerationSettings

    start = clock()
    merged = LoadedModel(reloaded.model.merge_and_unload(), reloaded.processor, reloaded.spec)
    report["seconds"]["merge"] = clock() - start
    start = clock()
    decoder = merged.decoder(GenerationSettings(max_new_tokens=settings.max_new_tokens, no_repeat_ngram_size=0))
    with _autocast(settings.device):
        features = decoder.encode_pages([page])
        report["image_features"] = int(features[0].shape[0])
        rows = decoder.run([[page]], [INSTRUCTION], features=[features] if decoder.encodes_pages else None)
    report["seconds"]["generate"] = clock() - start
    report["generated_tokens"] = rows[0]["new_tokens"]
    report["prompt_image_tokens"] = rows[0]["visual_tokens"]


def _compare_with_estimate(report: dict, settings: RealSizeSettings) -> None:
    """estimate-memory's figure for the same settings and the measured share of it."""
    from deepsynth.models.memory import estimate_memory

    estimate = estimate_memory(report["preset"], lora=True, lora_experts=settings.lora_experts,
                               crops=settings.crops, freeze_vision=True, batch_size=1, precision="bf16",
                               lora_rank=settings.lora_rank, text_tokens=report["sequence_tokens"]
                               - report["image_tokens"])
    report["estimate"] = estimate.to_dict()
    report["estimate_gib"] = estimate.total_gib
    report["measured_over_estimate"] = report["measured_gib"] / estimate.total_gib


def check_failures(report: dict) -> list[str]:
    """What the report shows to be wrong (empty when the real-size path holds)."""
    problems = []
    if report["image_tokens"] != report["image_features"]:
        problems.append(f"image tokens {report['image_tokens']} != features {report['image_features']}")
    if report["image_tokens_formula"] is not None and report["image_tokens_formula"] != report["image_tokens"]:
        problems.append(f"the family's image-token formula says {report['image_tokens_formula']}, the processor "
                        f"wrote {report['image_tokens']}")
    if report["prompt_image_tokens"] != report["image_tokens"]:
        problems.append(f"generation prompt holds {report['prompt_image_tokens']} image tokens, training "
                        f"{report['image_tokens']}")
    routed = report["trainable"]["groups"].get("routed_experts", {}).get("lora", 0)
    if report["lora_experts"] and routed == 0:
        problems.append("lora_experts is on but no routed-expert LoRA parameter trains")
    if not report["lora_experts"] and routed:
        problems.append(f"lora_experts is off but {routed} routed-expert LoRA parameters train")
    if not report["adapters_identical"]:
        problems.append("adapters reloaded from the bundle differ from the trained ones")
    if report["reloaded_crop_mode"] != report["crop_mode"]:
        problems.append(f"bundle reloaded with crop mode {report['reloaded_crop_mode']}, trained with "
                        f"{report['crop_mode']}")
    if report["generated_tokens"] < 1:
        problems.append("the decoder generated no token")
    return problems


def format_report(report: dict) -> str:
    """The report as a short table."""
    s = report["seconds"]
    lines = [
        f"real-size check: {report['model']} ({report['parameters']:,} parameters, {report['preset']}), "
        f"crops {report['crop_mode']}, LoRA r={report['lora_rank']} on "
        + ("attention, dense MLP, shared and routed experts" if report["lora_experts"]
           else "attention, dense MLP, shared experts (routed experts left out)"),
        f"note: {report['note']}",
        f"page {report['page_px'][0]}x{report['page_px'][1]} px: {report['image_tokens']} image tokens "
        f"(formula {report['image_tokens_formula']}), {report['image_features']} image features; "
        f"{report['sequence_tokens']} tokens per example",
        f"trainable: {report['trainable']['total']:,} ({report['trainable']['percent']:.2f}%)",
    ]
    for group, entry in report["trainable"]["groups"].items():
        lines.append(f"  {group:<15} {entry['trainable']:>13,} (LoRA {entry['lora']:,})")
    lines += [
        f"seconds: build {s['build']:.1f}, train step {s['train_step']:.1f}, save {s['save']:.1f}, "
        f"reload {s['reload']:.1f}, merge {s['merge']:.1f}, generate {report['generated_tokens']} tokens {s['generate']:.1f} "
        f"({report['torch_threads']} threads)",
        f"adapters: {report['adapter_tensors']} tensors, {report['adapter_bytes'] / 2**20:.0f} MiB, reloaded "
        + ("identical" if report["adapters_identical"] else "DIFFERENT"),
        f"memory: runtime {report['runtime_rss_gib']:.2f} GiB, step peak {report['step_peak_rss_gib']:.2f} GiB "
        f"({report['peak_source']}); measured (peak - runtime) {report['measured_gib']:.2f} GiB, "
        f"estimate-memory {report['estimate_gib']:.2f} GiB, ratio {report['measured_over_estimate']:.2f}; "
        f"process peak {report['process_peak_rss_gib']:.2f} GiB",
    ]
    problems = check_failures(report)
    lines.append("result: " + ("ok" if not problems else "FAILED: " + "; ".join(problems)))
    return "\n".join(lines)
