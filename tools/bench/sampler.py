"""Sampler overhead per step, outside the model call, against one U-Net forward pass.

    python tools/benchmark.py sampler --batch-sizes 1 4 --threads 2

The overhead is the time of :func:`imagen.sampler.sample` with a model that returns a cached
prediction at once, divided by the number of steps. It is measured twice: with a plain
``model_fn`` and through :func:`imagen.sampler.guided_model_fn` (which doubles the batch). Each
is compared with the U-Net forward time at the batch the U-Net would run (B, and 2B with guidance).
The target is an overhead below 2% of the forward time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from imagen.config import SAMPLERS, THRESHOLDING, UNetConfig, load_cascade_config
from imagen.sampler import guided_model_fn, sample


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="imagen-tiny", help="cascade config name or JSON file (default: imagen-tiny)")
    parser.add_argument("--stage", default="base", help="stage whose U-Net, solver and step count are used (default: base)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4], help="batch sizes to measure (default: 1 4)")
    parser.add_argument("--solver", default=None, choices=SAMPLERS, help="ddpm, ddim or dpmpp_2m (default: the stage's sampler)")
    parser.add_argument("--num-steps", type=int, default=None, help="sampling steps per timed run (default: the stage's)")
    parser.add_argument("--thresholding", default="dynamic", choices=THRESHOLDING, help="dynamic, static or none (default: dynamic)")
    parser.add_argument("--text-length", type=int, default=32, help="text tokens given to the U-Net (default: 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement; the median is reported (default: 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--stand-in", action="store_true",
                        help="time a two-layer convolution in place of imagen.unet.EfficientUNet (to test this script)")


class StandInUNet(torch.nn.Module):
    """Two 3x3 convolutions with the U-Net's call signature, for when imagen.unet is not usable."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.inner = torch.nn.Sequential(
            torch.nn.Conv2d(cfg.in_channels, cfg.base_channels, 3, padding=1),
            torch.nn.SiLU(),
            torch.nn.Conv2d(cfg.base_channels, cfg.out_channels, 3, padding=1),
        )

    def forward(self, x, log_snr, text_embeds=None, text_mask=None, lowres_image=None, lowres_noise_level=None):
        return self.inner(x)


def _build_model(cfg: UNetConfig, stand_in: bool) -> tuple[torch.nn.Module, str]:
    if stand_in:
        return StandInUNet(cfg), "stand-in (two convolutions)"
    from imagen.unet import EfficientUNet

    return EfficientUNet(cfg), "imagen.unet.EfficientUNet"


def _median_seconds(function: Callable[[], object], repeats: int, device: torch.device) -> float:
    function()  # warm-up: allocator, kernels, lazy initialisation
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        function()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(args: argparse.Namespace) -> dict:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    stage = load_cascade_config(args.config).stage(args.stage)
    solver = args.solver or stage.sampler
    num_steps = args.num_steps or stage.num_steps
    model, model_name = _build_model(stage.unet, args.stand_in)
    model = model.to(device).eval()
    resolution = stage.resolution
    channels = stage.unet.in_channels

    def conditioning(batch: int, text: bool) -> dict:
        generator = torch.Generator().manual_seed(batch)
        kwargs = {
            "text_embeds": torch.randn(batch, args.text_length, stage.unet.text_embed_dim, generator=generator).to(device),
            "text_mask": torch.ones(batch, args.text_length, dtype=torch.bool, device=device),
        }
        if not text:
            kwargs = {"text_embeds": torch.zeros_like(kwargs["text_embeds"]), "text_mask": ~kwargs["text_mask"]}
        if stage.is_super_resolution:
            kwargs["lowres_image"] = torch.zeros(batch, channels, resolution, resolution, device=device)
            kwargs["lowres_noise_level"] = torch.full((batch,), stage.sample_noise_aug_level, device=device)
        return kwargs

    def forward_seconds(batch: int) -> float:
        x = torch.randn(batch, channels, resolution, resolution, device=device)
        log_snr = torch.zeros(batch, device=device)
        kwargs = conditioning(batch, text=True)
        with torch.no_grad():
            return _median_seconds(lambda: model(x, log_snr, **kwargs), args.repeats, device)

    def sampler_seconds_per_step(batch: int, guided: bool) -> float:
        shape = (batch, channels, resolution, resolution)
        cached = torch.randn(2 * batch if guided else batch, *shape[1:], device=device)

        def instant(x, log_snr, **kwargs):
            return cached

        model_fn = instant
        if guided:
            model_fn = guided_model_fn(instant, conditioning(batch, True), conditioning(batch, False), 5.0)
        generators = [torch.Generator(device=device).manual_seed(seed) for seed in range(batch)]

        def draw():
            return sample(model_fn, shape, diffusion=stage.diffusion, solver=solver, num_steps=num_steps,
                          thresholding=args.thresholding, generators=generators, device=device, progress=False)

        with torch.no_grad():
            return _median_seconds(draw, args.repeats, device) / num_steps

    results = []
    for batch in args.batch_sizes:
        forward = forward_seconds(batch)
        forward_guided = forward_seconds(2 * batch)
        overhead = sampler_seconds_per_step(batch, guided=False)
        overhead_guided = sampler_seconds_per_step(batch, guided=True)
        results.append({
            "batch_size": batch,
            "unet_forward_ms": round(forward * 1e3, 3),
            "unet_forward_2x_batch_ms": round(forward_guided * 1e3, 3),
            "sampler_overhead_ms_per_step": round(overhead * 1e3, 4),
            "guided_sampler_overhead_ms_per_step": round(overhead_guided * 1e3, 4),
            "overhead_ratio": round(overhead / forward, 5),
            "guided_overhead_ratio": round(overhead_guided / forward_guided, 5),
        })
    return {
        "topic": "sampler",
        "config": args.config,
        "stage": args.stage,
        "model": model_name,
        "resolution": resolution,
        "solver": solver,
        "num_steps": num_steps,
        "thresholding": args.thresholding,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "target_ratio": 0.02,
        "results": results,
    }
