"""The ``imagen`` command: ``imagen generate`` makes images from prompts, ``imagen info`` describes a cascade.

    imagen generate "a red heart" --out outputs --seed 7
    imagen generate "a red heart" --cascade runs/cascade --steps 30 20 10 --guidance 5 2 1
    imagen info runs/cascade

Progress bars and logs go to stderr. Errors in the input print one line and exit with status 1
(status 2 for an invalid command line).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from . import __version__
from .config import SAMPLERS, THRESHOLDING

logger = logging.getLogger("imagen.cli")

DEFAULT_CASCADE_DIR = Path(__file__).resolve().parent / "default_cascade"
DEFAULT_CONFIG = "imagen-tiny"
_DTYPES = ("float32", "bfloat16", "float16")


# --- argument parsing ---------------------------------------------------------------------------


def _one_or_list(values: Optional[list[Any]]) -> Any:
    """Return None, the single value, or the list: one value applies to every stage."""
    if values is None:
        return None
    return values[0] if len(values) == 1 else values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagen", description="Imagen-style cascaded text-to-image diffusion.")
    parser.add_argument("--version", action="version", version=f"imagen {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress messages (INFO) to stderr")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser(
        "generate", help="generate images from prompts",
        description="Generate images and write them as PNGs, with a JSON file of every setting beside them.",
    )
    generate.add_argument("prompt", nargs="+", help="one or more prompts (quote each one)")
    source = generate.add_mutually_exclusive_group()
    source.add_argument("--cascade", metavar="DIR", help="cascade folder written by save_pretrained or the trainer "
                        f"(default: the packaged one if installed, else a random-weight {DEFAULT_CONFIG})")
    source.add_argument("--config", metavar="NAME", help="shipped config name or JSON file to build a cascade with "
                        "random weights from (for trying the pipeline without trained weights)")
    generate.add_argument("--init-seed", type=int, default=0, metavar="N",
                          help="seed of the random weights with --config or the random fallback (default 0)")
    generate.add_argument("--out", default="outputs", metavar="DIR", help="output folder (default: outputs)")
    generate.add_argument("--seed", type=int, metavar="N", help="seed of the first image; image i uses N + i (default: random)")
    generate.add_argument("--num-images", type=int, default=1, metavar="N", help="images per prompt (default 1)")
    generate.add_argument("--negative-prompt", metavar="TEXT", help="prompt for the unconditional guidance branch")
    generate.add_argument("--steps", type=int, nargs="+", metavar="N",
                          help="sampling steps: one value, or one per stage (default: each stage's config)")
    generate.add_argument("--guidance", type=float, nargs="+", metavar="W",
                          help="classifier-free guidance scale, 1 = none: one value or one per stage")
    generate.add_argument("--sampler", nargs="+", choices=SAMPLERS, metavar="NAME",
                          help=f"sampler, one or one per stage: {', '.join(SAMPLERS)}")
    generate.add_argument("--noise-aug", type=float, nargs="+", metavar="LEVEL",
                          help="noise augmentation level in [0, 1] of the super-resolution stages: one or one per such stage")
    generate.add_argument("--thresholding", nargs="+", choices=THRESHOLDING, metavar="MODE",
                          help=f"x0 thresholding, one or one per stage: {', '.join(THRESHOLDING)} (default: each stage's config)")
    generate.add_argument("--height", type=int, metavar="PX", help="base-stage height in pixels (default: its resolution)")
    generate.add_argument("--width", type=int, metavar="PX", help="base-stage width in pixels (default: its resolution)")
    generate.add_argument("--stop-at-stage", metavar="STAGE", help="last stage to run and load (name or 0-based index)")
    generate.add_argument("--stage-outputs", action="store_true", help="also write every earlier stage's images")
    generate.add_argument("--device", help="device to sample on (default: cuda if available, else cpu)")
    generate.add_argument("--dtype", choices=_DTYPES, default="float32", help="U-Net dtype (default float32)")
    generate.add_argument("--stage-offload", action="store_true",
                          help="keep only the active stage on the device (saves accelerator memory)")
    generate.add_argument("--no-progress", action="store_true", help="hide the progress bars")

    info = commands.add_parser("info", help="print a cascade's stages, resolutions and parameter counts",
                               description="Describe a cascade folder, or a shipped config name / JSON file.")
    info.add_argument("cascade", metavar="DIR", help="cascade folder, shipped config name or config JSON file")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _stage_argument(value: Optional[str]) -> Any:
    """Read --stop-at-stage as an index when it is all digits, else as a stage name."""
    if value is None:
        return None
    return int(value) if value.isdigit() else value


# --- generate -----------------------------------------------------------------------------------


def _load_pipeline(args: argparse.Namespace) -> tuple[Any, dict[str, Any], list[str]]:
    """Return the pipeline, a JSON description of where it came from, and the matching command-line options."""
    from .pipeline import ImagenPipeline

    stop = _stage_argument(args.stop_at_stage)
    if args.cascade is not None or (args.config is None and (DEFAULT_CASCADE_DIR / "cascade.json").is_file()):
        folder = Path(args.cascade) if args.cascade is not None else DEFAULT_CASCADE_DIR
        pipeline = ImagenPipeline.from_pretrained(folder, stop_at_stage=stop)
        return pipeline, {"folder": str(folder.resolve()), "random_weights": False}, ["--cascade", str(folder.resolve())]

    name = args.config if args.config is not None else DEFAULT_CONFIG
    if args.config is None:
        logger.warning(
            "no trained cascade found (no --cascade, and %s does not exist): using %s with RANDOM U-Net weights "
            "(seed %d), so the images are noise. Pass --cascade DIR to use a trained cascade.",
            DEFAULT_CASCADE_DIR, name, args.init_seed,
        )
    else:
        logger.warning("building %s with RANDOM U-Net weights (seed %d): the images are noise", name, args.init_seed)
    pipeline = ImagenPipeline.from_config(name, seed=args.init_seed, stop_at_stage=stop)
    source = {"config": str(name), "init_seed": args.init_seed, "random_weights": True}
    return pipeline, source, ["--config", str(name), "--init-seed", str(args.init_seed)]


def _unique_stem(folder: Path, stem: str) -> str:
    """Return ``stem``, or ``stem-2``, ``stem-3``, ... so that no existing JSON file is overwritten."""
    candidate, counter = stem, 1
    while (folder / f"{candidate}.json").exists() or any(folder.glob(f"{candidate}-*.png")):
        counter += 1
        candidate = f"{stem}-{counter}"
    return candidate


def _reproduce_command(args: argparse.Namespace, source_options: list[str], output: Any) -> list[str]:
    """Build an ``imagen generate`` command that spells out every resolved setting of this run."""
    settings = output.settings
    command = ["imagen", "generate", *args.prompt, *source_options, "--out", args.out]
    command += ["--seed", str(output.seeds[0]), "--num-images", str(args.num_images)]
    command += ["--steps", *[str(s.num_steps) for s in settings]]
    command += ["--guidance", *[repr(s.guidance_scale) for s in settings]]
    command += ["--sampler", *[s.sampler for s in settings]]
    levels = [repr(s.noise_aug_level) for s in settings if s.noise_aug_level is not None]
    if levels:
        command += ["--noise-aug", *levels]
    command += ["--thresholding", *[s.thresholding for s in settings]]
    command += ["--height", str(settings[0].height), "--width", str(settings[0].width)]
    command += ["--stop-at-stage", settings[-1].name, "--dtype", args.dtype]
    if args.negative_prompt is not None:
        command += ["--negative-prompt", args.negative_prompt]
    return command


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from .images import to_pil

    started = time.perf_counter()
    pipeline, source, source_options = _load_pipeline(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.stage_offload:
        pipeline.enable_stage_offload(device)
    pipeline.to(device, getattr(torch, args.dtype))
    pipeline.progress = not args.no_progress

    output = pipeline(
        args.prompt,
        negative_prompt=args.negative_prompt,
        num_images_per_prompt=args.num_images,
        guidance_scale=_one_or_list(args.guidance),
        num_inference_steps=_one_or_list(args.steps),
        sampler=_one_or_list(args.sampler),
        noise_aug_level=_one_or_list(args.noise_aug),
        thresholding=_one_or_list(args.thresholding),
        seed=args.seed,
        height=args.height,
        width=args.width,
        output_type="pt",
        return_all_stages=args.stage_outputs,
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = _unique_stem(out, f"imagen-seed{output.seeds[0]}")
    prompts = [prompt for prompt in args.prompt for _ in range(args.num_images)]
    last = output.settings[-1].name
    records = []
    for index, (prompt, seed) in enumerate(zip(prompts, output.seeds)):
        record = {"prompt": prompt, "seed": seed, "stages": {}}
        for name, images in output.stage_images.items():
            filename = f"{stem}-{index}.png" if name == last else f"{stem}-{index}-{name}.png"
            to_pil(images[index:index + 1])[0].save(out / filename)
            record["stages"][name] = filename
        record["file"] = record["stages"][last]
        records.append(record)

    settings = {
        "imagen_version": __version__,
        "torch_version": torch.__version__,
        "cascade": {"name": pipeline.config.name, **source},
        "prompts": list(args.prompt),
        "negative_prompt": args.negative_prompt,
        "num_images_per_prompt": args.num_images,
        "seed": output.seeds[0],
        "seed_rule": "image i (prompt-major order) uses seed + i",
        "device": str(pipeline.device),
        "dtype": args.dtype,
        "stages": [dataclasses.asdict(stage) for stage in output.settings],
        "images": records,
        "command": shlex.join(_reproduce_command(args, source_options, output)),
        "elapsed_s": round(time.perf_counter() - started, 3),
    }
    json_path = out / f"{stem}.json"
    json_path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    for record in records:
        print(out / record["file"])
    print(json_path)
    return 0


# --- info ---------------------------------------------------------------------------------------


def _describe(target: str) -> dict[str, Any]:
    """Describe a cascade folder (weights checked against the config by their header) or a config."""
    import torch

    from .cascade_folder import (
        CascadeFolderError,
        check_state_dict,
        read_cascade,
        read_weights_shapes,
        stage_config_path,
        stage_weights_path,
    )
    from .config import load_cascade_config
    from .unet import EfficientUNet

    folder = Path(target)
    is_folder = folder.is_dir()
    try:
        cfg = read_cascade(folder) if is_folder else load_cascade_config(target)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{target!r} is not a cascade folder, and {error}") from None
    stages = []
    for stage in cfg.stages:
        with torch.device("meta"):
            model = EfficientUNet(stage.unet)
        entry = {
            "name": stage.name,
            "resolution": stage.resolution,
            "lowres_resolution": stage.lowres_resolution,
            "parameters": sum(p.numel() for p in model.parameters()),
            "sampler": stage.sampler,
            "num_steps": stage.num_steps,
            "guidance_scale": stage.guidance_scale,
            "sample_noise_aug_level": stage.sample_noise_aug_level if stage.is_super_resolution else None,
        }
        if is_folder:
            weights = stage_weights_path(folder, stage.name)
            try:
                if not stage_config_path(folder, stage.name).is_file():
                    raise CascadeFolderError(f"missing file {stage_config_path(folder, stage.name)}")
                check_state_dict(read_weights_shapes(weights), stage.unet, source=str(weights))
                entry["weights_bytes"] = weights.stat().st_size
                entry["status"] = "ok"
            except CascadeFolderError as error:
                entry["status"] = f"error: {error}"
        stages.append(entry)
    encoder = dataclasses.asdict(cfg.text_encoder)
    return {"name": cfg.name, "source": str(folder.resolve()) if is_folder else target, "text_encoder": encoder,
            "stages": stages, "total_parameters": sum(s["parameters"] for s in stages)}


def _millions(count: int) -> str:
    return f"{count / 1e6:.2f} M"


def run_info(args: argparse.Namespace) -> int:
    description = _describe(args.cascade)
    broken = [s for s in description["stages"] if s.get("status", "ok") != "ok"]
    if args.json:
        print(json.dumps(description, indent=2))
        return 1 if broken else 0

    encoder = description["text_encoder"]
    print(f"cascade {description['name']} ({description['source']})")
    print(f"text encoder: {encoder['name']} (kind {encoder['kind']}, dim {encoder['dim']}, "
          f"max_length {encoder['max_length']}, {encoder['dtype']})")
    header = f"{'stage':<10} {'resolution':>12} {'parameters':>12} {'sampler':>9} {'steps':>5} {'guidance':>8} {'noise aug':>9}"
    print(header)
    for stage in description["stages"]:
        resolution = str(stage["resolution"]) if stage["lowres_resolution"] is None else f"{stage['lowres_resolution']} -> {stage['resolution']}"
        level = "-" if stage["sample_noise_aug_level"] is None else f"{stage['sample_noise_aug_level']:g}"
        print(f"{stage['name']:<10} {resolution:>12} {_millions(stage['parameters']):>12} {stage['sampler']:>9} "
              f"{stage['num_steps']:>5} {stage['guidance_scale']:>8g} {level:>9}")
    print(f"total U-Net parameters: {_millions(description['total_parameters'])}")
    for stage in broken:
        print(f"stage {stage['name']}: {stage['status']}")
    return 1 if broken else 0


# --- entry point --------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the ``imagen`` command with ``argv`` (default: sys.argv[1:]) and return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:  # --help, --version and invalid command lines
        return int(exit_request.code or 0)

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="imagen: %(levelname)s: %(message)s")
    try:
        return run_generate(args) if args.command == "generate" else run_info(args)
    except (ValueError, TypeError, OSError, ImportError) as error:
        if args.debug:
            raise
        print(f"imagen {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
