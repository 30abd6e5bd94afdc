"""Evaluate a cascade on held-out captioned images: denoising loss per stage and caption ranking.

    python tools/evaluate.py runs/cascade data/emoji --split holdout
    python tools/evaluate.py runs/cascade data/emoji --ids-file data/emoji/holdout.txt --limit 16 --bf16

The data folder is an image-caption folder as ``imagen.data`` reads it: ``captions.jsonl``
(keys ``file``, ``caption`` and optionally ``id`` and ``split``) beside the images, or one level
above size subfolders such as ``64/``, ``256/`` and ``1024/``. Each stage reads the smallest size
subfolder at least as large as its resolution. The report is one JSON object on stdout:

denoising: per stage, the unweighted mean squared error of the model's prediction against the
    stage's objective target (``imagen.diffusion.diffusion_loss`` without min-SNR weighting),
    averaged over every held-out image at ``--levels`` fixed times ``t_j = (j + 0.5) / levels``.
    The noise of each (image, level) comes from a generator seeded by the seed, the stage and the
    image id, so runs with the same seed draw the same noise. Every sample is conditioned on its
    own caption. A super-resolution stage also gets the downsampled image, upsampled again and
    noise-augmented at the stage's ``sample_noise_aug_level``. A stage with ``train_crop`` is
    evaluated, as it is trained, on crops of that size: here the center crop of the full-size
    image and the same region of the low-resolution image (``--full-size`` evaluates whole
    images). Images smaller than the stage's resolution are skipped and counted, never upscaled.
caption_ranking: zero-shot caption accuracy of the base stage. Each held-out image has K
    candidate captions: its own and K - 1 other distinct held-out captions drawn with the seed.
    Each candidate's score is the image's conditional denoising loss, averaged over M draws of
    (t, noise) that are the same for every candidate (common random numbers). The lowest loss
    ranks first, and a tie counts against the true caption. Top-1 and top-5 accuracy are reported with their chance levels
    1/K and 5/K.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from imagen.config import StageConfig
from imagen.data import (SkippedImage, derive_seed, find_captions_file, load_image, read_caption_records,
                         resize_center_crop, resolve_image_folder)
from imagen.diffusion import diffusion_loss, log_snr_from_t, noise_augment, q_sample, randn_like_per_sample
from imagen.images import resize

logger = logging.getLogger("imagen.tools.evaluate")

# loss_fn(image_index, candidate_text_indices (K,)) -> loss of each candidate (K,), lower is better.
CandidateLossFn = Callable[[int, torch.Tensor], torch.Tensor]


# --- held-out images ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HeldOutImage:
    """One held-out image: ``key`` is its ``id`` in captions.jsonl, else its file name without suffix."""

    key: str
    path: Path
    caption: str


def read_ids_file(path: str | Path) -> set[str]:
    """Read one image id per line, skipping blank lines and lines that start with ``#``."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    ids = {line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")}
    if not ids:
        raise ValueError(f"ids file {str(path)!r} lists no ids: write one image id per line")
    return ids


def _ids_by_file(folder: Path) -> dict[str, str]:
    """Map each ``file`` of captions.jsonl to its ``id`` key (entries without an id are left out)."""
    captions_file = find_captions_file(folder)
    if captions_file is None:
        return {}
    ids = {}
    for line in captions_file.read_text(encoding="utf-8").splitlines():
        if line.strip():
            entry = json.loads(line)
            if "id" in entry:
                ids[entry["file"]] = str(entry["id"])
    return ids


def held_out_images(folder: Path, split: Optional[str], ids: Optional[set[str]]) -> list[HeldOutImage]:
    """List the captioned images of ``folder`` in captions order, filtered by split and ids."""
    records = read_caption_records(folder, split)
    id_by_file = _ids_by_file(folder)
    images = []
    for record in records:
        key = id_by_file.get(record.path.relative_to(folder).as_posix(), record.path.stem)
        images.append(HeldOutImage(key, record.path, record.caption))
    if ids is not None:
        images = [image for image in images if image.key in ids or image.path.stem in ids]
        if not images:
            raise ValueError(f"none of the {len(ids)} ids in the ids file matches an image in {folder}: "
                             "list values of the captions.jsonl 'id' key or image file names without suffix")
    return images


