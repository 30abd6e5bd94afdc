"""Train or fine-tune one stage of a cascade with accelerate: resumable, exact and multi-process.

:class:`Trainer` builds everything from :class:`TrainOptions`; ``python -m imagen.train`` is its
command line. One training step consumes ``batch_size * processes * accumulation`` samples. The
optimizer, the learning-rate schedule, the EMA and the step counter advance once per step, after
the last micro-batch, when gradients are synchronised.

Exactness: the data order, the crops, the noise, the timesteps, the caption dropout and the
global RNG are pure functions of ``(seed, step, sample position)`` (see
:class:`imagen.data.StepBatchSampler` and :mod:`imagen.training_step`), so a run resumed from
a checkpoint continues bit for bit like an uninterrupted one on a deterministic device.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from imagen import cascade_folder
from imagen.caption_embeddings import CaptionEmbeddings
from imagen.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from imagen.config import CascadeConfig, StageConfig, TextEncoderConfig, load_cascade_config, load_json_config, to_dict
from imagen.data import (ImageCaptionFolder, ImageSpec, StepBatchSampler, collate_samples, derive_seed,
                         read_caption_records, sample_position)
from imagen.ema import ExponentialMovingAverage
from imagen.previews import sample_stage, write_preview
from imagen.shards import ShardStream, list_shards
from imagen.text_encoder import EmbeddingCache, FrozenTextEncoder
from imagen.training_step import draw_sample_noise, stage_loss

logger = logging.getLogger(__name__)

MIXED_PRECISION = ("no", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainOptions:
    """Settings of one training run; ``python -m imagen.train --help`` describes each."""

    stage: str
    output: Path
    config: Optional[str | Path | CascadeConfig] = None
    data: Optional[Path] = None
    shards: Optional[Path] = None
    split: Optional[str] = None
    text_encoder: Optional[str] = None
    text_cache: Optional[Path] = None
    init_from: Optional[Path] = None
    export: Optional[Path] = None
    export_at_end: bool = True
    resume: Optional[str] = None
    steps: int = 1000
    batch_size: int = 8
    accumulation: int = 1
    lr: float = 1e-4
    warmup_steps: int = 100
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: Optional[float] = 1.0
    mixed_precision: str = "no"
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    caption_dropout: float = 0.1
    checkpoint_every: int = 500
    keep_checkpoints: Optional[int] = 3
    log_every: int = 50
    sample_every: int = 0
    sample_prompts: tuple[str, ...] = ()
    num_samples: int = 4
    sample_steps: Optional[int] = None
    seed: int = 0
    num_workers: int = 2
    shuffle_buffer: int = 256
    channels_last: bool = True
    progress: bool = True

    def validate(self) -> None:
        """Raise ValueError naming the first invalid option and its valid range."""
        positive = {"steps": self.steps, "batch_size": self.batch_size, "accumulation": self.accumulation,
                    "checkpoint_every": self.checkpoint_every, "log_every": self.log_every, "num_samples": self.num_samples}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"invalid --{name.replace('_', '-')} {value}: expected an integer >= 1")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ValueError(f"invalid --lr {self.lr}: expected a float > 0")
        if self.warmup_steps < 0 or self.sample_every < 0 or self.num_workers < 0:
            raise ValueError(f"invalid --warmup-steps {self.warmup_steps}, --sample-every {self.sample_every} or "
                             f"--num-workers {self.num_workers}: expected integers >= 0")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"invalid --lr-schedule {self.lr_schedule!r}: expected one of {LR_SCHEDULES}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"invalid --caption-dropout {self.caption_dropout}: expected a probability in [0, 1]")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"invalid --grad-clip {self.grad_clip}: expected a norm > 0, or 0 on the command line to turn clipping off")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"invalid --mixed-precision {self.mixed_precision!r}: expected one of {MIXED_PRECISION}")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ValueError(f"invalid --keep-checkpoints {self.keep_checkpoints}: expected an integer >= 1")
        if (self.data is None) == (self.shards is None):
            raise ValueError("pass exactly one of --data (a folder of captioned images) and --shards (WebDataset .tar files)")
        if self.config is None and self.init_from is None:
            raise ValueError("no cascade given: pass --config (a shipped cascade name or a JSON file) or --init-from CASCADE_DIR")


# Sampling defaults of a stage: they do not change training, so a resumed run may differ in them.
SAMPLING_KEYS = ("sample_noise_aug_level", "guidance_scale", "sampler", "num_steps", "thresholding")


def _training_fields(stage: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in stage.items() if key not in SAMPLING_KEYS}


class TrainerState:
    """Step counter and run identity, saved in every checkpoint.

    Loading a state whose seed, global batch or stage config (other than its sampling defaults,
    ``SAMPLING_KEYS``) differs from the current run raises, because the resumed run could not
    continue the same data order and model.
    """

    def __init__(self, seed: int, global_batch: int, stage: StageConfig, num_processes: int):
        self.step = 0
        self.images_seen = 0
        self.seed, self.global_batch, self.num_processes = seed, global_batch, num_processes
        self.stage = to_dict(stage)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "images_seen": self.images_seen, "seed": self.seed, "global_batch": self.global_batch,
                "stage": self.stage, "num_processes": self.num_processes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [key for key in ("step", "images_seen", "seed", "global_batch", "stage") if key not in state]
        if missing:
            raise KeyError(f"trainer state lacks {missing}: the checkpoint is incomplete")
        for key, current in (("seed", self.seed), ("global_batch", self.global_batch)):
            if state[key] != current:
                raise ValueError(f"checkpoint has {key} {state[key]}, this run {current}: resume with the same --seed and "
                                 f"batch_size * processes * accumulation, or start a new --output")
        difference = cascade_folder.first_difference(_training_fields(state["stage"]), _training_fields(self.stage))
        if difference is not None:
            raise ValueError(f"checkpoint stage config differs at key '{difference[0]}' ({difference[1]!r} in the checkpoint, "
                             f"{difference[2]!r} now): resume with the same cascade config, or fine-tune with --init-from")
        self.step, self.images_seen = int(state["step"]), int(state["images_seen"])


def lr_factor(warmup_steps: int, total_steps: int, schedule: str = "constant") -> Callable[[int], float]:
    """Return the learning-rate multiplier in [0, 1] as a function of the 0-based optimizer step.

    Warm-up is linear from ``1 / warmup_steps`` to 1 over the first ``warmup_steps`` steps.
    After it, "constant" keeps 1, and "cosine" follows half a cosine from 1 down to 0 at
    step ``total_steps``, so the last step (``total_steps - 1``) still trains at a small
    positive rate. A run resumed with another ``--steps`` follows the new cosine from the
    resumed step on.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"invalid learning-rate schedule {schedule!r}: expected one of {LR_SCHEDULES}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        decay_steps = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps + 1) / (decay_steps + 1))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_accelerator(mixed_precision: str = "no") -> Accelerator:
    """Create the run's Accelerator: on the CPU (gloo between processes) when no CUDA device is present.

    The learning-rate scheduler steps once per optimizer step, whatever the number of processes.
    """
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision,
                       step_scheduler_with_optimizer=False)


