"""Command line of the trainer: train or fine-tune one stage of a cascade.

    python -m imagen.train --config imagen-tiny --stage base --data DIR --output runs/base
    accelerate launch -m imagen.train --config imagen-tiny --stage sr256 --data DIR --output runs/sr256
    torchrun --nproc_per_node 2 -m imagen.train ...    (two processes; gloo on the CPU)

Resume with ``--resume latest``; fine-tune with ``--init-from CASCADE_DIR``. At the end the EMA
weights go to ``--export CASCADE_DIR`` (default ``OUTPUT/cascade``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from imagen.checkpoint import CheckpointError
from imagen.trainer import LR_SCHEDULES, MIXED_PRECISION, TrainOptions, Trainer, build_accelerator


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m imagen.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    run = parser.add_argument_group("run")
    run.add_argument("--config", help="cascade: a shipped name (imagen-tiny, imagen-small, imagen-paper) or a JSON file; "
                                      "default: the cascade.json of --init-from")
    run.add_argument("--stage", required=True, help="stage to train, by name (base, sr256, sr1024)")
    run.add_argument("--data", type=Path, help="folder of images with captions.jsonl or .txt captions, or a parent "
                                               "folder with one subfolder per image size (64/, 256/, ...)")
    run.add_argument("--shards", type=Path, help="folder of WebDataset .tar shards (or one .tar) instead of --data")
    run.add_argument("--split", help="use only captions.jsonl entries whose 'split' equals this (for example train)")
    run.add_argument("--output", type=Path, required=True, help="run folder: checkpoints/, samples/, text_cache/, cascade/")
    run.add_argument("--text-encoder", help="override the cascade's text encoder: a TextEncoderConfig JSON file, or a "
                                            "model folder or hub id that replaces only its name")
    run.add_argument("--text-cache", type=Path, help="folder of the text embedding cache, shareable between runs "
                                                     "(default OUTPUT/text_cache)")
    run.add_argument("--init-from", type=Path, help="cascade folder whose weights of --stage start the run (fine-tuning)")
    run.add_argument("--export", type=Path, help="cascade folder for the EMA weights at the end (default OUTPUT/cascade)")
    run.add_argument("--no-export", action="store_true", help="do not export at the end unless --export is given")
    run.add_argument("--resume", help="'latest' (the newest checkpoint in OUTPUT/checkpoints, if any) or a checkpoint folder")
    run.add_argument("--seed", type=int, default=0, help="seed of the data order, crops, noise and dropout (default 0)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--steps", type=int, default=1000, help="optimizer steps to train to (default 1000)")
    optim.add_argument("--batch-size", type=int, default=8, help="images per process per micro-batch (default 8)")
    optim.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    optim.add_argument("--lr", type=float, default=1e-4, help="peak learning rate of AdamW (default 1e-4)")
    optim.add_argument("--warmup-steps", type=int, default=100, help="linear learning-rate warm-up, in steps (default 100)")
    optim.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                       help="after the warm-up: 'constant', or 'cosine' down to 0 at --steps (default constant)")
    optim.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    optim.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon added to the root of the second moment (default 1e-8)")
    optim.add_argument("--grad-clip", type=float, default=1.0, help="maximum gradient norm; 0 turns clipping off (default 1.0)")
    optim.add_argument("--mixed-precision", choices=MIXED_PRECISION, default="no", help="autocast dtype (default no)")
    optim.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay per step (default 0.9999)")
    optim.add_argument("--no-ema-warmup", action="store_true", help="use the EMA decay from the first step on")
    optim.add_argument("--caption-dropout", type=float, default=0.1,
                       help="probability of replacing a caption by the null condition, for classifier-free guidance (default 0.1)")
    optim.add_argument("--no-channels-last", action="store_true", help="keep the U-Net in the contiguous memory format")

    outputs = parser.add_argument_group("checkpoints, logs and samples")
    outputs.add_argument("--checkpoint-every", type=int, default=500, help="save a checkpoint every N steps (default 500)")
    outputs.add_argument("--keep-checkpoints", type=int, default=3, help="keep the newest K checkpoints; 0 keeps all (default 3)")
    outputs.add_argument("--log-every", type=int, default=50, help="log a line every N steps (default 50)")
    outputs.add_argument("--sample-every", type=int, default=0, help="write a sample grid every M steps; 0 turns it off (default 0)")
    outputs.add_argument("--sample-prompt", action="append", default=[], dest="sample_prompts",
                         help="prompt of the sample grid (repeat it; default: held-out or first captions of the data)")
    outputs.add_argument("--num-samples", type=int, default=4, help="images per sample grid (default 4)")
    outputs.add_argument("--sample-steps", type=int, help="sampler steps for the grid (default: the stage's num_steps)")
    outputs.add_argument("--num-workers", type=int, default=2, help="data loader worker processes per process (default 2)")
    outputs.add_argument("--shuffle-buffer", type=int, default=256, help="shuffle buffer of WebDataset streams, in samples (default 256)")
    outputs.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    outputs.add_argument("--log-level", default="INFO", help="logging level of the main process (default INFO)")
    return parser


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    """Turn parsed arguments into :class:`TrainOptions`."""
    return TrainOptions(
        stage=args.stage, output=args.output, config=args.config, data=args.data, shards=args.shards, split=args.split,
        text_encoder=args.text_encoder, text_cache=args.text_cache, init_from=args.init_from, export=args.export,
        export_at_end=not args.no_export,
        resume=args.resume, steps=args.steps, batch_size=args.batch_size, accumulation=args.accumulation, lr=args.lr,
        warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule, weight_decay=args.weight_decay, adam_eps=args.adam_eps, grad_clip=args.grad_clip or None,
        mixed_precision=args.mixed_precision, ema_decay=args.ema_decay, ema_warmup=not args.no_ema_warmup,
        caption_dropout=args.caption_dropout, checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints or None, log_every=args.log_every, sample_every=args.sample_every,
        sample_prompts=tuple(args.sample_prompts), num_samples=args.num_samples, sample_steps=args.sample_steps,
        seed=args.seed, num_workers=args.num_workers, shuffle_buffer=args.shuffle_buffer,
        channels_last=not args.no_channels_last, progress=not args.no_progress,
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    options = options_from_args(args)
    try:
        options.validate()
    except ValueError as error:
        build_parser().error(str(error))
    accelerator = build_accelerator(options.mixed_precision)
    level = getattr(logging, str(args.log_level).upper(), None)
    if not isinstance(level, int):
        build_parser().error(f"invalid --log-level {args.log_level!r}: expected DEBUG, INFO, WARNING or ERROR")
    # Only the main process logs progress; the others report warnings and errors.
    logging.basicConfig(level=level if accelerator.is_main_process else logging.WARNING,
                        format=f"%(asctime)s [rank {accelerator.process_index}] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(max(level, logging.WARNING))  # it logs every file of every save
    try:
        trainer = Trainer(options, accelerator)
    except (FileNotFoundError, ValueError, KeyError, CheckpointError) as error:
        # Set-up errors (config, data, checkpoint) get a one-line message instead of a traceback.
        build_parser().error(str(error.args[0]) if isinstance(error, KeyError) else str(error))
    summary = trainer.fit()
    if accelerator.is_main_process:
        logging.getLogger(__name__).info("finished: %s", summary)
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
