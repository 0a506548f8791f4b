"""One trainer for every backbone and method: setup -> fit -> validate, on accelerate.

Full fine-tuning, frozen vision and LoRA are options of the same loop; so is a curriculum (the
tiny reader's pre-training, `deepsynth.training.reader_pretrain`): an endless `IterableDataset` of
generated examples plus a `TrainerCallback` that gates its stages. Each checkpoint is a
`save_pretrained` directory (so evaluation and serving load it like any model) plus accelerate's
state (optimizer, scheduler, RNG) and `trainer_state.json` (step, epoch, position in the epoch or
in the stream, callback states), written through `deepsynth.atomic.atomic_dir` (fsync, then
rename), so a crash, even SIGKILL, never leaves half a checkpoint; temporary folders of a killed
run are removed when the next run starts. Time (the `max_minutes` budget, the LR decay over it,
callbacks' timers) is read from an injectable clock, so tests do not depend on the machine's speed.
Every log record carries tokens/s (non-pad input tokens per second spent drawing batches and
stepping) and peak memory (CUDA max allocated on CUDA, the process's peak RSS otherwise).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed, slice_tensors
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, Subset
from tqdm.auto import tqdm

from deepsynth import storage
from deepsynth.atomic import atomic_dir, clean_stale_temps
from deepsynth.data.instruction_dataset import InstructionDataset
from deepsynth.data.schema import InstructionExample
from deepsynth.models.bundle import ModelSpec, load_bundle, make_collator, make_decoder, save_bundle, spec_of_loaded
from deepsynth.models.collate import AUX_PREFIX
from deepsynth.models.text_encoder import SoftPromptModel, TextEncoderModule
from deepsynth.render import RenderConfig
from deepsynth.training import peft_utils
from deepsynth.training.config import TrainerConfig
from deepsynth.training.validation import evaluate_examples

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; training stopped and the last good checkpoint was kept."""