def load_run_config(options: TrainOptions) -> CascadeConfig:
    """Load the cascade (``--config``, else the one in ``--init-from``) and apply ``--text-encoder``."""
    if options.config is not None:
        config = options.config if isinstance(options.config, CascadeConfig) else load_cascade_config(options.config)
    else:
        config = cascade_folder.read_cascade(options.init_from)
    if options.init_from is not None:
        config = dataclasses.replace(config, text_encoder=cascade_folder.resolve_text_encoder(options.init_from, config.text_encoder))
    if options.text_encoder is not None:
        override = Path(options.text_encoder)
        if override.suffix == ".json" and override.is_file():
            encoder = load_json_config(TextEncoderConfig, override)
        else:
            encoder = dataclasses.replace(config.text_encoder, name=options.text_encoder)
        stages = tuple(dataclasses.replace(stage, unet=dataclasses.replace(stage.unet, text_embed_dim=encoder.dim))
                       for stage in config.stages)
        config = dataclasses.replace(config, text_encoder=encoder, stages=stages)
    config.stage(options.stage)  # raises KeyError naming the stages there are
    return config


class Trainer:
    """One stage's training run: data, text embeddings, U-Net, AdamW, EMA, checkpoints, previews, export."""

    def __init__(self, options: TrainOptions, accelerator: Optional[Accelerator] = None):
        options.validate()
        self.options = options
        self.accelerator = accelerator or build_accelerator(options.mixed_precision)
        self.output = Path(options.output)
        self.cascade = load_run_config(options)
        self.stage = self.cascade.stage(options.stage)
        self.spec = ImageSpec.from_stage(self.stage)
        acc = self.accelerator
        self.global_batch = options.batch_size * acc.num_processes * options.accumulation
        self.state = TrainerState(options.seed, self.global_batch, self.stage, acc.num_processes)
        self.skipped: set[str] = set()
        self.step_times: list[float] = []

        self.dataset = self._build_dataset()
        self.text = self._build_text()
        self._build_model()
        if options.resume is not None:
            self._resume(options.resume)

    # --- set-up --------------------------------------------------------------------------------

    def _build_dataset(self) -> ImageCaptionFolder | list[Path]:
        if self.options.data is not None:
            dataset = ImageCaptionFolder(self.options.data, self.spec, split=self.options.split)
            logger.info("data: %d captioned images in %s", len(dataset), dataset.folder)
            return dataset
        shards = list_shards(self.options.shards)
        logger.info("data: %d WebDataset shards in %s", len(shards), self.options.shards)
        return shards

    def _build_text(self) -> CaptionEmbeddings:
        """Load the encoder and fill the embedding cache, on the main process first; the others then read it."""
        acc = self.accelerator
        encoder = FrozenTextEncoder.from_config(self.cascade.text_encoder, device=acc.device)
        cache = EmbeddingCache(self.options.text_cache or self.output / "text_cache", encoder)
        text = CaptionEmbeddings(cache, write_cache=acc.is_main_process)
        self.preview_prompts, self.preview_lowres, self.preview_reference = self._preview_inputs()
        captions = list(self.preview_prompts)
        if isinstance(self.dataset, ImageCaptionFolder):
            captions += self.dataset.captions
        with acc.main_process_first():
            text.precompute(captions)
        return text

    def _preview_inputs(self) -> tuple[list[str], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Choose the fixed preview prompts and, for super-resolution, their low-resolution inputs.

        Only the main process samples previews; the others get no prompts. Held-out images (a
        split other than ``--split`` in captions.jsonl) come first, then training images.
        """
        options, count = self.options, self.options.num_samples
        if not options.sample_every or not self.accelerator.is_main_process:
            return [], None, None
        if options.sample_prompts and not self.stage.is_super_resolution:
            return list(options.sample_prompts)[:count], None, None
        items = []
        preview_spec = dataclasses.replace(self.spec, crop=None)
        if isinstance(self.dataset, ImageCaptionFolder):
            records = self.dataset.records
            if options.split is not None:
                held_out = [r for r in read_caption_records(self.dataset.folder) if r.split != options.split]
                records = held_out + records
            preview_data = ImageCaptionFolder(self.dataset.folder, preview_spec, records=records[:max(count, 1) * 4])
            items = [preview_data[(index, 0)] for index in range(min(count, len(preview_data)))]
        else:
            stream = ShardStream(self.dataset, preview_spec, seed=options.seed, epochs=1, shuffle_buffer=1)
            for item in stream.slot_stream(0, 1):
                items.append(item)
                if len(items) == count:
                    break
        prompts = list(options.sample_prompts)[:count] or [item["caption"] for item in items]
        if not self.stage.is_super_resolution:
            return prompts, None, None
        lowres = torch.stack([item["lowres"] for item in items])[:len(prompts)]
        reference = torch.stack([item["image"] for item in items])[:len(prompts)]
        return prompts[:len(lowres)], lowres, reference

    def _build_model(self) -> None:
        from imagen.unet import EfficientUNet

        options, acc = self.options, self.accelerator
        torch.manual_seed(derive_seed(options.seed, "init"))  # the same initial weights on every process and run
        model = EfficientUNet(self.stage.unet)
        if options.init_from is not None:
            _, weights = cascade_folder.read_stage(options.init_from, self.stage.name)
            model.load_state_dict(weights, strict=True)
            logger.info("initialised stage %s from %s", self.stage.name, options.init_from)
        self.memory_format = torch.channels_last if options.channels_last else torch.contiguous_format
        model = model.to(acc.device, memory_format=self.memory_format)
        self.ema = ExponentialMovingAverage(model, options.ema_decay, options.ema_warmup)
        optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, betas=options.adam_betas,
                                      eps=options.adam_eps, weight_decay=options.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_factor(options.warmup_steps, options.steps, options.lr_schedule))
        self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        acc.register_for_checkpointing(self.ema, self.state)
        count = sum(parameter.numel() for parameter in model.parameters())
        logger.info("stage %s: %.2f M parameters, %d process(es), global batch %d (%d x %d processes x %d accumulation)",
                    self.stage.name, count / 1e6, acc.num_processes, self.global_batch, options.batch_size,
                    acc.num_processes, options.accumulation)

    def _resume(self, resume: str) -> None:
        folder = latest_checkpoint(self.output / "checkpoints") if resume == "latest" else Path(resume)
        if folder is None:
            logger.info("--resume latest: no checkpoint in %s yet, starting at step 0", self.output / "checkpoints")
            return
        load_checkpoint(self.accelerator, folder)
        logger.info("resumed from %s at step %d", folder, self.state.step)

    # --- data ----------------------------------------------------------------------------------

    def batches(self, start_step: int) -> Iterator[dict[str, Any]]:
        """Yield this process's micro-batches from ``start_step`` to the end of the run."""
        options, acc = self.options, self.accelerator
        if isinstance(self.dataset, ImageCaptionFolder):
            sampler = StepBatchSampler(len(self.dataset), seed=options.seed, batch_size=options.batch_size,
                                       accumulation=options.accumulation, rank=acc.process_index,
                                       world_size=acc.num_processes, start_step=start_step, total_steps=options.steps)
            loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=options.num_workers,
                                collate_fn=collate_samples, pin_memory=acc.device.type == "cuda")
        else:
            stream = ShardStream(self.dataset, self.spec, seed=options.seed, rank=acc.process_index,
                                 world_size=acc.num_processes, shuffle_buffer=options.shuffle_buffer,
                                 batch_size=options.batch_size, skip_batches=start_step * options.accumulation)
            loader = DataLoader(stream, batch_size=options.batch_size, num_workers=options.num_workers,
                                collate_fn=collate_samples, pin_memory=acc.device.type == "cuda")
        return iter(loader)

    def _note_skipped(self, skipped: list[tuple[str, str]]) -> None:
        """Count unusable images; the main process logs each of its own, the log lines every process's count."""
        for name, reason in skipped:
            if name not in self.skipped:
                self.skipped.add(name)
                if self.accelerator.is_main_process:
                    logger.warning("skipped %s (%d skipped so far on this process)", reason, len(self.skipped))

    # --- training ------------------------------------------------------------------------------

    def micro_batch_loss(self, batch: dict[str, Any], step: int, micro: int) -> torch.Tensor:
        """Return the mean diffusion loss of one micro-batch of ``step``."""
        options, acc = self.options, self.accelerator
        device = acc.device
        images = batch["image"].to(device, non_blocking=True)
        lowres = batch["lowres"].to(device, non_blocking=True) if batch["lowres"] is not None else None
        seeds = [derive_seed(options.seed, "noise", step,
                             sample_position(micro, row, acc.process_index, acc.num_processes, options.batch_size))
                 for row in range(images.shape[0])]
        noise = draw_sample_noise(seeds, images.shape, self.stage, options.caption_dropout)
        embeds, mask = self.text.lookup(batch["caption"], device)
        losses = stage_loss(self.model, self.stage, images, lowres, embeds, mask, noise, self.memory_format)
        return losses.mean()

    def accumulate_gradients(self, batches: Iterator[dict[str, Any]]) -> torch.Tensor:
        """Run the micro-batches of the current step forward and backward; return the mean loss.

        Gradients are synchronised between processes only in the last micro-batch.
        """
        acc, accumulation = self.accelerator, self.options.accumulation
        step = self.state.step
        # Anything inside the model that draws from the global RNG (dropout) depends on (seed, step, rank) only.
        torch.manual_seed(derive_seed(self.options.seed, "global", step, acc.process_index))
        total = torch.zeros((), device=acc.device)
        for micro in range(accumulation):
            batch = next(batches)
            self._note_skipped(batch["skipped"])
            synchronise = micro == accumulation - 1
            with contextlib.nullcontext() if synchronise else acc.no_sync(self.model):
                loss = self.micro_batch_loss(batch, step, micro)
                acc.backward(loss / accumulation)
            total += loss.detach()
        return total / accumulation

    def train_step(self, batches: Iterator[dict[str, Any]]) -> torch.Tensor:
        """Run one training step (all micro-batches, then the update); return the mean loss on this process."""
        loss = self.accumulate_gradients(batches)
        self.apply_update()
        return loss

    def apply_update(self) -> None:
        """Clip the accumulated gradients, step the optimizer, the schedule and the EMA, and count the step."""
        if self.options.grad_clip is not None:
            self.accelerator.clip_grad_norm_(self.model.parameters(), self.options.grad_clip)
        self.optimizer.step()
        # NOTE: with fp16, a step that the gradient scaler skips (overflow) still advances the schedule and the EMA.
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.accelerator.unwrap_model(self.model))
        self.state.step += 1
        self.state.images_seen += self.global_batch

    def fit(self) -> dict[str, Any]:
        """Train to ``options.steps``, checkpointing, logging and sampling on the way; then export."""
        options, acc = self.options, self.accelerator
        target = self.export_target()
        if target is not None and (target / cascade_folder.CASCADE_FILE).is_file():
            self._check_listed_stage(target, target)  # fail before training, not after it
        start = self.state.step
        batches = self.batches(start)
        progress = tqdm(total=options.steps, initial=start, desc=f"train {self.stage.name}", dynamic_ncols=True,
                        disable=not (options.progress and acc.is_main_process))
        window_loss, window_steps, images_per_second = 0.0, 0, 0.0
        while self.state.step < options.steps:
            started = time.perf_counter()
            loss = self.train_step(batches)
            elapsed = time.perf_counter() - started
            self.step_times.append(elapsed)
            step = self.state.step
            current = self.global_batch / elapsed
            images_per_second = current if not images_per_second else 0.9 * images_per_second + 0.1 * current
            window_loss, window_steps = window_loss + float(loss), window_steps + 1
            lr = self.scheduler.get_last_lr()[0]
            progress.update(1)
            progress.set_postfix(loss=f"{float(loss):.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_second:.1f}")

            if step % options.log_every == 0 or step == options.steps:
                self._log(step, window_loss / window_steps, lr, images_per_second)
                window_loss, window_steps = 0.0, 0
            if step % options.checkpoint_every == 0 or step == options.steps:
                save_checkpoint(acc, self.output / "checkpoints", step, options.keep_checkpoints)
            if options.sample_every and (step % options.sample_every == 0 or step == options.steps):
                self.write_samples(step)
        progress.close()
        if start >= options.steps:
            logger.info("nothing to train: the checkpoint is at step %d, --steps is %d", start, options.steps)
        if target is not None:
            self.export(target)
        return {"step": self.state.step, "images_seen": self.state.images_seen, "skipped": len(self.skipped)}

    def _log(self, step: int, mean_loss: float, lr: float, images_per_second: float) -> None:
        """Log averaged metrics on the main process; every process must call this (it reduces across them)."""
        acc = self.accelerator
        metrics = torch.tensor([mean_loss, float(len(self.skipped))], device=acc.device)
        metrics = acc.reduce(metrics, reduction="sum")
        loss = float(metrics[0]) / acc.num_processes
        if acc.is_main_process:
            logger.info("step %d/%d: loss %.4f, lr %.3g, %.1f images/s, %d images seen, %d skipped",
                        step, self.options.steps, loss, lr, images_per_second, self.state.images_seen, int(metrics[1]))

    # --- outputs -------------------------------------------------------------------------------

    def write_samples(self, step: int) -> Optional[Path]:
        """Sample the preview prompts with the EMA weights and write ``OUTPUT/samples/step-N.png`` (main process only)."""
        if not self.accelerator.is_main_process or not self.preview_prompts:
            return None
        embeds, mask = self.text.lookup(self.preview_prompts, self.accelerator.device)
        generators = [torch.Generator().manual_seed(derive_seed(self.options.seed, "preview", index))
                      for index in range(len(self.preview_prompts))]
        autocast = torch.bfloat16 if self.options.mixed_precision == "bf16" else None
        samples = sample_stage(self.ema.model, self.stage, embeds, mask, self.preview_lowres, generators,
                               num_steps=self.options.sample_steps, autocast_dtype=autocast)
        path = write_preview(self.output / "samples" / f"step-{step:08d}.png", samples.cpu(),
                             self.preview_lowres, self.preview_reference)
        logger.info("wrote samples %s for prompts %s", path, self.preview_prompts)
        return path

    def export_target(self) -> Optional[Path]:
        """Return the cascade folder that :meth:`fit` exports to at the end, or None for no export."""
        if self.options.export is not None:
            return Path(self.options.export)
        return self.output / "cascade" if self.options.export_at_end else None

    def export(self, folder: Path) -> Optional[Path]:
        """Write the EMA weights of the stage into cascade folder ``folder`` (main process only).

        A new folder gets ``cascade.json`` and, when fine-tuning, a copy of the ``--init-from``
        folder, so the other stages stay byte-identical. If this run's stage config differs from
        the one ``--init-from`` lists (a fine-tune with another loss weighting, say), the copied
        ``cascade.json`` lists this run's config instead. An existing folder must already list
        this stage with the same config; only this stage's files are replaced.
        """
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return None
        folder = Path(folder)
        init_from = self.options.init_from
        if (folder / cascade_folder.CASCADE_FILE).is_file():
            self._check_listed_stage(folder, folder)
        elif init_from is not None and Path(init_from).resolve() != folder.resolve():
            shutil.copytree(init_from, folder, dirs_exist_ok=True)
            self._list_this_stage(folder)
        else:
            cascade_folder.write_cascade_config(folder, self.cascade)
        cascade_folder.write_stage(folder, self.stage, self.ema.weights())
        logger.info("exported the EMA weights of stage %s to %s", self.stage.name, folder)
        return folder


    def _list_this_stage(self, folder: Path) -> None:
        """Make ``folder/cascade.json`` list this run's stage config in place of the one it lists."""
        cascade = cascade_folder.read_cascade(folder)
        difference = cascade_folder.first_difference(to_dict(cascade.stage(self.stage.name)), to_dict(self.stage))
        if difference is None:
            return
        stages = tuple(self.stage if stage.name == self.stage.name else stage for stage in cascade.stages)
        cascade_folder.write_cascade_config(folder, dataclasses.replace(cascade, stages=stages))
        logger.info("stage %s of %s differs from --init-from at key '%s' (%r there, %r in this run): "
                    "the exported cascade.json lists this run's config", self.stage.name, folder, *difference)

    def _check_listed_stage(self, source: Path, folder: Path) -> None:
        """Raise ValueError unless ``source/cascade.json`` lists this stage with the same config."""
        try:
            listed = cascade_folder.read_cascade(source).stage(self.stage.name)
        except KeyError as error:
            raise ValueError(f"cannot export stage {self.stage.name!r} into {folder}: {error}") from None
        difference = cascade_folder.first_difference(to_dict(listed), to_dict(self.stage))
        if difference is not None:
            raise ValueError(f"cannot export stage {self.stage.name!r} into {folder}: {source / cascade_folder.CASCADE_FILE} "
                             f"differs at key '{difference[0]}' ({difference[1]!r} there, {difference[2]!r} in this run); "
                             f"export into a new folder with --export")


def train(options: TrainOptions, accelerator: Optional[Accelerator] = None) -> dict[str, Any]:
    """Build a :class:`Trainer` and run it; return the final step, images seen and skipped count."""
    return Trainer(options, accelerator).fit()
