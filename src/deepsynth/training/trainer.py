"""One trainer for every backbone and method: setup -> fit -> validate, on accelerate.

Full fine-tuning, frozen vision and LoRA are options of the same loop. Each checkpoint is a
`save_pretrained` directory (so evaluation and serving load it like any model) plus accelerate's
state (optimizer, scheduler, RNG) and `trainer_state.json` (step, epoch, position in the epoch),
written to a temporary directory and renamed into place, so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from deepsynth.data.instruction_dataset import InstructionDataset
from deepsynth.data.schema import InstructionExample
from deepsynth.evaluation.run import evaluate_examples
from deepsynth.models import Collator, load_model
from deepsynth.models.generate import GenerationSettings
from deepsynth.models.text_encoder import SoftPromptModel, TextEncoderModule
from deepsynth.render import RenderConfig
from deepsynth.training import peft_utils
from deepsynth.training.config import TrainerConfig

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; training stopped and the last good checkpoint was kept."""


class EpochSampler(Sampler[int]):
    """Shuffles with a permutation derived from (seed, epoch) only, so that a resumed run sees
    exactly the batches the interrupted run would have seen."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def lr_lambda(config: TrainerConfig, total_steps: int, time_progress=None):
    """LR factor per step: warmup, then constant / linear / cosine decay over the run. A run bounded
    by minutes alone has no step total, so `time_progress()` (the spent share of the budget) drives
    the decay instead."""
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.lr_scheduler == "constant":
            return 1.0
        if time_progress is not None:
            progress = time_progress()
        else:
            progress = min(1.0, (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps))
        lo = config.min_lr_ratio
        if config.lr_scheduler == "linear":
            return 1.0 - (1.0 - lo) * progress
        return lo + 0.5 * (1.0 - lo) * (1.0 + math.cos(math.pi * progress))

    return factor


def build_optimizer(model, config: TrainerConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; a text-encoder projection gets its own learning rate."""
    params = [p for p in model.parameters() if p.requires_grad]
    projection = {id(p) for p in getattr(model, "projection", torch.nn.Identity()).parameters()}
    groups = [{"params": [p for p in params if id(p) not in projection]},
              {"params": [p for p in params if id(p) in projection],
               "lr": config.projection_learning_rate or config.learning_rate}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.learning_rate,
                             weight_decay=config.weight_decay)


def apply_training_options(model, config: TrainerConfig):
    """Apply the config's training options in order: 4-bit base (QLoRA), frozen vision tower,
    gradient checkpointing, LoRA adapters on the decoder (targets per backbone, see peft_utils),
    text encoder; then log the trainable-parameter report."""
    if config.use_qlora:
        model = peft_utils.quantize_base_4bit(model)  # RuntimeError naming the reason without CUDA
    if config.freeze_vision_encoder:
        try:
            peft_utils.freeze_vision(model)
        except ValueError as err:
            raise ValueError(f"freeze_vision_encoder: {err}") from None
    if config.gradient_checkpointing and not config.use_qlora:
        peft_utils.enable_gradient_checkpointing(model)
    if config.use_qlora:
        model = peft_utils.prepare_for_kbit_training(model, config.gradient_checkpointing)
    if config.use_lora:
        from peft import get_peft_model

        model = get_peft_model(model, peft_utils.lora_config(model, config))
    if config.use_text_encoder:
        encoder = TextEncoderModule(config.text_encoder_model, trainable=config.text_encoder_trainable)
        model = SoftPromptModel(model, encoder, use_projection=config.use_text_projection)
    logger.info("%s", peft_utils.format_report(peft_utils.trainable_parameter_report(model)))
    return model