class EpochSampler(Sampler[int]):
    """Shuffles with a permutation derived from (seed, epoch) only, so that a resumed run sees
    exactly the batches the interrupted run would have seen, in any epoch.

    The trainer sets `epoch` itself. The sampler deliberately has no `set_epoch`: accelerate's
    prepared loader calls that at every pass with its own pass count, which starts again at 0 in
    a resumed process, so a run resumed in epoch 2 would replay epoch 0's order.
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self.epoch = 0  # the trainer's epoch; picks the permutation

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def lr_lambda(config: TrainerConfig, schedule_steps: float, time_progress=None):
    """LR factor per step: warmup, then constant / linear / cosine decay over `schedule_steps`. A run
    bounded by minutes alone has no step total, so `time_progress()` (the spent share of the
    budget) drives the decay instead."""
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        if config.lr_scheduler == "constant":
            return 1.0
        if time_progress is not None:
            progress = time_progress()
        else:
            progress = min(1.0, (step - config.warmup_steps) / max(1, schedule_steps - config.warmup_steps))
        lo = config.min_lr_ratio
        if config.lr_scheduler == "linear":
            return 1.0 - (1.0 - lo) * progress
        return lo + 0.5 * (1.0 - lo) * (1.0 + math.cos(math.pi * progress))

    return factor


@dataclass
class StepControl:
    """What callbacks ask of the trainer at the end of an optimizer step (in a multi-process run,
    the main process's answer holds on every rank)."""

    log: bool = False  # write this step's record even off the log interval
    save: bool = False  # write a checkpoint after this step
    stop: str | None = None  # end training after this step; the reason becomes metrics["stopped"]


class TrainerCallback:
    """Hooks into `Trainer.train`; override what you need. A callback's `state_dict()` is saved in
    every checkpoint and handed back to `load_state_dict()` on resume, so a curriculum or any
    other schedule continues where it was."""

    def on_train_begin(self, trainer: "Trainer") -> None:
        """After the model is prepared and a checkpoint (if any) is restored, before the first batch."""

    def training_modules(self, trainer: "Trainer") -> list[torch.nn.Module]:
        """Modules that train beside the model but are not part of it (e.g. a probe head of an
        auxiliary loss): optimised with the model's parameters and saved in every checkpoint, never
        in the model folder. Called once, before the optimizer is built."""
        return []

    def extra_loss(self, trainer: "Trainer", targets: dict, outputs) -> torch.Tensor | None:
        """A term added to the micro-batch's loss before the backward pass. `targets`: the batch's
        entries named `aux_*` (the collator passes them through; the model never sees them)."""
        return None

    def on_batch_end(self, trainer: "Trainer", batch: dict, outputs) -> None:
        """After the backward pass of every micro-batch (`outputs` holds loss and logits)."""

    def on_step_end(self, trainer: "Trainer", step: int, record: dict, control: StepControl) -> None:
        """After optimizer step `step` (1-based). Fields added to `record` go into its log line."""

    def on_train_end(self, trainer: "Trainer", metrics: dict) -> None:
        """After the last step, before the final checkpoint and model are written."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned (JSON round trip: tuples come back as lists)."""


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    """(peak memory in MiB, what was measured): the CUDA caching allocator's max allocated bytes on
    `device` when training on CUDA, the process's peak resident set size otherwise."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in bytes on macOS and in KiB on Linux.
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024, "process_peak_rss"


def build_optimizer(model, config: TrainerConfig, extra_modules: Sequence[torch.nn.Module] = ()) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (the model's and `extra_modules'`, callbacks' training-only
    modules); a text-encoder projection gets its own learning rate."""
    params = [p for m in (model, *extra_modules) for p in m.parameters() if p.requires_grad]
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
        model = peft_utils.apply_lora(model, config)
    if config.use_text_encoder:
        encoder = TextEncoderModule(config.text_encoder_model, trainable=config.text_encoder_trainable)
        model = SoftPromptModel(model, encoder, use_projection=config.use_text_projection)
    logger.info("%s", peft_utils.format_report(peft_utils.trainable_parameter_report(model)))
    return model


@dataclass
class _Run:
    """What one `Trainer.train()` call carries from step to step."""

    model: torch.nn.Module  # the model as accelerate prepared it
    optimizer: torch.optim.Optimizer  # accelerate's wrapper of AdamW
    scheduler: torch.optim.lr_scheduler.LRScheduler  # accelerate's wrapper of the LambdaLR
    loader: DataLoader  # accelerate's loader over the training set
    sampler: EpochSampler | None  # the map-style set's sampler; None for a stream
    stream: bool  # the training set is an IterableDataset
    params: list[torch.Tensor]  # the optimizer's parameters, for gradient clipping
    total_steps: float  # optimizer steps the run takes; inf for a stream bounded by minutes alone
    progress: dict  # {"seconds": training seconds so far}, read by an LR schedule over a time budget
    state: dict  # the counters a checkpoint saves (trainer_state.json)
    log: object  # metrics.jsonl open for appending on the main process, else None
    eval_examples: Sequence[InstructionExample] | None  # evaluated every eval_interval steps and at the end
    examples_per_batch: int  # examples the stream produces per micro-batch (all processes)
    step: int  # optimizer steps done, those before a resume included
    epoch: int  # passes over a map-style set completed
    batch_in_epoch: int  # micro-batches drawn in the current pass
    tokens_before: int  # non-pad input tokens (all processes) of the run before this session
    tokens: int = 0  # non-pad input tokens of this process since this session started
    # Seconds spent drawing batches and stepping (evaluation, logging and checkpoints left out):
    # what tokens/s is measured against.
    step_seconds: float = 0.0
    since_log: dict = field(default_factory=lambda: {"seconds": 0.0, "tokens": 0})  # at the last log record
    last_loss: float | None = None  # mean loss of the micro-batches of the last optimizer step
    window: list[float] = field(default_factory=list)  # losses of the micro-batches of the step under way
    stopped: str = "max_steps"  # why the run ended: max_steps, max_minutes or a callback's reason
    done: bool = False  # the run has ended
    bar: object = None  # the tqdm progress bar


class Trainer:
    """Trains a model on instruction examples. `train()` returns (metrics, checkpoint paths).

    clock:     seconds as a float (default `time.monotonic`); drives the `max_minutes` budget, the
               LR decay over it and callbacks' timers. Tests pass a fake one.
    callbacks: `TrainerCallback`s (e.g. a curriculum's stage gate), called in order.
    """

    def __init__(self, config: TrainerConfig, model=None, processor=None, *,
                 clock: Callable[[], float] = time.monotonic, callbacks: Sequence[TrainerCallback] = ()) -> None:
        self.config = config
        self.clock = clock
        self.callbacks = list(callbacks)
        # output_dir may be an object-storage URI: the run writes into a local stage, and each
        # checkpoint (then the whole run) is uploaded as it is finished (deepsynth.storage).
        self._mirror = storage.mirror_for(config.output_dir)
        self.out = self._mirror.stage
        trackers = [t for t in config.report_to if _tracker_available(t)]
        _release_mixed_precision(config.mixed_precision)
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            log_with=trackers or None,
            project_dir=str(self.out),
        )
        set_seed(config.seed)
        if model is None:
            model, processor, self.base_spec = load_bundle(config.model_name, seed=config.seed)
        elif processor is not None:
            self.base_spec = spec_of_loaded(model, processor)
        if processor is not None and config.prompt_layout is not None:
            # the layout this run asks for: training, evaluation and the bundle all follow it
            self.base_spec = replace(self.base_spec, prompt_layout=config.prompt_layout)
        if processor is None:
            raise ValueError("a processor is needed when a model object is passed")
        self.processor = processor
        self.model = apply_training_options(model, config)
        if isinstance(self.model, SoftPromptModel):  # pages given as images= become this bundle's prompt
            self.model.attach_processor(processor, self.base_spec.prompt_builder)
        self.render_config = RenderConfig.from_preset(config.render_preset)
        # What the model read in training; a prepared folder's pages may differ from the recipe's preset.
        self.data_render_config = self.render_config
        self.training_data: dict | None = None
        self.evaluation: dict = {}
        self.checkpoints: list[str] = []

    # ---- setup -------------------------------------------------------------------------------
    def _dataset(self, data) -> Dataset:
        if isinstance(data, Dataset):
            return data
        return InstructionDataset(list(data), self.render_config, self.config.instruction_prompt)

    def _note_training_data(self, dataset: Dataset) -> None:
        self.data_render_config = getattr(dataset, "render_config", None) or self.render_config
        self.training_data = {"train": getattr(dataset, "source", None) or type(dataset).__name__,
                              "examples": None if isinstance(dataset, IterableDataset) else len(dataset),
                              "pages": "prepared" if getattr(dataset, "pre_rendered", False) else "rendered"}

    def spec(self) -> ModelSpec:
        """The bundle of the model this run writes: what it read, how it is prompted and decoded."""
        cfg = self.config
        return ModelSpec(
            backend=self.base_spec.backend, render=asdict(self.data_render_config), crop_mode=self.base_spec.crop_mode,
            prompt_layout=self.base_spec.prompt_layout, default_instruction=cfg.instruction_prompt,
            loop_guard=self.base_spec.loop_guard, base_model=cfg.model_name, base_seed=cfg.seed,
            training=asdict(cfg), training_data=self.training_data, evaluation=dict(self.evaluation))

    # ---- fit ---------------------------------------------------------------------------------
    def train(self, train_data, eval_examples: Sequence[InstructionExample] | None = None) -> tuple[dict, list[str]]:
        """Fit on `train_data`: examples or their dicts, a map-style `Dataset`, or a stream.

        A stream is an `IterableDataset` (e.g. generated curriculum examples). It has no length, so
        max_steps or max_minutes must bound the run. To be resumable it provides `state_at(n)` (its
        state before the n-th example it produced; accelerate's loader draws one batch ahead, so
        this is not its current state) and `load_state_dict(state)`.
        """
        run = self._setup_run(train_data, eval_examples)
        while not run.done:
            self._fit_epoch(run)
        return self._finish(run)

    def _setup_run(self, train_data, eval_examples) -> _Run:
        """Data, optimizer and schedule prepared by accelerate, the output folder ready, a checkpoint
        (if asked) restored, the log open, callbacks told: everything the first batch needs."""
        cfg, acc = self.config, self.accelerator
        dataset = self._dataset(train_data)
        loader, sampler, total_steps = self._loader(dataset)
        stream = isinstance(dataset, IterableDataset)
        self._stream = dataset if stream else None
        extra_modules = [m for cb in self.callbacks for m in cb.training_modules(self)]
        optimizer = build_optimizer(self.model, cfg, extra_modules)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        progress = {"seconds": 0.0}  # training seconds so far, for schedules over a time budget
        budget = cfg.max_minutes * 60 if cfg.max_minutes and not cfg.max_steps and not cfg.schedule_steps else None
        time_progress = (lambda: min(1.0, progress["seconds"] / budget)) if budget else None
        schedule = lr_lambda(cfg, cfg.schedule_steps or total_steps, time_progress)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        # One prepare() call with the loader: DeepSpeed reads its micro-batch size from the loader there.
        model, optimizer, loader, scheduler = acc.prepare(self.model, optimizer, loader, scheduler)
        if hasattr(loader, "slice_fn"):  # a stream's loader, dispatched from the main process
            loader.slice_fn = dispatch_slice
        self._prepared = model
        for module in extra_modules:
            acc.register_for_checkpointing(module)

        self._prepare_output_dir()
        state, resumed_from = self._restore()
        log = self._open_log()
        if resumed_from:
            self._log(log, {"step": state["step"], "resumed_from": resumed_from})
        self._seconds_before, self._clock_start = state["train_seconds"], self.clock()
        # Examples the stream produces per micro-batch: accelerate dispatches a stream's batches
        # from the main process, which draws one batch per process.
        examples_per_batch = cfg.batch_size * acc.num_processes if stream else cfg.batch_size
        self.examples_per_step = examples_per_batch * cfg.gradient_accumulation_steps
        run = _Run(model=model, optimizer=optimizer, scheduler=scheduler, loader=loader, sampler=sampler,
                   stream=stream, params=params, total_steps=total_steps, progress=progress, state=state, log=log,
                   eval_examples=eval_examples, examples_per_batch=examples_per_batch, step=state["step"],
                   epoch=state["epoch"], batch_in_epoch=state["batch_in_epoch"], tokens_before=state["tokens"])
        for callback in self.callbacks:
            callback.on_train_begin(self)
        # A run bounded by minutes alone has no meaningful step total to show.
        bar_total = None if (cfg.max_minutes and not cfg.max_steps) or math.isinf(total_steps) else total_steps
        run.bar = tqdm(total=bar_total, initial=run.step, desc="train", disable=not acc.is_local_main_process)
        model.train()
        run.done = run.step >= total_steps
        return run

    def _loader(self, dataset: Dataset) -> tuple[DataLoader, EpochSampler | None, float]:
        """(loader, its sampler (None for a stream), optimizer steps the run takes (inf: a stream
        bounded by minutes))."""
        cfg = self.config
        self._note_training_data(dataset)
        collate = make_collator(self.model, self.processor, self.base_spec, cfg.max_length)
        if isinstance(dataset, IterableDataset):
            if not (cfg.max_steps or cfg.max_minutes):
                raise ValueError("a streamed training set (IterableDataset) has no end: set max_steps or max_minutes")
            if cfg.num_workers:
                raise ValueError(f"TrainerConfig.num_workers={cfg.num_workers} is invalid with a streamed training set: "
                                 "must be 0 (the stream is drawn in the training process, where its state is saved)")
            loader = DataLoader(dataset, batch_size=cfg.batch_size, collate_fn=collate)
            return loader, None, cfg.max_steps or math.inf
        if len(dataset) == 0:
            raise ValueError("the training set is empty")
        sampler = EpochSampler(len(dataset), cfg.seed)
        loader = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, collate_fn=collate,
                            num_workers=cfg.num_workers)
        steps_per_epoch = max(1, len(loader) // cfg.gradient_accumulation_steps)
        return loader, sampler, cfg.max_steps or cfg.num_epochs * steps_per_epoch

    def _prepare_output_dir(self) -> None:
        """The remote run so far pulled (its checkpoints: resume_from_checkpoint=latest) and the
        temporary folders of an interrupted run removed, before any rank reads the folder."""
        if self.accelerator.is_main_process:
            if self._mirror.uri:
                self._mirror.pull()
            stale = clean_stale_temps(self.out)
            if stale:
                logger.warning("removed temporary folders left in %s by an interrupted run: %s", self.out, stale)
        self.accelerator.wait_for_everyone()

    def _restore(self) -> tuple[dict, str | None]:
        """(the step counters to start from, the checkpoint they came from): a fresh run's, or those
        of `resume_from_checkpoint` with its optimizer, RNG, callback and stream states restored."""
        state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "train_seconds": 0.0, "loss_first": None,
                 "tokens": 0, "stream_examples": 0}
        if not self.config.resume_from_checkpoint:
            return state, None
        loaded = self._load_checkpoint(self.config.resume_from_checkpoint)
        resumed_from = loaded.pop("resumed_from", None)
        self._restore_extras(loaded.pop("callbacks", {}), loaded.pop("data", None), loaded.get("step", 0))
        state.update(loaded)
        return state, resumed_from

    def _open_log(self):
        """config.yaml written, trackers started, metrics.jsonl opened for appending (main process;
        None elsewhere)."""
        cfg, acc = self.config, self.accelerator
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            cfg.to_yaml(self.out / "config.yaml")
        if acc.trackers:
            acc.init_trackers("deepsynth", config={k: v for k, v in asdict(cfg).items() if not isinstance(v, list)})
        self._log_file = (self.out / "metrics.jsonl").open("a") if acc.is_main_process else None
        return self._log_file

    def _fit_epoch(self, run: _Run) -> None:
        """One pass over the data (the rest of it after a resume), or until a step ends the run."""
        acc = self.accelerator
        if run.sampler is not None:
            run.sampler.epoch = run.epoch
        skip = run.batch_in_epoch and not run.stream
        batches = acc.skip_first_batches(run.loader, run.batch_in_epoch) if skip else run.loader
        drawn = 0
        mark = self.clock()
        for batch in batches:
            drawn += 1
            self._micro_step(run, batch, mark)
            if not acc.sync_gradients:
                mark = self.clock()
                continue
            if self._end_step(run):
                return
            mark = self.clock()
        if not drawn:
            raise ValueError("the training set is empty: a pass over it gave no batch")
        run.epoch, run.batch_in_epoch = run.epoch + 1, 0

    def _micro_step(self, run: _Run, batch: dict, mark: float) -> None:
        """Forward and backward of one micro-batch (at the end of an accumulation window, which
        accelerate decides, clipping and the optimizer and scheduler steps), its counters, callbacks'
        on_batch_end; its loss is kept for the step's record. `mark`: the clock when it was drawn."""
        cfg, acc = self.config, self.accelerator
        with acc.accumulate(run.model):
            targets = {k: batch.pop(k) for k in [k for k in batch if k.startswith(AUX_PREFIX)]}
            outputs = run.model(**batch)
            loss = outputs.loss
            for callback in self.callbacks:
                term = callback.extra_loss(self, targets, outputs)
                if term is not None:
                    loss = loss + term
            if not torch.isfinite(loss):
                self._diverged(run.step, loss, run.log)
            acc.backward(loss)
            if acc.sync_gradients and cfg.max_grad_norm:
                acc.clip_grad_norm_(run.params, cfg.max_grad_norm)
            run.optimizer.step()
            run.progress["seconds"] = self.elapsed()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        run.step_seconds += self.clock() - mark
        run.batch_in_epoch += 1
        if run.stream:
            run.state["stream_examples"] += run.examples_per_batch
        run.tokens += _input_tokens(batch)
        for callback in self.callbacks:
            callback.on_batch_end(self, batch, outputs)
        run.window.append(loss.detach().float().item())

    def _end_step(self, run: _Run) -> bool:
        """After an optimizer step: its record, callbacks' requests, the periodic log, evaluation and
        checkpoint. True when the run ends here."""
        cfg, step = self.config, run.step + 1
        run.step, run.last_loss, run.window = step, sum(run.window) / len(run.window), []
        if run.state["loss_first"] is None:
            run.state["loss_first"] = run.last_loss
        run.bar.update(1)
        run.bar.set_postfix(loss=f"{run.last_loss:.4f}")
        elapsed = self.elapsed()
        rec = {"step": step, "epoch": run.epoch, "loss": round(run.last_loss, 6),
               "lr": run.scheduler.get_last_lr()[0], "seconds": round(elapsed, 2)}
        if run.stream:
            del rec["epoch"]
        control = StepControl()
        for callback in self.callbacks:
            callback.on_step_end(self, step, rec, control)
        if step >= run.total_steps:
            control.stop = "max_steps"
        elif cfg.max_minutes and elapsed >= cfg.max_minutes * 60:
            control.stop = "max_minutes"
        control = self._agree(control)
        if step % cfg.log_interval == 0 or step == 1 or control.log:
            rec.update(self._telemetry(run.tokens, run.step_seconds, run.since_log))
            self._log(run.log, rec)
        if cfg.eval_interval and run.eval_examples and step % cfg.eval_interval == 0:
            self._log(run.log, {"step": step, "eval": self.validate(run.eval_examples, cfg.eval_samples)})
        self._update_state(run, elapsed)
        if (cfg.save_interval and step % cfg.save_interval == 0) or control.save:
            self.save_checkpoint(run.state)
        if control.stop:
            run.done, run.stopped = True, control.stop
        return bool(control.stop)

    def _update_state(self, run: _Run, train_seconds: float) -> None:
        """The counters a checkpoint saves, as of now (tokens summed over all processes)."""
        run.state.update(step=run.step, epoch=run.epoch, batch_in_epoch=run.batch_in_epoch,
                         train_seconds=train_seconds, tokens=run.tokens_before + self._all_processes(run.tokens))

    def _finish(self, run: _Run) -> tuple[dict, list[str]]:
        """The final record and metrics, callbacks' on_train_end, the last evaluation, checkpoint and
        model; the run uploaded when its output is remote."""
        acc = self.accelerator
        run.bar.close()
        metrics = self._final_metrics(run)
        for callback in self.callbacks:
            callback.on_train_end(self, metrics)
        if run.eval_examples:
            metrics["eval"] = self.validate(run.eval_examples, 0)
            self.evaluation["eval"] = metrics["eval"]
            self._log(run.log, {"step": run.step, "eval": metrics["eval"]})
        # Every rank knows the last saved step (only the main process lists checkpoints), so all
        # take part in this save or none does.
        if getattr(self, "_saved_step", None) != run.step:
            self.save_checkpoint(run.state)
        final = self.save_final()
        if run.log:
            run.log.close()
            self._log_file = None
            plot_curves(self.out / "metrics.jsonl", self.out / "curves.png")
        acc.end_training()
        if acc.is_main_process and self._mirror.uri:
            self._mirror.put_tree()
            final = self._mirror.public(final)
        metrics["final_model"] = final
        return metrics, list(self.checkpoints)

    def _final_metrics(self, run: _Run) -> dict:
        """The run's metrics (steps, seconds, why it stopped, first and last loss, tokens/s over the
        whole session, peak memory); the last loss also goes to the log as the `final` record."""
        train_seconds = self.elapsed()
        self._update_state(run, train_seconds)
        peak, peak_kind = peak_memory_mb(self.accelerator.device)
        state, tokens_before, step_seconds = run.state, run.tokens_before, run.step_seconds
        telemetry = {"tokens": state["tokens"],
                     "tokens_per_s": round((state["tokens"] - tokens_before) / step_seconds, 2)
                     if step_seconds > 0 else None,
                     "step_seconds": round(step_seconds, 2),
                     "peak_memory_mb": round(peak, 1), "peak_memory_kind": peak_kind}
        if run.last_loss is not None:
            self._log(run.log, {"step": run.step, "loss": round(run.last_loss, 6), "final": True, **telemetry})
        return {"train_steps": run.step, "train_seconds": round(train_seconds, 2), "stopped": run.stopped,
                "loss_first": state["loss_first"], "loss_last": run.last_loss, **telemetry}

    # ---- helpers for callbacks ----------------------------------------------------------------
    def elapsed(self) -> float:
        """Training seconds of the run so far by the trainer's clock, time before a resume included."""
        return self._seconds_before + self.clock() - self._clock_start

    @property
    def trained_model(self):
        """The model being trained, unwrapped from accelerate's wrappers."""
        return self.accelerator.unwrap_model(self._prepared) if hasattr(self, "_prepared") else self.model

    def log(self, record: dict) -> None:
        """Append a record to metrics.jsonl (and the trackers) during `train()`."""
        self._log(getattr(self, "_log_file", None), record)

    def _agree(self, control: StepControl) -> StepControl:
        # Time-based decisions differ between processes; every rank must save and stop together.
        if self.accelerator.num_processes == 1:
            return control
        box = [control]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def _all_processes(self, count: int) -> int:
        if self.accelerator.num_processes == 1:
            return count
        return int(self.accelerator.reduce(torch.tensor(count, device=self.accelerator.device), "sum").item())

    def _telemetry(self, tokens: int, step_seconds: float, since_log: dict) -> dict:
        """tokens/s (all processes) over the step seconds since the previous log record, and peak
        memory so far."""
        total = self._all_processes(tokens)
        seconds = step_seconds - since_log["seconds"]
        rate = (total - since_log["tokens"]) / seconds if seconds > 0 else None
        since_log.update(seconds=step_seconds, tokens=total)
        peak, kind = peak_memory_mb(self.accelerator.device)
        return {"tokens_per_s": round(rate, 2) if rate is not None else None, "peak_memory_mb": round(peak, 1),
                "peak_memory_kind": kind}

    def _extra_state(self, state: dict) -> dict:
        """Callback states and the stream's position, saved beside the step counters."""
        extra = {"callbacks": {_callback_key(i, cb): cb.state_dict() for i, cb in enumerate(self.callbacks)}}
        stream = getattr(self, "_stream", None)
        if stream is not None and self.accelerator.is_main_process:
            if hasattr(stream, "state_at"):
                extra["data"] = stream.state_at(state["stream_examples"])
            else:
                logger.warning("%s has no state_at(): a resume from this checkpoint cannot continue the stream",
                               type(stream).__name__)
        return extra

    def _restore_extras(self, callbacks: dict, data, step: int) -> None:
        for i, callback in enumerate(self.callbacks):
            key = _callback_key(i, callback)
            if key in callbacks:
                callback.load_state_dict(callbacks[key])
            else:
                logger.warning("the checkpoint has no state for callback %s; it starts afresh", key)
        stream = getattr(self, "_stream", None)
        if stream is None or step == 0:
            return
        if data is None or not hasattr(stream, "load_state_dict"):
            raise ValueError(f"cannot resume the stream {type(stream).__name__} at step {step}: the checkpoint holds "
                             "no stream state, or the stream has no load_state_dict() (see Trainer.train)")
        stream.load_state_dict(data)

    # ---- validate ----------------------------------------------------------------------------
    def decoder(self, model=None):
        """The decoding path of the model being trained, as `ask` and `serve` will run it."""
        if model is None:
            model = self.accelerator.unwrap_model(self._prepared) if hasattr(self, "_prepared") else self.model
        return make_decoder(model, self.processor, self.spec())

    def validate(self, examples: Sequence[InstructionExample] | Dataset, limit: int = 0) -> dict:
        """Scores on `examples` (records rendered with the run's render config, or a dataset of
        pages such as a prepared folder), decoded as `ask` and `serve` will decode them."""
        if isinstance(examples, Dataset):
            if limit:
                examples = Subset(examples, range(min(limit, len(examples))))
        else:
            examples = list(examples)[:limit] if limit else list(examples)
        model = self.accelerator.unwrap_model(self._prepared)
        decoder = self.decoder(model)
        settings = (decoder.settings.replace(max_new_tokens=self.config.eval_max_new_tokens)
                    if self.config.eval_max_new_tokens else None)
        return evaluate_examples(decoder, examples, self.render_config, settings)["scores"]

    # ---- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self, state: dict) -> str:
        """Model, accelerate state (optimizer, scheduler, RNG of every rank), step counters, callback
        states and the stream's position in `checkpoint-NNNNNN/`, fsynced and renamed into place."""
        acc = self.accelerator
        final = self.out / f"checkpoint-{state['step']:06d}"
        self._saved_step = state["step"]
        payload = {**state, **self._extra_state(state)}
        with contextlib.ExitStack() as stack:
            # The main process owns the temporary folder; every rank writes its RNG state into it.
            box = [str(stack.enter_context(atomic_dir(final))) if acc.is_main_process else None]
            if acc.num_processes > 1:
                broadcast_object_list(box, from_process=0)
            tmp = Path(box[0])
            acc.save_state(str(tmp / "state"))
            full_state = self._full_state_dict()
            if acc.is_main_process:
                self._save_model(tmp, full_state)
                (tmp / STATE_FILE).write_text(json.dumps(payload, indent=2))
            acc.wait_for_everyone()  # all ranks' files are in place before the rename
        if acc.is_main_process:
            self.checkpoints.append(str(final))
            self._mirror.put_tree(final.name)
            for old in sorted(self.out.glob("checkpoint-*"))[:-self.config.keep_checkpoints]:
                shutil.rmtree(old)
                self._mirror.delete_tree(old.name)
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
        return {**json.loads((ckpt / STATE_FILE).read_text()), "resumed_from": str(ckpt)}

    def _full_state_dict(self) -> dict | None:
        """Under FSDP the weights are sharded: every rank must take part in gathering them
        (untested here: no GPU cluster). Elsewhere the unwrapped model saves itself."""
        from accelerate.utils import DistributedType

        if self.accelerator.distributed_type == DistributedType.FSDP:
            return self.accelerator.get_state_dict(self._prepared)
        return None

    def _save_model(self, directory: Path, state_dict: dict | None = None) -> None:
        model = self.accelerator.unwrap_model(self._prepared)
        # LoRA checkpoints hold the adapters (a bundle on the base model), full runs the weights.
        save_bundle(directory, model, self.processor, self.spec(), adapter_only=self.config.use_lora,
                    state_dict=state_dict)

    def save_final(self) -> str:
        """The trained model as a bundle in `final/` (LoRA merged into the base); a LoRA run also
        writes its adapters (with the text-encoder projection, if any) as a bundle in `adapter/`."""
        final = self.out / "final"
        full_state = self._full_state_dict()
        if self.accelerator.is_main_process:
            model = self.accelerator.unwrap_model(self._prepared)
            spec = self.spec()
            if self.config.use_lora:
                with atomic_dir(self.out / "adapter") as tmp:
                    save_bundle(tmp, model, self.processor, spec, adapter_only=True)
                peft_model = model.model if isinstance(model, SoftPromptModel) else model
                if isinstance(model, SoftPromptModel):
                    model.model = peft_model.merge_and_unload()
                else:
                    model = peft_model.merge_and_unload()
            with atomic_dir(final) as tmp:
                save_bundle(tmp, model, self.processor, spec, state_dict=full_state)
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


