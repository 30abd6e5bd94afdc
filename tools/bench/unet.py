"""U-Net training and sampling speed, FLOPs and memory, per stage and against reference U-Nets.

    python tools/benchmark.py unet --cascade imagen-tiny --batch-size 8 --threads 2

For each stage of the cascade and each precision, one fresh subprocess builds the U-Net and
AdamW. It runs ``--warmup`` untimed and ``--steps`` timed training steps (forward, MSE loss,
backward, optimizer step) and sampling steps (forward under ``torch.inference_mode``). Then it
counts FLOPs with ``torch.utils.flop_counter.FlopCounterMode``: convolutions, matrix products
and attention count, norms and elementwise ops do not. Precisions: ``fp32`` and ``bf16``
(``torch.autocast`` to bfloat16 with float32 weights); both use channels_last model and input
unless ``--memory-format contiguous``.

Memory is the subprocess's peak resident set size (``ru_maxrss``), reported in total and above
the RSS measured just before the first step, when imports, model, inputs and the AdamW object
already exist. The second figure is the training working set (activations, gradients, optimizer
state, allocator slack) and is the one compared between models.

The reference comparison (``--references``) trains ``ours`` (imagen.unet.EfficientUNet at
the references' widths, depth and attention levels), diffusers' IF-style UNet2DConditionModel
and imagen-pytorch's Unet at 64 px with random 77-token, 512-wide text embeddings, in the
same way, and measures the machine's bfloat16 channels_last convolution throughput (3x3
convolutions, forward and backward) in the same run. See tools/bench/unet_references.py.
Run it on an otherwise idle machine: other load changes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

PRECISIONS = ("fp32", "bf16")
MEMORY_FORMATS = ("channels_last", "contiguous")
TOOLS_DIR = Path(__file__).resolve().parent.parent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from bench.unet_references import REFERENCES

    parser.add_argument("--cascade", default="imagen-tiny", help="cascade config name or JSON file (default: imagen-tiny)")
    parser.add_argument("--stages", nargs="*", default=None,
                        help="stage names to measure (default: all stages; pass none to skip stage measurements)")
    parser.add_argument("--references", nargs="*", default=list(REFERENCES),
                        help=f"reference U-Nets to compare at 64 px, from {list(REFERENCES)} (default: all; none to skip)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per step (default: 8)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in each subprocess (default: 2)")
    parser.add_argument("--steps", type=int, default=5, help="timed training and sampling steps each (default: 5)")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps before timing; the first ones allocate AdamW state and oneDNN kernels (default: 2)")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS,
                        help="fp32 and/or bf16 autocast (default: both)")
    parser.add_argument("--memory-format", default="channels_last", choices=MEMORY_FORMATS,
                        help="memory format of models and inputs (default: channels_last)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the reference comparison this many times, alternating models, and keep each "
                             "model's fastest round: less sensitive to other load on the machine (default: 1)")
    parser.add_argument("--text-length", type=int, default=77, help="text tokens per prompt (default: 77)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image size for stage measurements (default: the stage's train_crop, else its resolution)")


# --- measurements (run inside the worker subprocess) ----------------------------------------------


def _flop_mapping() -> dict:
    """FLOP formulas for PyTorch's CPU flash-attention kernels, which FlopCounterMode does not count itself."""
    import torch
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    return {
        aten._scaled_dot_product_flash_attention_for_cpu: (
            lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop_count(query, key, value)
        ),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: (
            lambda grad_out, query, key, value, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(
                grad_out, query, key, value
            )
        ),
    }


