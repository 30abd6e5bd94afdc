"""Generate DrawBench images with a cascade: one image grid per category and an index.md.

    python tools/drawbench.py prompts.jsonl --cascade runs/cascade --out drawbench/run1
    python tools/drawbench.py prompts.jsonl --config imagen-tiny --out /tmp/drawbench --limit 8 --steps 5

The prompts file has one JSON object per line with keys ``id``, ``category`` and ``prompt``
(DrawBench: 200 prompts in 11 categories, Saharia et al., 2022). The output folder gets
``<category>.png`` per category and ``index.md``, which shows each grid followed by its prompts
in grid order. Prompt ``p`` (0-based position in the file) and copy ``k`` uses seed
``seed + p * images_per_prompt + k``, so an image does not depend on the batch size or on
``--limit``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from tqdm.auto import tqdm

from imagen.config import SAMPLERS
from imagen.images import make_grid, resize

logger = logging.getLogger("imagen.tools.drawbench")

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|~])")


@dataclass(frozen=True)
class Prompt:
    """One line of the prompts file; ``position`` is its 0-based line index among the prompts."""

    id: Any
    category: str
    prompt: str
    position: int


def read_prompts(path: str | Path) -> list[Prompt]:
    """Read a JSONL prompts file, raising ValueError that names the line of an invalid entry."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {str(path)!r} not found: pass a JSONL file with id, category and prompt keys")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: invalid JSON ({error})") from None
        if not isinstance(entry, dict) or "id" not in entry or not all(
                isinstance(entry.get(key), str) and entry[key].strip() for key in ("category", "prompt")):
            raise ValueError(f"{path}:{number}: expected an object with keys 'id', 'category' and 'prompt' "
                             f"(non-empty strings), got {line.strip()[:200]!r}")
        prompts.append(Prompt(entry["id"], entry["category"], entry["prompt"], len(prompts)))
    if not prompts:
        raise ValueError(f"prompts file {path} contains no prompts")
    return prompts


def group_by_category(prompts: Sequence[Prompt]) -> dict[str, list[Prompt]]:
    """Group prompts by category, categories in order of first appearance, prompts in file order."""
    groups: dict[str, list[Prompt]] = {}
    for prompt in prompts:
        groups.setdefault(prompt.category, []).append(prompt)
    return groups


def category_file_names(categories: Sequence[str]) -> dict[str, str]:
    """Return a distinct PNG file name per category: lower case, runs of other characters become '-'."""
    names: dict[str, str] = {}
    for category in categories:
        stem = re.sub(r"[^a-z0-9]+", "-", category.lower()).strip("-") or "category"
        name, suffix = f"{stem}.png", 2
        while name in names.values():
            name, suffix = f"{stem}-{suffix}.png", suffix + 1
        names[category] = name
    return names


def escape_markdown(text: str) -> str:
    """Escape the characters Markdown would read as markup, and fold line breaks to spaces."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(text.split()))


# --- generation ---------------------------------------------------------------------------------


def load_pipeline(args: argparse.Namespace):
    """Load the cascade folder, or build the config with random weights, up to the stage --stop-at-stage names."""
    from imagen.pipeline import ImagenPipeline

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.cascade:
        pipe = ImagenPipeline.from_pretrained(args.cascade, stop_at_stage=args.stop_at_stage, device=device)
    else:
        pipe = ImagenPipeline.from_config(args.config, seed=args.init_seed, stop_at_stage=args.stop_at_stage, device=device)
    pipe.progress = False
    return pipe


def generate(pipe, prompts: Sequence[Prompt], args: argparse.Namespace) -> tuple[dict[int, torch.Tensor], list]:
    """Sample every prompt and return {position: images (n, 3, H, W) in [-1, 1]} with the stage settings used."""
    count = args.images_per_prompt
    images: dict[int, torch.Tensor] = {}
    settings: list = []
    with tqdm(total=len(prompts) * count, desc="drawbench", unit="image", disable=not args.progress) as bar:
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start:start + args.batch_size]
            seeds = [args.seed + prompt.position * count + copy for prompt in batch for copy in range(count)]
            output = pipe(
                [prompt.prompt for prompt in batch], num_images_per_prompt=count, output_type="pt",
                generator=[torch.Generator().manual_seed(seed) for seed in seeds], stop_at_stage=args.stop_at_stage,
                num_inference_steps=args.steps, guidance_scale=args.guidance, sampler=args.sampler,
            )
            for row, prompt in enumerate(batch):
                images[prompt.position] = output.images[row * count:(row + 1) * count]
            settings = output.settings
            bar.update(len(batch) * count)
    return images, settings


# --- output -------------------------------------------------------------------------------------


def grid_columns(num_images: int, images_per_prompt: int) -> int:
    """Return the number of grid columns: one row per prompt when it has several images, else a near-square grid."""
    return images_per_prompt if images_per_prompt > 1 else math.ceil(math.sqrt(num_images))


def _settings_table(settings: Sequence) -> list[str]:
    lines = ["| stage | size | sampler | steps | guidance | noise augmentation | thresholding |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for item in settings:
        level = "" if item.noise_aug_level is None else f"{item.noise_aug_level:g}"
        lines.append(f"| {item.name} | {item.height}x{item.width} | {item.sampler} | {item.num_steps} | "
                     f"{item.guidance_scale:g} | {level} | {item.thresholding} |")
    return lines


def index_page(pipe, source: str, groups: dict[str, list[Prompt]], files: dict[str, str], settings: Sequence,
               args: argparse.Namespace) -> str:
    """Return the Markdown page: the run's settings, then per category its grid and prompts in grid order."""
    count = args.images_per_prompt
    total = sum(len(items) for items in groups.values())
    lines = [f"# DrawBench: {escape_markdown(pipe.config.name)}", "",
             f"Cascade: `{source}`. Prompts: `{args.prompts}` ({total} prompts, {count} image(s) each). "
             f"Prompt p (0-based line in the file) and copy k use seed {args.seed} + p * {count} + k.", "",
             *_settings_table(settings), ""]
    for category, items in groups.items():
        columns = grid_columns(len(items) * count, count)
        layout = "one row per prompt" if count > 1 else f"{columns} per row, left to right"
        lines += [f"## {escape_markdown(category)}", "", f"![{escape_markdown(category)}]({files[category]})", "",
                  f"{len(items)} prompts, {layout}:", ""]
        lines += [f"{number}. {escape_markdown(item.prompt)} (id {escape_markdown(str(item.id))})"
                  for number, item in enumerate(items, start=1)]
        lines.append("")
    return "\n".join(lines)