def _release_mixed_precision(wanted: str) -> None:
    """accelerate keeps one process-wide state, and a second Accelerator with another mixed
    precision raises; a second Trainer in the same session (a notebook running a bf16 example, then
    a LoRA one) must get the precision its own config asks for. Only the precision state is reset:
    the distributed setup (PartialState) stays as launched."""
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != wanted:
        logger.info("mixed precision %s -> %s for this trainer", AcceleratorState().mixed_precision, wanted)
        AcceleratorState._reset_state()


def dispatch_slice(batch: dict, data_slice: slice, process_index: int = 0, num_processes: int = 1) -> dict:
    """accelerate's cut of a streamed batch (drawn on the main process) for one process.

    accelerate cuts every tensor of a dispatched batch along its first dimension by examples, but
    per-page tensors (pixel_values, aux_* targets) have one row per page: with one process the batch
    goes through whole (accelerate's cut to the batch size dropped the pages after the eighth of a
    batch holding a two-page document); with several, a batch whose per-page tensors do not line
    up with its examples is an error rather than pages handed to the wrong process.
    """
    if num_processes == 1:
        return batch
    examples = batch["input_ids"].shape[0]
    uneven = sorted(k for k, v in batch.items() if isinstance(v, torch.Tensor) and v.shape[0] != examples)
    if uneven:
        raise ValueError(f"a streamed batch of {examples} examples has {uneven} with another number of rows "
                         f"(documents of several pages): streaming them to {num_processes} processes is not "
                         "supported; train on one process or give a map-style dataset")
    return slice_tensors(batch, data_slice)