def stage_input(pixels: torch.Tensor, stage: StageConfig, full_size: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Turn an image ``(3, h, w)`` into the stage's target ``(3, S, S)`` and low-resolution input ``(3, s, s)`` or None.

    The image is resized and center-cropped to the stage resolution; the low-resolution input is
    its antialiased downsample. Unless ``full_size``, a stage with ``train_crop`` keeps the center
    crop of that size, placed on whole low-resolution pixels, and the same region of the
    low-resolution image.
    """
    highres = resize_center_crop(pixels, stage.resolution)
    lowres = None
    if stage.is_super_resolution:
        lowres = resize(highres[None], (stage.lowres_resolution, stage.lowres_resolution))[0]
    crop = None if full_size else stage.train_crop
    if crop is None or crop == stage.resolution:
        return highres, lowres
    stride = stage.resolution // math.gcd(stage.resolution, stage.lowres_resolution or stage.resolution)
    offset = (stage.resolution - crop) // 2 // stride * stride
    highres = highres[:, offset:offset + crop, offset:offset + crop]
    if lowres is not None:
        low_offset, low_crop = offset * stage.lowres_resolution // stage.resolution, crop * stage.lowres_resolution // stage.resolution
        lowres = lowres[:, low_offset:low_offset + low_crop, low_offset:low_offset + low_crop]
    return highres, lowres


# --- the model's loss ---------------------------------------------------------------------------


def stratified_times(count: int) -> torch.Tensor:
    """Return ``count`` times ``(j + 0.5) / count`` in (0, 1), float32 (count,)."""
    return (torch.arange(count, dtype=torch.float32) + 0.5) / count


def denoising_losses(model: nn.Module, stage: StageConfig, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                     text_embeds: torch.Tensor, text_mask: torch.Tensor, lowres: Optional[torch.Tensor] = None,
                     lowres_eps: Optional[torch.Tensor] = None,
                     memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Return the unweighted per-sample diffusion loss (B,) of ``model`` in the stage's objective.

    ``x0``, ``eps`` (B, 3, H, W); ``t`` (B,) in [0, 1]; text (B, L, D) and (B, L). For a
    super-resolution stage, ``lowres`` (B, 3, h, w) is upsampled to (H, W) and noise-augmented
    with ``lowres_eps`` (B, 3, H, W) at the stage's ``sample_noise_aug_level``.
    """
    diffusion = stage.diffusion
    log_snr = log_snr_from_t(t.to(x0.device), diffusion)
    x_t = q_sample(x0, log_snr, eps).contiguous(memory_format=memory_format)
    lowres_image = level = None
    if stage.is_super_resolution:
        level = torch.full((x0.shape[0],), stage.sample_noise_aug_level, device=x0.device)
        upsampled = resize(lowres, tuple(x0.shape[-2:]))
        lowres_image = noise_augment(upsampled, level, diffusion, lowres_eps).contiguous(memory_format=memory_format)
    prediction = model(x_t, log_snr, text_embeds, text_mask, lowres_image=lowres_image, lowres_noise_level=level)
    return diffusion_loss(prediction, x0, eps, log_snr, diffusion.objective, min_snr_gamma=None)


def seeded_noise(shape: Sequence[int], seeds: Sequence[int], count: int, device: torch.device) -> list[torch.Tensor]:
    """Draw ``count`` standard normal tensors of ``shape`` (B, ...) in turn, sample i from a generator seeded ``seeds[i]``."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return [randn_like_per_sample(shape, generators).to(device) for _ in range(count)]


# --- caption ranking ----------------------------------------------------------------------------


def draw_candidates(own: Sequence[int], num_texts: int, k: int, seed: int, keys: Sequence[str]) -> torch.Tensor:
    """Return candidate text indices (N, K): column 0 is each image's own text, then K - 1 others.

    ``own[i]`` indexes image i's caption in a table of ``num_texts`` distinct captions. The others
    are drawn without replacement from the rest of the table by a generator seeded with ``seed``
    and ``keys[i]``, so an image gets the same candidates in any subset or order of images.
    """
    if k < 2 or k > num_texts:
        raise ValueError(f"invalid number of candidates {k}: expected 2 to {num_texts} "
                         f"(the number of distinct held-out captions); lower --candidates or add images")
    rows = []
    for text, key in zip(own, keys):
        others = torch.tensor([index for index in range(num_texts) if index != text])
        generator = torch.Generator().manual_seed(derive_seed(seed, "candidates", key))
        chosen = others[torch.randperm(len(others), generator=generator)[:k - 1]]
        rows.append(torch.cat([torch.tensor([text]), chosen]))
    return torch.stack(rows)


def rank_of_true(losses: torch.Tensor) -> torch.Tensor:
    """Return the 0-based rank (N,) of column 0 among the losses (N, K), counting ties against column 0."""
    return (losses[:, 1:] <= losses[:, :1]).sum(dim=1)


def candidate_losses(loss_fn: CandidateLossFn, candidates: torch.Tensor, progress: bool = False) -> torch.Tensor:
    """Score every row of ``candidates`` (N, K) with ``loss_fn`` and return the losses (N, K)."""
    rows = [loss_fn(index, candidates[index]) for index in tqdm(range(len(candidates)), desc="caption ranking",
                                                                    disable=not progress)]
    return torch.stack([row.detach().float().cpu() for row in rows])


def ranking_report(losses: torch.Tensor) -> dict:
    """Summarize losses (N, K) with the true caption in column 0: top-1 and top-5 accuracy, chance levels, mean rank."""
    ranks = rank_of_true(losses)
    k = losses.shape[1]
    return {
        "images": int(losses.shape[0]),
        "candidates": k,
        "top1": float((ranks < 1).float().mean()),
        "top5": float((ranks < 5).float().mean()),
        "chance_top1": 1.0 / k,
        "chance_top5": min(5, k) / k,
        "mean_rank": float(ranks.float().mean() + 1.0),
    }


def model_candidate_loss_fn(model: nn.Module, stage: StageConfig, images: torch.Tensor, keys: Sequence[str],
                            text_embeds: torch.Tensor, text_mask: torch.Tensor, *, draws: int, draws_per_forward: int,
                            seed: int, memory_format: torch.memory_format = torch.contiguous_format) -> CandidateLossFn:
    """Build the loss function of caption ranking for the text-to-image stage ``stage``.

    ``images`` (N, 3, H, W) and ``keys`` (N,) are the held-out images; ``text_embeds`` (T, L, D)
    and ``text_mask`` (T, L) the table of candidate captions. For image i it evaluates ``draws``
    (t, noise) pairs, the same for every candidate, ``draws_per_forward`` of them with all K
    candidates in one forward pass, and returns the mean loss per candidate (K,).
    """
    times = stratified_times(draws)

    def losses(index: int, candidates: torch.Tensor) -> torch.Tensor:
        k, device = len(candidates), images.device
        seeds = [derive_seed(seed, "ranking", keys[index], draw) for draw in range(draws)]
        (eps,) = seeded_noise((draws, *images.shape[1:]), seeds, 1, device)
        total = torch.zeros(k, device=device)
        for start in range(0, draws, draws_per_forward):
            chunk = eps[start:start + draws_per_forward]
            count = chunk.shape[0]
            # Row r is draw r // K with candidate r % K.
            per_sample = denoising_losses(
                model, stage, images[index].expand(count * k, -1, -1, -1), chunk.repeat_interleave(k, dim=0),
                times[start:start + count].repeat_interleave(k), text_embeds[candidates].repeat(count, 1, 1),
                text_mask[candidates].repeat(count, 1), memory_format=memory_format)
            total += per_sample.view(count, k).sum(dim=0)
        return total / draws

    return losses


# --- evaluation ---------------------------------------------------------------------------------


@dataclass
class TextTable:
    """Distinct captions and their encodings: ``embeds`` (T, L, D) and ``mask`` (T, L) on the device."""

    texts: list[str]
    embeds: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        self._rows = {text: row for row, text in enumerate(self.texts)}

    def index(self, caption: str) -> int:
        return self._rows[caption]

    def subset(self, texts: Sequence[str]) -> "TextTable":
        rows = torch.tensor([self.index(text) for text in texts], device=self.embeds.device)
        return TextTable(list(texts), self.embeds[rows], self.mask[rows])


def encode_texts(pipe, captions: Sequence[str]) -> TextTable:
    """Encode each distinct caption once with the cascade's text encoder, in batches as training does."""
    texts = list(dict.fromkeys(captions))
    embeds, mask = pipe.text_encoder.encode(texts)
    return TextTable(texts, embeds.to(pipe.device, pipe.dtype), mask.to(pipe.device))


def load_stage_images(images: Sequence[HeldOutImage], stage: StageConfig,
                      full_size: bool) -> list[tuple[HeldOutImage, torch.Tensor, Optional[torch.Tensor]]]:
    """Read images as ``(image, target (3, S, S), lowres (3, s, s) or None)``, skipping those smaller than the stage."""
    loaded = []
    for image in images:
        try:
            pixels = load_image(image.path, stage.resolution, image.key)
        except SkippedImage as reason:
            logger.info("stage %s: skipped %s", stage.name, reason)
            continue
        loaded.append((image, *stage_input(pixels, stage, full_size)))
    return loaded


def _group_level_losses(model: nn.Module, stage: StageConfig, loaded: list, table: TextTable, times: torch.Tensor,
                        args: argparse.Namespace, device: torch.device, memory_format: torch.memory_format) -> torch.Tensor:
    """Return the summed loss per time (levels,) over the images of ``loaded``."""
    levels = len(times)
    pairs = [(item, level) for item in loaded for level in range(levels)]
    sums = torch.zeros(levels)
    for start in range(0, len(pairs), args.batch_size):
        chunk = pairs[start:start + args.batch_size]
        x0 = torch.stack([item[1] for item, _ in chunk]).to(device)
        lowres = None if not stage.is_super_resolution else torch.stack([item[2] for item, _ in chunk]).to(device)
        seeds = [derive_seed(args.seed, "denoising", stage.name, item[0].key, level) for item, level in chunk]
        eps, lowres_eps = seeded_noise(x0.shape, seeds, 2, device)
        rows = torch.tensor([table.index(item[0].caption) for item, _ in chunk], device=device)
        chunk_levels = torch.tensor([level for _, level in chunk])
        losses = denoising_losses(model, stage, x0, eps, times[chunk_levels], table.embeds[rows], table.mask[rows],
                                  lowres, lowres_eps, memory_format).float().cpu()
        sums.index_add_(0, chunk_levels, losses)
    return sums


def stage_denoising(pipe, stage: StageConfig, folder: Path, images: Sequence[HeldOutImage], table: TextTable,
                    args: argparse.Namespace, memory_format: torch.memory_format) -> dict:
    """Return the denoising-loss report of one stage over ``images``."""
    times = stratified_times(args.levels)
    sums, used, size = torch.zeros(args.levels), 0, None
    group = max(1, args.batch_size // args.levels)
    for start in tqdm(range(0, len(images), group), desc=f"loss {stage.name}", disable=not args.progress):
        loaded = load_stage_images(images[start:start + group], stage, args.full_size)
        if loaded:
            size = loaded[0][1].shape[-1]
            sums += _group_level_losses(pipe.unets[stage.name], stage, loaded, table, times, args, pipe.device, memory_format)
            used += len(loaded)
    if used == 0:
        logger.warning("stage %s: no held-out image in %s is at least %d px, so its loss is null",
                       stage.name, folder, stage.resolution)
    per_time = (sums / max(used, 1)).tolist()
    return {
        "loss": sum(per_time) / args.levels if used else None,
        "loss_per_t": per_time if used else None,
        "t": times.tolist(),
        "images": used,
        "skipped": len(images) - used,
        "image_folder": str(folder),
        "input_size": size,
        "full_size": args.full_size or stage.train_crop in (None, stage.resolution),
        "objective": stage.diffusion.objective,
        "noise_aug_level": stage.sample_noise_aug_level if stage.is_super_resolution else None,
    }


def caption_ranking(pipe, stage: StageConfig, images: Sequence[HeldOutImage], captions: Sequence[str], table: TextTable,
                    args: argparse.Namespace, memory_format: torch.memory_format) -> dict:
    """Return the caption-ranking report of the text-to-image stage ``stage`` over ``images``.

    The candidates of every image are drawn from the distinct ``captions`` (the whole held-out set).
    """
    loaded = load_stage_images(images, stage, full_size=True)
    if not loaded:
        raise ValueError(f"no held-out image is at least {stage.resolution} px: caption ranking needs images for "
                         f"stage {stage.name!r}; pass a data folder with images of that size, or --no-ranking")
    keys = [item[0].key for item in loaded]
    ranking_table = table.subset(list(dict.fromkeys(captions)))
    own = [ranking_table.index(item[0].caption) for item in loaded]
    candidates = draw_candidates(own, len(ranking_table.texts), args.candidates, args.seed, keys)
    loss_fn = model_candidate_loss_fn(
        pipe.unets[stage.name], stage, torch.stack([item[1] for item in loaded]).to(pipe.device), keys,
        ranking_table.embeds, ranking_table.mask, draws=args.draws,
        draws_per_forward=args.draws_per_forward or args.draws, seed=args.seed, memory_format=memory_format)
    report = ranking_report(candidate_losses(loss_fn, candidates, args.progress))
    return {"stage": stage.name, **report, "draws": args.draws, "skipped": len(images) - len(loaded)}


def _timed(function: Callable[..., dict], *args) -> dict:
    """Call ``function(*args)`` and add its wall-clock time in seconds to the dict it returns."""
    started = time.perf_counter()
    result = function(*args)
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def evaluate(args: argparse.Namespace) -> dict:
    """Load the cascade, run both measurements and return the JSON-ready report."""
    from imagen.pipeline import ImagenPipeline

    started = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipe = ImagenPipeline.from_pretrained(args.cascade, stop_at_stage=args.stop_at_stage, device=device)
    memory_format = torch.channels_last if args.bf16 else torch.contiguous_format
    for unet in pipe.unets.values():
        unet.to(memory_format=memory_format)
    ids = read_ids_file(args.ids_file) if args.ids_file else None
    if args.split is None and ids is None:
        logger.warning("no --split or --ids-file: evaluating on every captioned image, training images included")

    stage_sets = {}
    for stage in pipe.config.stages:
        folder = resolve_image_folder(args.data, stage.resolution)
        stage_sets[stage.name] = (folder, held_out_images(folder, args.split, ids))
    table = encode_texts(pipe, [image.caption for _, images in stage_sets.values() for image in images])

    precision = torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext()
    report = {"cascade": str(args.cascade), "cascade_name": pipe.config.name, "data": str(args.data),
              "split": args.split, "ids_file": args.ids_file, "seed": args.seed, "bf16": args.bf16, "device": str(device),
              "setup_seconds": round(time.perf_counter() - started, 2)}
    with torch.no_grad(), precision:
        report["denoising"] = {}
        for stage in pipe.config.stages:
            folder, images = stage_sets[stage.name]
            report["denoising"][stage.name] = _timed(stage_denoising, pipe, stage, folder, images[:args.limit], table, args,
                                                     memory_format)
        if not args.no_ranking:
            base = pipe.config.stages[0]
            images = stage_sets[base.name][1]
            report["caption_ranking"] = _timed(caption_ranking, pipe, base, images[:args.limit],
                                               [image.caption for image in images], table, args, memory_format)
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


# --- command line -------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected an integer >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cascade", help="cascade folder written by ImagenPipeline.save_pretrained or the trainer")
    parser.add_argument("data", help="image-caption folder (captions.jsonl beside the images or above size subfolders)")
    parser.add_argument("--split", metavar="NAME", help="keep only captions.jsonl entries whose 'split' is NAME (such as holdout)")
    parser.add_argument("--ids-file", metavar="FILE", help="keep only the image ids listed in FILE, one per line")
    parser.add_argument("--limit", type=_positive_int, metavar="N", help="score only the first N held-out images of each stage; candidates still come from all (quick runs)")
    parser.add_argument("--levels", type=_positive_int, default=8, metavar="L",
                        help="fixed times t per image for the denoising loss (default 8)")
    parser.add_argument("--candidates", type=_positive_int, default=10, metavar="K", help="captions ranked per image (default 10)")
    parser.add_argument("--draws", type=_positive_int, default=8, metavar="M",
                        help="(t, noise) draws per image for caption ranking, shared by its candidates (default 8)")
    parser.add_argument("--draws-per-forward", type=_positive_int, metavar="N",
                        help="draws evaluated in one forward pass of K x N samples in caption ranking (default: all M)")
    parser.add_argument("--batch-size", type=_positive_int, default=32, metavar="N",
                        help="samples per forward pass for the denoising loss (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every noise draw and candidate choice (default 0)")
    parser.add_argument("--full-size", action="store_true",
                        help="evaluate stages with train_crop on whole images instead of center crops of train_crop")
    parser.add_argument("--stop-at-stage", metavar="STAGE", help="last stage to load and evaluate (name or 0-based index)")
    parser.add_argument("--no-ranking", action="store_true", help="skip caption ranking")
    parser.add_argument("--device", help="device to run on (default: cuda if available, else cpu)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast and channels_last U-Nets")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    parser.add_argument("--output", metavar="FILE", help="also write the JSON report to FILE")
    parser.add_argument("-v", "--verbose", action="store_true", help="also log the library's messages (INFO) to stderr")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Run the command line ``argv``; print the JSON report to stdout and return it."""
    args = build_parser().parse_args(argv)
    if args.stop_at_stage is not None and args.stop_at_stage.isdigit():
        args.stop_at_stage = int(args.stop_at_stage)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    report = evaluate(args)
    text = json.dumps(report, indent=2)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    sys.stdout.write(text + "\n")
    return report


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        logger.error("%s", error)
        sys.exit(1)
