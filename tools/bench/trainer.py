"""Training throughput of the trainer against the bare U-Net training step.

    python tools/benchmark.py trainer --batch-size 8 --steps 20 --threads 2

The bare step is the forward pass, the diffusion loss, the backward pass and the AdamW step of
the stage's U-Net on tensors already in memory. The trainer step adds everything else that a
real run does each step: reading, decoding and resizing images in loader workers, looking up the
text embeddings, drawing per-sample noise, caption dropout, gradient clipping, the learning-rate
schedule and the EMA update. Both use the same U-Net, batch and memory format. The target is a
trainer throughput within 10% of the bare step. Images are synthetic PNGs at the stage's
resolution, written to a temporary folder; checkpoints, logs and sample grids are off.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from imagen.config import load_cascade_config
from imagen.data import ImageSpec
from imagen.training_step import draw_sample_noise, stage_loss


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="imagen-tiny", help="cascade config name or JSON file (default: imagen-tiny)")
    parser.add_argument("--stage", default="base", help="stage to train (default: base)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (default: 8)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each kind (default: 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (default: 3)")
    parser.add_argument("--num-workers", type=int, default=2, help="data loader workers of the trainer (default: 2)")
    parser.add_argument("--images", type=int, default=64, help="synthetic images in the data folder (default: 64)")
    parser.add_argument("--text-encoder", default=None, help="text encoder override, as --text-encoder of imagen.train")
    parser.add_argument("--mixed-precision", default="no", choices=("no", "bf16"), help="autocast of both runs (default: no)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _write_images(folder: Path, count: int, size: int) -> None:
    """Write ``count`` smooth random RGB images of ``size`` px with .txt captions."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        coarse = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((size, size), Image.BICUBIC).save(folder / f"{index:05d}.png")
        (folder / f"{index:05d}.txt").write_text(f"synthetic picture number {index} in {('red', 'green', 'blue')[index % 3]}")


def _bare_step_times(stage, batch_size: int, text_dim: int, steps: int, warmup: int, autocast: bool) -> list[float]:
    """Time forward, loss, backward and AdamW step of the U-Net on fixed in-memory tensors."""
    from imagen.unet import EfficientUNet

    torch.manual_seed(0)
    model = EfficientUNet(stage.unet).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    spec = ImageSpec.from_stage(stage)
    size, lowres_size = spec.output_size, spec.lowres_output_size
    images = torch.rand(batch_size, 3, size, size) * 2 - 1
    lowres = torch.rand(batch_size, 3, lowres_size, lowres_size) * 2 - 1 if lowres_size else None
    embeds = torch.randn(batch_size, 16, text_dim)
    mask = torch.ones(batch_size, 16, dtype=torch.bool)
    noise = draw_sample_noise(list(range(batch_size)), images.shape, stage, caption_dropout=0.1)
    times = []
    for index in range(warmup + steps):
        started = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = stage_loss(model, stage, images, lowres, embeds, mask, noise, torch.channels_last).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index >= warmup:
            times.append(time.perf_counter() - started)
    return times


def _trainer_step_times(args: argparse.Namespace, data: Path, output: Path) -> list[float]:
    from accelerate.state import AcceleratorState

    from imagen.trainer import TrainOptions, Trainer

    AcceleratorState._reset_state(reset_partial_state=True)
    options = TrainOptions(stage=args.stage, output=output, config=args.config, data=data, text_encoder=args.text_encoder,
                           steps=args.warmup + args.steps, batch_size=args.batch_size, num_workers=args.num_workers,
                           mixed_precision=args.mixed_precision, checkpoint_every=10**9, log_every=10**9,
                           export_at_end=False, progress=False)
    trainer = Trainer(options)
    trainer.fit()
    return trainer.step_times[args.warmup:]


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    cascade = load_cascade_config(args.config)
    stage = cascade.stage(args.stage)
    with tempfile.TemporaryDirectory(prefix="imagen-bench-trainer-") as folder:
        data = Path(folder) / "data"
        _write_images(data, args.images, stage.resolution)
        trainer_times = _trainer_step_times(args, data, Path(folder) / "run")
        text_dim = cascade.text_encoder.dim
        if args.text_encoder is not None:
            from imagen.trainer import TrainOptions, load_run_config

            overridden = load_run_config(TrainOptions(stage=args.stage, output=Path(folder), config=args.config,
                                                      data=data, text_encoder=args.text_encoder))
            stage, text_dim = overridden.stage(args.stage), overridden.text_encoder.dim
        bare_times = _bare_step_times(stage, args.batch_size, text_dim, args.steps, args.warmup,
                                      args.mixed_precision == "bf16")
    bare = args.batch_size / statistics.median(bare_times)
    trainer = args.batch_size / statistics.median(trainer_times)
    return {
        "config": args.config,
        "stage": args.stage,
        "batch_size": args.batch_size,
        "timed_steps": args.steps,
        "num_workers": args.num_workers,
        "mixed_precision": args.mixed_precision,
        "threads": torch.get_num_threads(),
        "bare_images_per_second": round(bare, 3),
        "trainer_images_per_second": round(trainer, 3),
        "trainer_over_bare": round(trainer / bare, 4),
        "within_10_percent": trainer >= 0.9 * bare,
        "bare_step_seconds_median": round(statistics.median(bare_times), 5),
        "trainer_step_seconds_median": round(statistics.median(trainer_times), 5),
    }