def write_outputs(pipe, source: str, prompts: Sequence[Prompt], images: dict[int, torch.Tensor], settings: Sequence,
                  args: argparse.Namespace) -> Path:
    """Write one grid PNG per category and index.md into ``args.out``, and return the index path."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    groups = group_by_category(prompts)
    files = category_file_names(list(groups))
    for category, items in groups.items():
        stacked = torch.cat([images[item.position] for item in items])
        if args.cell_size:
            stacked = resize(stacked, (args.cell_size, args.cell_size))
        make_grid(stacked, columns=grid_columns(len(stacked), args.images_per_prompt)).save(out / files[category])
    index = out / "index.md"
    index.write_text(index_page(pipe, source, groups, files, settings, args), encoding="utf-8")
    logger.info("wrote %d category grid(s) and %s", len(groups), index)
    return index


# --- command line -------------------------------------------------------------------------------


def per_stage_values(kind: type):
    """Return an argparse type for one entry of a per-stage option: VALUE or STAGE=VALUE."""
    def parse(text: str) -> Any:
        name, _, value = text.rpartition("=")
        try:
            parsed = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected {kind.__name__} or STAGE={kind.__name__}") from None
        return (name, parsed) if name else parsed
    return parse


def resolve_per_stage(values: Optional[list]) -> Any:
    """Turn the entries of a per-stage option into what the pipeline takes: None, one value, a list or a dict."""
    if values is None:
        return None
    named = [isinstance(value, tuple) for value in values]
    if any(named) and not all(named):
        raise ValueError(f"invalid per-stage values {values!r}: give either plain values or STAGE=VALUE entries, not both")
    if all(named):
        return dict(values)
    return values[0] if len(values) == 1 else list(values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", help="JSONL file, one {\"id\", \"category\", \"prompt\"} object per line")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--cascade", metavar="DIR", help="cascade folder written by save_pretrained or the trainer")
    source.add_argument("--config", metavar="NAME", help="shipped config name or JSON file, built with random weights (for testing the tool)")
    parser.add_argument("--init-seed", type=int, default=0, metavar="N", help="seed of the random weights with --config (default 0)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder for the grids and index.md")
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the first image (default 0)")
    parser.add_argument("--steps", type=per_stage_values(int), nargs="+", metavar="N",
                        help="sampling steps: one value, one per stage, or STAGE=N entries (default: each stage's config)")
    parser.add_argument("--guidance", type=per_stage_values(float), nargs="+", metavar="W",
                        help="classifier-free guidance scale (1 = none): one value, one per stage, or STAGE=W entries")
    parser.add_argument("--sampler", type=per_stage_values(str), nargs="+", metavar="NAME",
                        help=f"sampler ({', '.join(SAMPLERS)}): one value, one per stage, or STAGE=NAME entries")
    parser.add_argument("--stop-at-stage", metavar="STAGE", help="last stage to load and run (name or 0-based index)")
    parser.add_argument("--batch-size", type=int, default=4, metavar="N", help="prompts per pipeline call (default 4)")
    parser.add_argument("--images-per-prompt", type=int, default=1, metavar="N", help="images per prompt (default 1)")
    parser.add_argument("--limit", type=int, metavar="N", help="use only the first N prompts (quick runs)")
    parser.add_argument("--cell-size", type=int, metavar="PX", help="resize each image to PX x PX in the grids (default: as sampled)")
    parser.add_argument("--device", help="device to sample on (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")
    parser.add_argument("-v", "--verbose", action="store_true", help="also log the pipeline's messages (INFO) to stderr")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for key in ("batch_size", "images_per_prompt", "limit", "cell_size"):
        value = getattr(args, key)
        if value is not None and value < 1:
            parser.error(f"invalid --{key.replace('_', '-')} {value}: expected an integer >= 1")
    if args.stop_at_stage is not None and args.stop_at_stage.isdigit():
        args.stop_at_stage = int(args.stop_at_stage)
    try:
        args.steps, args.guidance, args.sampler = (resolve_per_stage(v) for v in (args.steps, args.guidance, args.sampler))
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """Run the command line ``argv``; return the path of the index.md written."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    prompts = read_prompts(args.prompts)[:args.limit]
    pipe = load_pipeline(args)
    logger.info("generating %d images for %d prompts with %r", len(prompts) * args.images_per_prompt, len(prompts), pipe)
    images, settings = generate(pipe, prompts, args)
    source = args.cascade if args.cascade else f"{args.config} (random weights, init seed {args.init_seed})"
    return write_outputs(pipe, source, prompts, images, settings, args)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as error:
        logger.error("%s", error)
        sys.exit(1)