def _time_calls(fn: Callable[[], Any], warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_model(model, forward, inputs: dict, precision: str, memory_format: str, warmup: int, steps: int) -> dict:
    """Time training and sampling steps of ``model`` and count their FLOPs; see the module docstring."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    batch = inputs["x"].shape[0]
    if memory_format == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        inputs = {**inputs, "x": inputs["x"].contiguous(memory_format=torch.channels_last)}
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)  # one kernel per step, for every model
    target = torch.randn_like(inputs["x"])
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")  # noqa: E731

    def train_step():
        with autocast():
            out = forward(model, **inputs)
        loss = torch.nn.functional.mse_loss(out.float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sample_step():
        with torch.inference_mode(), autocast():
            forward(model, **inputs)

    rss_start = _rss_bytes()
    train_times = _time_calls(train_step, warmup, steps)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sample_times = _time_calls(sample_step, warmup, steps)

    # FLOPs do not depend on the precision, so they are counted in float32. Under autocast,
    # FlopCounterMode's decompositions can miss autocast's casts, and imagen-pytorch's einsum then
    # fails on mixed dtypes.
    with FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as counter:
        out = forward(model, **inputs)
        torch.nn.functional.mse_loss(out.float(), target).backward()
    train_flops = counter.get_total_flops()
    optimizer.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as counter:
        with torch.inference_mode():
            forward(model, **inputs)
    sample_flops = counter.get_total_flops()

    train_median = statistics.median(train_times)
    sample_median = statistics.median(sample_times)
    return {
        "train_step_seconds": train_median,
        "train_step_seconds_min": min(train_times),
        "train_images_per_second": batch / train_median,
        "train_gflops_per_image": train_flops / batch / 1e9,
        "train_gflops_per_second": train_flops / train_median / 1e9,
        "sample_step_seconds": sample_median,
        "sample_step_seconds_min": min(sample_times),
        "sample_images_per_second": batch / sample_median,
        "sample_gflops_per_image": sample_flops / batch / 1e9,
        "sample_gflops_per_second": sample_flops / sample_median / 1e9,
        "peak_rss_bytes": peak_rss,
        "peak_rss_above_start_bytes": peak_rss - rss_start,
    }


def measure_conv_throughput(batch: int, warmup: int, steps: int) -> dict:
    """Measure bfloat16 channels_last 3x3 convolutions (forward + backward); return GFLOP/s per shape and the max."""
    import torch

    shapes = {"128ch_32px": (128, 32), "256ch_16px": (256, 16), "256ch_32px": (256, 32)}
    results = {}
    for name, (channels, size) in shapes.items():
        conv = torch.nn.Conv2d(channels, channels, 3, padding=1).to(memory_format=torch.channels_last)
        x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last).requires_grad_()

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = conv(x)
            out.backward(torch.ones_like(out))

        flops = 3 * 2 * batch * channels * channels * 9 * size * size  # forward, input grad, weight grad
        times = _time_calls(step, warmup + 1, max(steps, 3))
        results[name] = flops / min(times) / 1e9
    return {"gflops_per_second_by_shape": results, "gflops_per_second": max(results.values()),
            "measure": "3x3 conv, forward + backward, bf16 autocast, channels_last, fastest of the timed runs"}


def worker(spec: dict) -> dict:
    """Run one measurement in this (fresh) process; ``spec['kind']`` is 'stage', 'reference' or 'conv'."""
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    if spec["kind"] == "conv":
        return measure_conv_throughput(spec["batch_size"], spec["warmup"], spec["steps"])

    if spec["kind"] == "reference":
        from bench.unet_references import TEXT_DIM, build

        model, forward = build(spec["name"])
        text_dim, size, lowres = TEXT_DIM, 64, False
    else:
        from imagen.config import load_cascade_config
        from imagen.unet import EfficientUNet

        stage = load_cascade_config(spec["cascade"]).stage(spec["stage"])
        model = EfficientUNet(stage.unet)
        text_dim, size, lowres = stage.unet.text_embed_dim, spec["resolution"], stage.unet.lowres_cond

        def forward(model, x, t, text, mask, lowres_image=None, lowres_noise_level=None):
            return model(x, 20.0 - 40.0 * t, text, mask, lowres_image, lowres_noise_level)

    batch = spec["batch_size"]
    inputs = {
        "x": torch.randn(batch, 3, size, size),
        "t": torch.rand(batch),
        "text": torch.randn(batch, spec["text_length"], text_dim),
        "mask": torch.ones(batch, spec["text_length"], dtype=torch.bool),
    }
    if lowres:
        inputs["lowres_image"] = torch.randn(batch, 3, size, size)
        inputs["lowres_noise_level"] = torch.rand(batch)
    result = {"parameters": sum(p.numel() for p in model.parameters()), "resolution": size}
    result.update(measure_model(model, forward, inputs, spec["precision"], spec["memory_format"],
                                spec["warmup"], spec["steps"]))
    return result


# --- orchestration ----------------------------------------------------------------------------------


def _run_worker(spec: dict) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TOOLS_DIR), env.get("PYTHONPATH")]))
    process = subprocess.run(
        [sys.executable, "-m", "bench.unet", "--worker", json.dumps(spec)],
        capture_output=True, text=True, env=env, check=False,
    )
    if process.returncode != 0:
        lines = (process.stderr or process.stdout).strip().splitlines()
        return {"error": lines[-1] if lines else f"worker exited with code {process.returncode}"}
    return json.loads(process.stdout.strip().splitlines()[-1])


def _faster(kept: dict | None, measured: dict) -> dict:
    """Return whichever of two measurements of one model has the shorter median training step."""
    if kept is None or "error" in kept:
        return measured
    if "error" in measured or measured["train_step_seconds"] >= kept["train_step_seconds"]:
        return kept
    return measured


def _compare(models: dict, conv: dict, precisions: list[str]) -> dict:
    """Ratios of ours to each reference and the pass/fail of the targets (see the module docstring)."""
    comparison: dict[str, Any] = {}
    ours = models.get("ours", {})
    for reference, factor in (("diffusers_if", 1.3), ("imagen_pytorch", 2.0)):
        for precision in precisions:
            mine, theirs = ours.get(precision, {}), models.get(reference, {}).get(precision, {})
            if "train_images_per_second" not in mine or "train_images_per_second" not in theirs:
                continue
            speedup = mine["train_images_per_second"] / theirs["train_images_per_second"]
            memory = mine["peak_rss_above_start_bytes"] / theirs["peak_rss_above_start_bytes"]
            comparison[f"{reference}_{precision}"] = {
                "train_speedup": speedup,
                "train_speedup_target": factor,
                "train_speedup_met": speedup >= factor,
                "peak_memory_ratio": memory,
                "peak_memory_met": memory <= 1.0,
            }
    bf16 = ours.get("bf16", {})
    if "train_gflops_per_second" in bf16 and "gflops_per_second" in conv:
        fraction = bf16["train_gflops_per_second"] / conv["gflops_per_second"]
        comparison["ours_bf16_fraction_of_conv_throughput"] = {"fraction": fraction, "target": 0.6, "met": fraction >= 0.6}
    return comparison


def run(args: argparse.Namespace) -> dict:
    import torch

    from imagen.config import load_cascade_config

    common = dict(batch_size=args.batch_size, threads=args.threads, steps=args.steps, warmup=args.warmup,
                  memory_format=args.memory_format, text_length=args.text_length)
    result: dict[str, Any] = {
        "settings": {**common, "precisions": args.precisions, "torch": torch.__version__,
                     "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpus": os.cpu_count(),
                     "optimizer": "AdamW (fused)", "memory_measure": "peak RSS of a fresh subprocess per model and "
                     "precision, in total and above the RSS just before the first training step"},
    }

    cascade = load_cascade_config(args.cascade)
    stage_names = [stage.name for stage in cascade.stages] if args.stages is None else args.stages
    result["stages"] = {}
    for name in stage_names:
        stage = cascade.stage(name)
        size = args.resolution or stage.train_crop or stage.resolution
        entry: dict[str, Any] = {"cascade": cascade.name, "resolution": size}
        for precision in args.precisions:
            entry[precision] = _run_worker(dict(common, kind="stage", cascade=args.cascade, stage=name,
                                                resolution=size, precision=precision))
        result["stages"][name] = entry

    if args.references:
        models: dict[str, Any] = {name: {} for name in args.references}
        conv: dict[str, Any] = {}
        for _ in range(max(args.rounds, 1)):
            for name in args.references:
                for precision in args.precisions:
                    measured = _run_worker(dict(common, kind="reference", name=name, precision=precision))
                    models[name][precision] = _faster(models[name].get(precision), measured)
            measured = _run_worker(dict(common, kind="conv"))
            if "error" in conv or conv.get("gflops_per_second", 0.0) < measured.get("gflops_per_second", 0.0):
                conv = measured
        result["reference_comparison"] = {
            "resolution": 64, "rounds": max(args.rounds, 1), "models": models, "conv_throughput_bf16": conv,
            "comparison": _compare(models, conv, args.precisions),
        }
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        sys.exit("run this benchmark as: python tools/benchmark.py unet [options]")