def _input_tokens(batch: dict) -> int:
    """Non-pad input tokens of a batch (image tokens included): what the model processed."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def _callback_key(index: int, callback: TrainerCallback) -> str:
    return f"{index}:{type(callback).__name__}"


def _tracker_available(name: str) -> bool:
    import importlib.util

    module = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml"}.get(name, name)
    if importlib.util.find_spec(module) is None:
        logger.warning("tracker %r requested but not installed; logging to metrics.jsonl only", name)
        return False
    return True


def plot_curves(metrics_path: Path, png_path: Path) -> None:
    """Training loss (and eval EM when logged) against step; below it, tokens/s and peak memory
    when the records carry them. Saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    loss = [(r["step"], r["loss"]) for r in records if "loss" in r and not isinstance(r["loss"], str)]
    evals = [(r["step"], r["eval"]["em"]) for r in records if "eval" in r and "em" in r["eval"]]
    speed = [(r["step"], r["tokens_per_s"]) for r in records if r.get("tokens_per_s") is not None and not r.get("final")]
    memory = [(r["step"], r["peak_memory_mb"]) for r in records if "peak_memory_mb" in r and not r.get("final")]
    fig, (ax, ax_speed) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=(2, 1))
    if loss:
        ax.plot(*zip(*loss), label="train loss", color="tab:blue")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    if evals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals), "o-", label="eval EM", color="tab:orange")
        ax2.set_ylabel("eval EM")
        ax2.set_ylim(0, 1)
    ax.set_title(metrics_path.parent.name)
    if speed:
        ax_speed.plot(*zip(*speed), color="tab:green")
    ax_speed.set_ylabel("tokens/s", color="tab:green")
    if memory:
        kind = next((r["peak_memory_kind"] for r in records if "peak_memory_kind" in r), "")
        ax_mem = ax_speed.twinx()
        ax_mem.plot(*zip(*memory), color="tab:red")
        ax_mem.set_ylabel(f"peak MiB ({kind})" if kind else "peak MiB", color="tab:red")
    ax_speed.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
