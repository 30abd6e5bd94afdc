"""Pack trained stages into a cascade folder for shipping, with half-precision weights.

    python tools/pack_cascade.py --config cascade_configs/imagen-demo.json \\
        --stage base=runs/demo_cascade --stage sr256=runs/demo_cascade --stage sr1024=runs/demo_cascade \\
        --dtype bfloat16 --out imagen/default_cascade --notice data/SOURCE.md

Each stage's weights are read from the safetensors file of its source cascade folder, cast to
``--dtype`` (floating-point tensors only), and written with the stage config of ``--config``.
That config replaces the one stored beside the source weights, so sampling defaults can be
changed at packing time. A U-Net or diffusion setting that differs from the source raises.
``--notice`` files (licence and attribution of the training data) are copied beside the weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from imagen.cascade_folder import replace_folder, stage_weights_path, write_cascade_config, write_stage
from imagen.config import StageConfig, load_cascade_config, to_dict

logger = logging.getLogger("pack_cascade")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def pack_stage(stage: StageConfig, source: Path, out: Path, dtype: torch.dtype) -> int:
    """Copy one stage's weights from ``source`` into ``out`` as ``dtype``; return the size in bytes."""
    # Read the source config as plain JSON: it may predate fields added to StageConfig since.
    stored = json.loads((source / stage.name / "config.json").read_text(encoding="utf-8"))
    expected = to_dict(stage)
    for key in ("resolution", "lowres_resolution", "unet", "diffusion"):
        if stored.get(key) != expected[key]:
            raise ValueError(f"stage {stage.name!r}: {key} of {source / stage.name / 'config.json'} differs from the "
                             f"packing config; pack with the config the stage was trained with")
    weights = load_file(stage_weights_path(source, stage.name))
    cast = {key: value.to(dtype) if value.is_floating_point() else value for key, value in weights.items()}
    write_stage(out, stage, cast)
    return stage_weights_path(out, stage.name).stat().st_size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="cascade config JSON (or shipped name) to write")
    parser.add_argument("--stage", action="append", required=True, metavar="NAME=DIR",
                        help="a stage and the cascade folder its trained weights come from; repeat per stage")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="dtype of the packed weights")
    parser.add_argument("--out", type=Path, required=True, help="cascade folder to write (replaced once packing succeeds; may be a source folder)")
    parser.add_argument("--notice", type=Path, action="append", default=[],
                        help="a licence or attribution file to copy into --out; repeatable")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    cascade = load_cascade_config(args.config)
    sources = dict(entry.split("=", 1) for entry in args.stage)
    missing = [stage.name for stage in cascade.stages if stage.name not in sources]
    if missing:
        parser.error(f"no --stage NAME=DIR for stage(s) {missing}: give one per stage of {args.config}")
    # Build beside --out and swap it in at the end: a failed run leaves --out as it was, and
    # --out may also be a source folder (re-packing in place).
    staging = args.out.with_name(args.out.name + ".packing")
    if staging.exists():
        shutil.rmtree(staging)
    write_cascade_config(staging, cascade)
    total = 0
    for stage in cascade.stages:
        size = pack_stage(stage, Path(sources[stage.name]), staging, DTYPES[args.dtype])
        logger.info("stage %s: %.1f MB", stage.name, size / 1e6)
        total += size
    for notice in args.notice:
        shutil.copy(notice, staging / notice.name)
    replace_folder(staging, args.out)
    logger.info("wrote %s: %.1f MB of weights in %s", args.out, total / 1e6, args.dtype)


if __name__ == "__main__":
    main()
