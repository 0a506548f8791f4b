"""`TrainerConfig`: every training setting in one dataclass, loadable from a YAML recipe."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

MIXED_PRECISION = ("no", "fp16", "bf16")
SCHEDULERS = ("constant", "linear", "cosine")


@dataclass
class TrainerConfig:
    # Model: a preset ("tiny"), a shipped checkpoint ("tiny-reader"), alias ("deepseek-ocr-2"), hub id or local directory.
    model_name: str = "tiny-reader"
    # Run directory: checkpoints, metrics.jsonl, loss curve, final model.
    output_dir: str = "runs/train"
    # Examples per device per step (before gradient accumulation).
    batch_size: int = 8
    # Passes over the training data; ignored when max_steps is set.
    num_epochs: int = 1
    # Optimizer steps to run; None = num_epochs worth.
    max_steps: int | None = None
    # Wall-clock budget in minutes; training stops (and saves) when it is spent. None = no limit.
    # Without max_steps (and schedule_steps), the linear/cosine decay runs over this budget (elapsed
    # share of it, by the trainer's clock).
    max_minutes: float | None = None
    # Steps the warm-up + linear/cosine decay span; None = the run's length (max_steps or num_epochs,
    # else the max_minutes budget). Set it to keep a fixed schedule in a run that may stop earlier
    # (the reader's time-budgeted phases).
    schedule_steps: int | None = None
    # Peak learning rate of AdamW.
    learning_rate: float = 2e-4
    # Final learning rate of the linear/cosine decay, as a fraction of learning_rate.
    min_lr_ratio: float = 0.1
    # AdamW weight decay.
    weight_decay: float = 0.0
    # Linear warm-up steps.
    warmup_steps: int = 0
    # Learning-rate schedule after warm-up: constant, linear or cosine.
    lr_scheduler: str = "cosine"
    # Micro-batches accumulated per optimizer step.
    gradient_accumulation_steps: int = 1
    # Gradient clipping norm (0 = off).
    max_grad_norm: float = 1.0
    # "no", "fp16" or "bf16" (accelerate's autocast).
    mixed_precision: str = "no"
    # Seed for weights of fresh models, data order and sampling.
    seed: int = 42
    # Keep the vision tower (SAM + vision encoder) frozen; the projector and decoder train.
    freeze_vision_encoder: bool = False
    # Train LoRA adapters (peft) on the decoder instead of all weights.
    use_lora: bool = False
    # LoRA rank r.
    lora_rank: int = 16
    # LoRA scaling alpha.
    lora_alpha: int = 32
    # LoRA dropout.
    lora_dropout: float = 0.05
    # LoRA on the routed experts of MoE decoders too (DeepSeek-OCR-2 / v1: fused 3-D expert parameters,
    # reached through peft `target_parameters`; most of the adapter parameters, docs/memory.md).
    # False: attention, dense MLP and shared experts only. No effect on dense decoders.
    lora_experts: bool = True
    # QLoRA: LoRA adapters on a 4-bit (bitsandbytes NF4) decoder; needs use_lora and a CUDA GPU.
    use_qlora: bool = False
    # Recompute activations in the backward pass: less memory, about 30% more compute.
    gradient_checkpointing: bool = False
    # Feed the instruction through a separate text encoder as soft-prompt embeddings.
    use_text_encoder: bool = False
    # Hub id or directory of that text encoder; None with use_text_encoder = the documented default,
    # deepsynth.models.text_encoder.DEFAULT_TEXT_ENCODER (Qwen/Qwen2.5-7B-Instruct).
    text_encoder_model: str | None = None
    # Fine-tune the text encoder too (otherwise frozen).
    text_encoder_trainable: bool = False
    # Force a learned projection even when encoder and decoder widths match.
    use_text_projection: bool = False
    # Learning rate of the text-encoder projection (new, randomly initialised weights); None =
    # learning_rate. In the tiny demo 10x the model's rate did worse (EM 0.265 against 0.385).
    projection_learning_rate: float | None = None
    # Instruction used for examples whose instruction is empty.
    instruction_prompt: str = "Answer the question about the document."
    # Render preset for documents given as text (must match what the model reads).
    render_preset: str = "tiny"
    # Prompt layout the run trains and writes ("plain", "raw", "chat-template"); None = the base's (its
    # bundle's; for a preset or a checkpoint without a bundle, its backend's: "plain" for DeepSeek).
    prompt_layout: str | None = None
    # Longest token sequence (image tokens included); longer examples raise an error.
    max_length: int = 1024
    # Evaluate every N optimizer steps (0 = only at the end).
    eval_interval: int = 0
    # Number of eval examples used at each periodic evaluation (0 = all).
    eval_samples: int = 0
    # Max tokens generated per answer during evaluation; None = the model's decoding default
    # (what `ask` and `serve` use), so that reported scores are scores of served answers.
    eval_max_new_tokens: int | None = None
    # Save a checkpoint every N optimizer steps (0 = only at the end).
    save_interval: int = 0
    # Checkpoints kept on disk (oldest deleted first).
    keep_checkpoints: int = 2
    # Log loss and learning rate every N optimizer steps.
    log_interval: int = 10
    # Checkpoint directory to resume from ("latest" = newest in output_dir).
    resume_from_checkpoint: str | None = None
    # accelerate trackers to log to ("tensorboard", "wandb", ...), used when installed.
    report_to: list[str] = field(default_factory=list)
    # DataLoader worker processes.
    num_workers: int = 0

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, limit: str) -> None:
            if not ok:
                raise ValueError(f"TrainerConfig.{name}={getattr(self, name)!r} is invalid: must be {limit}")

        check("batch_size", self.batch_size >= 1, ">= 1")
        check("num_epochs", self.num_epochs >= 1, ">= 1")
        check("max_steps", self.max_steps is None or self.max_steps >= 1, ">= 1 or None")
        check("max_minutes", self.max_minutes is None or self.max_minutes > 0, "> 0 or None")
        check("schedule_steps", self.schedule_steps is None or self.schedule_steps >= 1, ">= 1 or None")
        check("learning_rate", 0 < self.learning_rate < 1, "in (0, 1)")
        check("projection_learning_rate",
              self.projection_learning_rate is None or 0 < self.projection_learning_rate < 1, "in (0, 1) or None")
        check("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]")
        check("warmup_steps", self.warmup_steps >= 0, ">= 0")
        check("lr_scheduler", self.lr_scheduler in SCHEDULERS, f"one of {SCHEDULERS}")
        check("gradient_accumulation_steps", self.gradient_accumulation_steps >= 1, ">= 1")
        check("max_grad_norm", self.max_grad_norm >= 0, ">= 0")
        check("mixed_precision", self.mixed_precision in MIXED_PRECISION, f"one of {MIXED_PRECISION}")
        check("lora_rank", self.lora_rank >= 1, ">= 1")
        check("lora_alpha", self.lora_alpha >= 1, ">= 1")
        check("lora_dropout", 0 <= self.lora_dropout < 1, "in [0, 1)")
        check("use_qlora", not self.use_qlora or self.use_lora,
              "false unless use_lora is true (QLoRA trains LoRA adapters on a 4-bit base)")
        if self.use_text_encoder and self.text_encoder_model is None:
            from deepsynth.models.text_encoder import DEFAULT_TEXT_ENCODER

            self.text_encoder_model = DEFAULT_TEXT_ENCODER
        check("text_encoder_model", not self.use_text_encoder or bool(self.text_encoder_model),
              "a hub id or directory (or None for the default encoder) when use_text_encoder is true")
        check("max_length", self.max_length >= 16, ">= 16")
        from deepsynth.models.bundle import PROMPT_LAYOUTS

        check("prompt_layout", self.prompt_layout is None or self.prompt_layout in PROMPT_LAYOUTS,
              f"None or one of {sorted(PROMPT_LAYOUTS)}")
        for name in ("eval_interval", "eval_samples", "save_interval", "num_workers"):
            check(name, getattr(self, name) >= 0, ">= 0")
        check("keep_checkpoints", self.keep_checkpoints >= 1, ">= 1")
        check("log_interval", self.log_interval >= 1, ">= 1")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> "TrainerConfig":
        """Load a recipe; unknown keys are an error (a typo must not be silently ignored)."""
        data = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: a recipe must be a mapping of TrainerConfig fields")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown TrainerConfig fields {unknown}")
        return cls(**{**data, **overrides})

    def to_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(asdict(self), sort_keys=False))
