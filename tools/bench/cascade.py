"""Whole cascade from a prompt to the last stage's image: time and peak memory of each stage.

    python tools/benchmark.py cascade --threads 2                      # imagen-tiny, 20/20/10 steps, 1024 px
    python tools/benchmark.py cascade --steps 2 2 1 --save out/        # quick check of the script

The default run is the freshly initialised imagen-tiny cascade (random weights cost the
same time as trained ones) with DPM-Solver++(2M) at 20, 20 and 10 steps, one 1024 px image.
Each stage is timed from its first to its last model evaluation, plus the upsampling and noise
augmentation before it. On a CPU, peak memory is the process's peak resident set size during
the stage (Linux ``VmHWM``, reset before each stage through ``/proc/self/clear_refs``); the
report also gives the resident size when the stage started. On CUDA it is the peak of
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import torch

from imagen.config import SAMPLERS, THRESHOLDING

_MIB = 1024 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="imagen-tiny", help="cascade config for fresh weights (default: imagen-tiny)")
    parser.add_argument("--cascade", metavar="DIR", help="time a saved cascade folder instead of fresh weights")
    parser.add_argument("--prompt", default="a red heart drawn on a white wall", help="prompt to generate")
    parser.add_argument("--batch-size", type=int, default=1, help="images generated at once (default 1)")
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 20, 10],
                        help="steps per stage, one value or one per stage (default: 20 20 10)")
    parser.add_argument("--sampler", default="dpmpp_2m", choices=SAMPLERS, help="sampler of every stage (default dpmpp_2m)")
    parser.add_argument("--guidance", type=float, nargs="+", default=None,
                        help="guidance scale, one or one per stage (default: each stage's config)")
    parser.add_argument("--thresholding", default=None, choices=THRESHOLDING,
                        help="x0 thresholding of every stage (default: each stage's config)")
    parser.add_argument("--stop-at-stage", default=None, help="last stage to run (name or 0-based index)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and of the images (default 0)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="U-Net dtype")
    parser.add_argument("--save", metavar="DIR", help="also write each stage's images as PNGs into DIR")


# --- peak memory ----------------------------------------------------------------------------------


def _read_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak RSS counter (VmHWM) of this process; return whether that worked."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


class _RssSampler(threading.Thread):
    """Fallback when VmHWM cannot be reset: poll the resident set size every 5 ms and keep the peak."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_kib = _read_status_kib("VmRSS") or 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(0.005):
            self.peak_kib = max(self.peak_kib, _read_status_kib("VmRSS") or 0)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak_kib


@contextlib.contextmanager
def measure(device: torch.device, record: dict) -> Iterator[None]:
    """Fill ``record`` with the seconds and peak memory (MiB) of the block."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start_bytes = torch.cuda.memory_allocated(device)
    start_rss = _read_status_kib("VmRSS")
    sampler = None if _reset_peak_rss() else _RssSampler()
    if sampler is not None:
        sampler.start()
    started = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    record["seconds"] = round(time.perf_counter() - started, 3)
    peak_kib = sampler.stop() if sampler is not None else _read_status_kib("VmHWM")
    record["rss_at_start_mib"] = round(start_rss / 1024, 1) if start_rss is not None else None
    record["peak_rss_mib"] = round(peak_kib / 1024, 1) if peak_kib else None
    record["peak_rss_method"] = "VmHWM reset per stage" if sampler is None else "RSS polled every 5 ms"
    if device.type == "cuda":
        record["cuda_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / _MIB, 1)
        record["cuda_allocated_at_start_mib"] = round(start_bytes / _MIB, 1)


# --- run ------------------------------------------------------------------------------------------


def _one_or_list(values: Optional[list]) -> object:
    if values is None:
        return None
    return values[0] if len(values) == 1 else values


def run(args: argparse.Namespace) -> dict:
    from imagen.images import to_pil
    from imagen.pipeline import ImagenPipeline
    from imagen.pipeline_inputs import make_generators

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    stop = int(args.stop_at_stage) if args.stop_at_stage and args.stop_at_stage.isdigit() else args.stop_at_stage

    load: dict = {}
    with measure(device, load):
        if args.cascade:
            pipeline = ImagenPipeline.from_pretrained(args.cascade, stop_at_stage=stop)
        else:
            pipeline = ImagenPipeline.from_config(args.config, seed=args.seed, stop_at_stage=stop)
        pipeline.to(device, getattr(torch, args.dtype))
    settings = pipeline.plan(
        num_inference_steps=_one_or_list(args.steps), sampler=args.sampler,
        guidance_scale=_one_or_list(args.guidance), thresholding=args.thresholding,
    )

    encode: dict = {}
    with measure(device, encode):
        text = pipeline.encode_prompt([args.prompt] * args.batch_size)
    generators, seeds = make_generators(args.batch_size, None, args.seed)

    stages = []
    images = None
    for index, stage_settings in enumerate(settings):
        record = {
            "name": stage_settings.name,
            "height": stage_settings.height,
            "width": stage_settings.width,
            "sampler": stage_settings.sampler,
            "num_steps": stage_settings.num_steps,
            "guidance_scale": stage_settings.guidance_scale,
            "parameters": sum(p.numel() for p in pipeline.unets[stage_settings.name].parameters()),
        }
        with measure(device, record):
            images = pipeline.sample_stage(index, text, stage_settings, generators, images, progress=False)
        # Guidance 1 runs one forward pass per step; any other scale runs a doubled batch.
        record["seconds_per_step"] = round(record["seconds"] / stage_settings.num_steps, 4)
        stages.append(record)
        if args.save:
            folder = Path(args.save)
            folder.mkdir(parents=True, exist_ok=True)
            for number, image in enumerate(to_pil(images)):
                image.save(folder / f"cascade-{stage_settings.name}-{number}.png")

    return {
        "benchmark": "cascade",
        "cascade": args.cascade or args.config,
        "random_weights": not args.cascade,
        "prompt": args.prompt,
        "batch_size": args.batch_size,
        "seeds": seeds,
        "device": str(device),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "load": load,
        "text_encoder": encode,
        "stages": stages,
        "total_sampling_seconds": round(sum(stage["seconds"] for stage in stages), 3),
    }