class Trainer:
    """Trains a model on instruction examples. `train()` returns (metrics, checkpoint paths)."""

    def __init__(self, config: TrainerConfig, model=None, processor=None) -> None:
        self.config = config
        self.out = Path(config.output_dir)
        trackers = [t for t in config.report_to if _tracker_available(t)]
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with=trackers or None,
            project_dir=str(self.out),
        )
        set_seed(config.seed)
        if model is None:
            model, processor = load_model(config.model_name, seed=config.seed)
        if processor is None:
            raise ValueError("a processor is needed when a model object is passed")
        self.processor = processor
        self.model = apply_training_options(model, config)
        self.render_config = RenderConfig.from_preset(config.render_preset)
        self.checkpoints: list[str] = []

    # ---- setup -------------------------------------------------------------------------------
    def _dataset(self, data) -> Dataset:
        if isinstance(data, Dataset):
            return data
        return InstructionDataset(list(data), self.render_config, self.config.instruction_prompt)

    # ---- fit ---------------------------------------------------------------------------------
    def train(self, train_data, eval_examples: Sequence[InstructionExample] | None = None) -> tuple[dict, list[str]]:
        cfg, acc = self.config, self.accelerator
        dataset = self._dataset(train_data)
        if len(dataset) == 0:
            raise ValueError("the training set is empty")
        sampler = EpochSampler(len(dataset), cfg.seed)
        loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler,
                            collate_fn=Collator.for_model(self.model, self.processor, cfg.max_length),
                            num_workers=cfg.num_workers)
        steps_per_epoch = max(1, len(loader) // cfg.gradient_accumulation_steps)
        total_steps = cfg.max_steps or cfg.num_epochs * steps_per_epoch
        optimizer = build_optimizer(self.model, cfg)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        clock = {"seconds": 0.0}  # training seconds so far, for schedules over a time budget
        budget = cfg.max_minutes * 60 if cfg.max_minutes and not cfg.max_steps else None
        time_progress = (lambda: min(1.0, clock["seconds"] / budget)) if budget else None
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps, time_progress))
        model, optimizer, loader, scheduler = acc.prepare(self.model, optimizer, loader, scheduler)
        self._prepared = model

        state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "train_seconds": 0.0, "loss_first": None}
        if cfg.resume_from_checkpoint:
            state = self._load_checkpoint(cfg.resume_from_checkpoint)
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.to_yaml(self.out / "config.yaml")
        if acc.trackers:
            acc.init_trackers("deepsynth", config={k: v for k, v in asdict(cfg).items() if not isinstance(v, list)})
        log = (self.out / "metrics.jsonl").open("a") if acc.is_main_process else None

        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        seconds_before = state["train_seconds"]
        start = time.time()
        stopped = "max_steps"
        last_loss, window = None, []
        # A run bounded by minutes alone has no meaningful step total to show.
        bar_total = None if cfg.max_minutes and not cfg.max_steps else total_steps
        bar = tqdm(total=bar_total, initial=step, desc="train", disable=not acc.is_local_main_process)
        model.train()
        done = step >= total_steps
        while not done:
            sampler.set_epoch(epoch)
            batches = acc.skip_first_batches(loader, batch_in_epoch) if batch_in_epoch else loader
            for batch in batches:
                with acc.accumulate(model):
                    loss = model(**batch).loss
                    if not torch.isfinite(loss):
                        self._diverged(step, loss, log)
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.max_grad_norm:
                        acc.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    clock["seconds"] = seconds_before + time.time() - start
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                batch_in_epoch += 1
                window.append(loss.detach().float().item())
                if not acc.sync_gradients:
                    continue
                step += 1
                last_loss = sum(window) / len(window)
                window = []
                if state["loss_first"] is None:
                    state["loss_first"] = last_loss
                bar.update(1)
                bar.set_postfix(loss=f"{last_loss:.4f}")
                elapsed = seconds_before + time.time() - start
                if step % cfg.log_interval == 0 or step == 1:
                    rec = {"step": step, "epoch": epoch, "loss": round(last_loss, 6),
                           "lr": scheduler.get_last_lr()[0], "seconds": round(elapsed, 2)}
                    self._log(log, rec)
                if cfg.eval_interval and eval_examples and step % cfg.eval_interval == 0:
                    self._log(log, {"step": step, "eval": self.validate(eval_examples, cfg.eval_samples)})
                state.update(step=step, epoch=epoch, batch_in_epoch=batch_in_epoch, train_seconds=elapsed)
                if cfg.save_interval and step % cfg.save_interval == 0:
                    self.save_checkpoint(state)
                if step >= total_steps:
                    done = True
                    break
                if cfg.max_minutes and elapsed >= cfg.max_minutes * 60:
                    done, stopped = True, "max_minutes"
                    break
            else:
                epoch, batch_in_epoch = epoch + 1, 0
        bar.close()
        train_seconds = seconds_before + time.time() - start
        state.update(step=step, epoch=epoch, batch_in_epoch=batch_in_epoch, train_seconds=train_seconds)
        if last_loss is not None:
            self._log(log, {"step": step, "loss": round(last_loss, 6), "final": True})
        metrics = {"train_steps": step, "train_seconds": round(train_seconds, 2), "stopped": stopped,
                   "loss_first": state["loss_first"], "loss_last": last_loss}
        if eval_examples:
            metrics["eval"] = self.validate(eval_examples, 0)
            self._log(log, {"step": step, "eval": metrics["eval"]})
        if not self.checkpoints or not self.checkpoints[-1].endswith(f"checkpoint-{step:06d}"):
            self.save_checkpoint(state)
        final = self.save_final()
        if log:
            log.close()
            plot_curves(self.out / "metrics.jsonl", self.out / "curves.png")
        acc.end_training()
        metrics["final_model"] = final
        return metrics, list(self.checkpoints)

    # ---- validate ----------------------------------------------------------------------------
    def validate(self, examples: Sequence[InstructionExample], limit: int = 0) -> dict:
        examples = list(examples)[:limit] if limit else list(examples)
        model = self.accelerator.unwrap_model(self._prepared)
        settings = GenerationSettings(max_new_tokens=self.config.eval_max_new_tokens)
        return evaluate_examples(model, self.processor, examples, self.render_config, settings)["scores"]

    # ---- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, state: dict) -> str:
        acc = self.accelerator
        final = self.out / f"checkpoint-{state['step']:06d}"
        tmp = self.out / f".{final.name}.tmp"
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp / "state"))
        full_state = self._full_state_dict()
        if acc.is_main_process:
            self._save_model(tmp, full_state)
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
            if final.exists():
                shutil.rmtree(final)
            tmp.rename(final)
            self.checkpoints.append(str(final))
            for old in sorted(self.out.glob("checkpoint-*"))[:-self.config.keep_checkpoints]:
                shutil.rmtree(old)
            self.checkpoints = [c for c in self.checkpoints if Path(c).exists()]
        acc.wait_for_everyone()
        return str(final)

    def _load_checkpoint(self, path: str) -> dict:
        if path == "latest":
            found = sorted(self.out.glob("checkpoint-*"))
            if not found:
                raise FileNotFoundError(f"resume_from_checkpoint='latest' but {self.out} has no checkpoint-* directory")
            path = str(found[-1])
        ckpt = Path(path)
        if not (ckpt / STATE_FILE).is_file():
            raise FileNotFoundError(f"{ckpt} is not a trainer checkpoint (no {STATE_FILE})")
        self.accelerator.load_state(str(ckpt / "state"))
        logger.info("resumed from %s", ckpt)
        return json.loads((ckpt / STATE_FILE).read_text())

    def _full_state_dict(self) -> dict | None:
        """Under FSDP the weights are sharded: every rank must take part in gathering them
        (untested here: no GPU cluster). Elsewhere the unwrapped model saves itself."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type == DistributedType.FSDP:
            return self.accelerator.get_state_dict(self._prepared)
        return None

    def _save_model(self, directory: Path, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self._prepared)
        model.save_pretrained(directory, **({"state_dict": state_dict} if state_dict is not None else {}))
        self.processor.save_pretrained(directory)

    def save_final(self) -> str:
        """The trained model as a plain `save_pretrained` directory (LoRA merged into the base)."""
        final = self.out / "final"
        full_state = self._full_state_dict()
        if self.accelerator.is_main_process:
            model = self.accelerator.unwrap_model(self._prepared)
            if self.config.use_lora:
                peft_model = model.model if isinstance(model, SoftPromptModel) else model
                peft_model.save_pretrained(self.out / "adapter")
                if isinstance(model, SoftPromptModel):
                    model.model = peft_model.merge_and_unload()
                else:
                    model = peft_model.merge_and_unload()
            tmp = self.out / ".final.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(tmp, **({"state_dict": full_state} if full_state is not None else {}))
            self.processor.save_pretrained(tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        self.accelerator.wait_for_everyone()
        return str(final)

    def _diverged(self, step: int, loss: torch.Tensor, log) -> None:
        last = self.checkpoints[-1] if self.checkpoints else "none (no checkpoint was written yet)"
        msg = (f"loss is {loss.item()} at step {step + 1}: training stopped. "
               f"Last good checkpoint: {last}. Lower learning_rate, use bf16 instead of fp16, "
               f"or check the data.")
        self._log(log, {"step": step + 1, "error": "non-finite loss", "loss": str(loss.item())})
        if log:
            log.close()
        raise TrainingDiverged(msg)

    def _log(self, log, rec: dict) -> None:
        if log:
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if self.accelerator.trackers:
            flat = {k: v for k, v in rec.items() if isinstance(v, (int, float)) and k != "step"}
            flat.update({f"eval/{k}": v for k, v in rec.get("eval", {}).items() if isinstance(v, (int, float))})
            self.accelerator.log(flat, step=rec.get("step"))


def _tracker_available(name: str) -> bool:
    import importlib.util

    module = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml"}.get(name, name)
    if importlib.util.find_spec(module) is None:
        logger.warning("tracker %r requested but not installed; logging to metrics.jsonl only", name)
        return False
    return True


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    """Training loss (and eval EM when logged) against step, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    loss = [(r["step"], r["loss"]) for r in records if "loss" in r and not isinstance(r["loss"], str)]
    evals = [(r["step"], r["eval"]["em"]) for r in records if "eval" in r and "em" in r["eval"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    if loss:
        ax.plot(*zip(*loss), label="train loss", color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    if evals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals), "o-", label="eval EM", color="tab:orange")
        ax2.set_ylabel("eval EM")
        ax2.set_ylim(0, 1)
    ax.set_title(metrics_path.parent.name)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
