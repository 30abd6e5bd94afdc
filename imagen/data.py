"""Training data: captioned image folders, super-resolution pairs and a deterministic batch order.

A data folder holds images and their captions, either in ``captions.jsonl`` (one JSON object
per line with ``file`` and ``caption``; an optional ``split`` key can be filtered; other keys
are ignored) or in a ``.txt`` file beside each image. ``captions.jsonl`` may also sit one level
up, for data sets that keep one subfolder per image size (``emoji/64``, ``emoji/256``, ...).
Pointing at such a parent folder picks the smallest size subfolder that is large enough.

Images are read lazily, resized with antialiasing and center-cropped to the stage resolution.
A super-resolution pair is the image and its downsampled copy; with ``train_crop`` set, the
pair is a random crop of the high-resolution image and the matching crop of the downsampled
whole image (Saharia et al., 2022, section 4.4: the 256 -> 1024 model trains on 64 -> 256 crops).

Every random choice is a pure function of ``(seed, step, sample position)``:
:class:`StepBatchSampler` maps a training step to its data set indices and crop seeds, so a
resumed run reads exactly the samples that an uninterrupted run would have read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from imagen.config import StageConfig
from imagen.images import from_pil, resize

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTIONS_FILE = "captions.jsonl"


def derive_seed(*parts: Any) -> int:
    """Hash ints and strings to a seed in [0, 2**63) for ``torch.Generator.manual_seed``.

    Different tuples give statistically independent seeds, so ``derive_seed(seed, step, index)``
    names one sample's random stream without any shared generator state.
    """
    digest = hashlib.blake2b(repr(parts).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def seeded_generator(*parts: Any) -> torch.Generator:
    """Return a CPU generator seeded with ``derive_seed(*parts)``."""
    return torch.Generator().manual_seed(derive_seed(*parts))


# --- image transforms ------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSpec:
    """What a stage needs from each training image.

    ``resolution``: side of the high-resolution image in pixels. ``lowres_resolution``: side of
    the low-resolution conditioning image (super-resolution stages), else None. ``crop``: side of
    the random high-resolution crop, else None. ``min_size``: images whose shorter side is
    smaller are skipped instead of upscaled.
    """

    resolution: int
    lowres_resolution: Optional[int] = None
    crop: Optional[int] = None
    min_size: Optional[int] = None

    def __post_init__(self) -> None:
        if self.crop is not None and not 0 < self.crop <= self.resolution:
            raise ValueError(f"invalid crop {self.crop}: expected a size in (0, resolution={self.resolution}]")
        if self.crop is not None and self.lowres_resolution is not None:
            if (self.crop * self.lowres_resolution) % self.resolution:
                raise ValueError(f"invalid crop {self.crop}: its low-resolution crop "
                                 f"{self.crop} * {self.lowres_resolution} / {self.resolution} is not a whole number of pixels")

    @classmethod
    def from_stage(cls, stage: StageConfig) -> "ImageSpec":
        return cls(stage.resolution, stage.lowres_resolution, stage.train_crop, stage.resolution)

    @property
    def required_size(self) -> int:
        return self.min_size if self.min_size is not None else self.resolution

    @property
    def output_size(self) -> int:
        """Side of the high-resolution training image: the crop if set, else the resolution."""
        return self.crop if self.crop is not None else self.resolution

    @property
    def lowres_output_size(self) -> Optional[int]:
        if self.lowres_resolution is None:
            return None
        return self.output_size * self.lowres_resolution // self.resolution


def resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize ``(3, h, w)`` so that the shorter side is ``size`` (antialiased), then center-crop to ``(3, size, size)``."""
    height, width = image.shape[-2:]
    scale = size / min(height, width)
    new_height, new_width = max(size, round(height * scale)), max(size, round(width * scale))
    resized = resize(image[None], (new_height, new_width))[0]
    top, left = (new_height - size) // 2, (new_width - size) // 2
    return resized[:, top:top + size, left:left + size]


def make_training_pair(image: torch.Tensor, spec: ImageSpec,
                       generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Turn one image ``(3, h, w)`` in [-1, 1] into ``(image, lowres)`` for a stage.

    ``image`` is ``(3, S, S)`` with ``S = spec.output_size``; ``lowres`` is the antialiased
    downsample to ``lowres_resolution`` (``(3, s, s)``, ``s = spec.lowres_output_size``) or None.
    With ``spec.crop`` the crop offset is drawn from ``generator`` on the grid of whole
    low-resolution pixels, and ``lowres`` is the same region of the downsampled whole image.
    """
    highres = resize_center_crop(image, spec.resolution)
    lowres = None
    if spec.lowres_resolution is not None:
        lowres = resize(highres[None], (spec.lowres_resolution, spec.lowres_resolution))[0]
    if spec.crop is None or spec.crop == spec.resolution:
        return highres, lowres

    lowres_side = spec.lowres_resolution or spec.resolution
    stride = spec.resolution // math.gcd(spec.resolution, lowres_side)  # high-res pixels per whole low-res pixel
    positions = (spec.resolution - spec.crop) // stride + 1
    top, left = (stride * int(v) for v in torch.randint(positions, (2,), generator=generator))
    highres = highres[:, top:top + spec.crop, left:left + spec.crop]
    if lowres is not None:
        scale = spec.lowres_resolution / spec.resolution
        low_top, low_left, low_crop = round(top * scale), round(left * scale), round(spec.crop * scale)
        lowres = lowres[:, low_top:low_top + low_crop, low_left:low_left + low_crop]
    return highres, lowres


class SkippedImage(Exception):
    """An image that cannot be used: unreadable, or smaller than the stage needs."""


def load_image(source: Path | bytes, min_size: int, name: str = "") -> torch.Tensor:
    """Decode an image file (path or bytes) to ``(3, h, w)`` in [-1, 1].

    Transparent pixels are composited onto white. Raises :class:`SkippedImage` when the file
    cannot be decoded or its shorter side is below ``min_size`` pixels.
    """
    import io

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as opened:
            opened.load()
            if opened.mode in ("RGBA", "LA") or (opened.mode == "P" and "transparency" in opened.info):
                rgba = opened.convert("RGBA")
                picture = Image.new("RGB", rgba.size, "white")
                picture.paste(rgba, mask=rgba.getchannel("A"))
            else:
                picture = opened.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise SkippedImage(f"unreadable image {name or source}: {error}") from None
    if min(picture.size) < min_size:
        raise SkippedImage(f"image {name or source} is {picture.size[0]}x{picture.size[1]}, "
                           f"smaller than the {min_size} px the stage needs")
    return from_pil([picture])[0]


# --- captioned folders -----------------------------------------------------------------------


@dataclass(frozen=True)
class CaptionRecord:
    """One training example: an image path, its caption and its split (None when not given)."""

    path: Path
    caption: str
    split: Optional[str] = None


def _numeric_subfolders(folder: Path) -> dict[int, Path]:
    return {int(child.name): child for child in folder.iterdir() if child.is_dir() and child.name.isdigit()}


def resolve_image_folder(folder: str | Path, min_size: int) -> Path:
    """Return the folder that holds the images to train on.

    A folder with image files is used as it is. A folder without image files but with
    numbered subfolders (one per image size, as ``64/``, ``256/``, ``1024/``) resolves to the
    smallest subfolder whose number is at least ``min_size``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data folder {str(folder)!r} not found: pass --data a folder of images with captions")
    if any(child.suffix.lower() in IMAGE_SUFFIXES for child in folder.iterdir()):
        return folder
    sizes = _numeric_subfolders(folder)
    large_enough = sorted(size for size in sizes if size >= min_size)
    if large_enough:
        chosen = sizes[large_enough[0]]
        logger.info("data folder %s: using the %s px images in %s", folder, large_enough[0], chosen)
        return chosen
    hint = f" (size subfolders: {sorted(sizes)}, none >= {min_size})" if sizes else ""
    raise ValueError(f"no image files in data folder {str(folder)!r}{hint}: pass --data a folder that holds "
                     f"images of at least {min_size} px")


def find_captions_file(image_folder: Path) -> Optional[Path]:
    """Return ``captions.jsonl`` in the image folder or its parent, or None."""
    for candidate in (image_folder / CAPTIONS_FILE, image_folder.parent / CAPTIONS_FILE):
        if candidate.is_file():
            return candidate
    return None


def _read_jsonl_records(captions_file: Path, image_folder: Path) -> list[CaptionRecord]:
    records = []
    with captions_file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{captions_file}:{number}: invalid JSON ({error})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or not isinstance(entry.get("caption"), str):
                raise ValueError(f"{captions_file}:{number}: expected an object with string keys 'file' and 'caption', "
                                 f"got {line.strip()[:200]!r}")
            split = entry.get("split")
            records.append(CaptionRecord(image_folder / entry["file"], entry["caption"], None if split is None else str(split)))
    return records


def _read_txt_records(image_folder: Path) -> tuple[list[CaptionRecord], int]:
    records, uncaptioned = [], 0
    for path in sorted(image_folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        caption_path = path.with_suffix(".txt")
        if not caption_path.is_file():
            uncaptioned += 1
            continue
        records.append(CaptionRecord(path, caption_path.read_text(encoding="utf-8").strip()))
    return records, uncaptioned


def read_caption_records(image_folder: str | Path, split: Optional[str] = None) -> list[CaptionRecord]:
    """List the captioned images of a folder, filtered to ``split`` when given.

    Captions come from ``captions.jsonl`` (in the folder or its parent) or from ``.txt``
    files beside the images. Entries whose image file is absent from the folder, and images
    without a caption, are left out and counted in the log. Only file names are checked here;
    images are decoded when a sample is read.
    """
    image_folder = Path(image_folder)
    captions_file = find_captions_file(image_folder)
    if captions_file is not None:
        records = _read_jsonl_records(captions_file, image_folder)
        source = str(captions_file)
    else:
        records, uncaptioned = _read_txt_records(image_folder)
        source = f".txt captions in {image_folder}"
        if uncaptioned:
            logger.warning("%s: left out %d images without a .txt caption", image_folder, uncaptioned)
    if split is not None:
        splits = sorted({str(record.split) for record in records})
        records = [record for record in records if record.split == split]
        if not records:
            raise ValueError(f"no records with split {split!r} in {source}: splits there are {splits}")
    present = [record for record in records if record.path.is_file()]
    if len(present) < len(records):
        logger.info("%s: left out %d of %d captions whose image is not in %s",
                    source, len(records) - len(present), len(records), image_folder)
    if not present:
        raise ValueError(f"no captioned images found from {source} in {image_folder}: add captions.jsonl "
                         f"or a .txt caption beside each image")
    return present


class ImageCaptionFolder(Dataset):
    """Lazily read captioned images as training pairs for one stage.

    ``dataset[(index, crop_seed)]`` returns a dict with ``image`` ``(3, S, S)`` in [-1, 1],
    ``lowres`` ``(3, s, s)`` or None, ``caption`` (str) and ``skipped`` (a list of
    ``(path, reason)``). An unusable image is replaced by the next usable one in index order,
    so a bad file costs one log line, never a crash; only a folder with no usable image raises.
    """

    def __init__(self, folder: str | Path, spec: ImageSpec, *, split: Optional[str] = None,
                 records: Optional[Sequence[CaptionRecord]] = None):
        self.spec = spec
        self.folder = resolve_image_folder(folder, spec.required_size)
        self.records = list(records) if records is not None else read_caption_records(self.folder, split)
        self._unusable: set[int] = set()  # per process: each worker learns the bad files it meets

    def __len__(self) -> int:
        return len(self.records)

    @property
    def captions(self) -> list[str]:
        return [record.caption for record in self.records]

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        index, crop_seed = key if isinstance(key, tuple) else (key, derive_seed("crop", key))
        skipped = []
        for attempt in range(len(self.records)):
            candidate = (index + attempt) % len(self.records)
            if candidate in self._unusable:
                continue
            record = self.records[candidate]
            try:
                pixels = load_image(record.path, self.spec.required_size)
            except SkippedImage as reason:
                self._unusable.add(candidate)
                skipped.append((str(record.path), str(reason)))
                continue
            image, lowres = make_training_pair(pixels, self.spec, torch.Generator().manual_seed(crop_seed))
            return {"image": image, "lowres": lowres, "caption": record.caption, "skipped": skipped}
        raise RuntimeError(f"no usable image in {self.folder}: all {len(self.records)} images are unreadable "
                           f"or smaller than {self.spec.required_size} px")


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples into a batch: ``image`` ``(B, 3, S, S)``, ``lowres`` ``(B, 3, s, s)`` or None, ``caption`` list."""
    lowres = [sample["lowres"] for sample in samples]
    return {
        "image": torch.stack([sample["image"] for sample in samples]),
        "lowres": None if lowres[0] is None else torch.stack(lowres),
        "caption": [sample["caption"] for sample in samples],
        "skipped": [entry for sample in samples for entry in sample["skipped"]],
    }


# --- deterministic batch order ---------------------------------------------------------------


def sample_position(micro: int, row: int, rank: int, world_size: int, batch_size: int) -> int:
    """Return the position ``k`` of a sample within its training step.

    Positions count micro-batch by micro-batch and, within one, rank by rank, so the ``G``
    samples of a step are numbered ``0 .. G - 1`` however they are split.
    """
    return (micro * world_size + rank) * batch_size + row


class StepBatchSampler(Sampler):
    """Yield one micro-batch of ``(index, crop_seed)`` keys at a time, from ``start_step`` on.

    A training step consumes ``G = batch_size * world_size * accumulation`` samples. Sample
    ``k`` of step ``s`` (``k`` counts micro-batch by micro-batch, rank by rank within a micro-batch)
    is the ``(s * G + k)``-th element of an endless sequence of permutations of the data set,
    one permutation per epoch seeded by ``(seed, epoch)``. Its crop seed depends on
    ``(seed, s, k)`` only. So the order depends on the global batch ``G``, never on how it is
    split into processes and micro-batches, nor on where a run was resumed.
    """

    def __init__(self, dataset_size: int, *, seed: int, batch_size: int, accumulation: int = 1,
                 rank: int = 0, world_size: int = 1, start_step: int = 0, total_steps: Optional[int] = None):
        if dataset_size < 1:
            raise ValueError(f"invalid dataset_size {dataset_size}: the data set is empty")
        if batch_size < 1 or accumulation < 1:
            raise ValueError(f"invalid batch_size {batch_size} or accumulation {accumulation}: both must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        self.dataset_size, self.seed = dataset_size, seed
        self.batch_size, self.accumulation = batch_size, accumulation
        self.rank, self.world_size = rank, world_size
        self.start_step, self.total_steps = start_step, total_steps
        self._permutation: tuple[int, torch.Tensor] | None = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size * self.accumulation

    def position_in_step(self, micro: int, row: int) -> int:
        """Return ``k`` of row ``row`` of micro-batch ``micro`` on this rank."""
        return sample_position(micro, row, self.rank, self.world_size, self.batch_size)

    def _index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.dataset_size)
        if self._permutation is None or self._permutation[0] != epoch:
            order = torch.randperm(self.dataset_size, generator=seeded_generator(self.seed, "order", epoch))
            self._permutation = (epoch, order)
        return int(self._permutation[1][offset])

    def keys_for(self, step: int, micro: int) -> list[tuple[int, int]]:
        """Return the ``(index, crop_seed)`` keys of micro-batch ``micro`` of ``step`` on this rank."""
        keys = []
        for row in range(self.batch_size):
            position = self.position_in_step(micro, row)
            keys.append((self._index_at(step * self.global_batch + position), derive_seed(self.seed, "crop", step, position)))
        return keys

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while self.total_steps is None or step < self.total_steps:
            for micro in range(self.accumulation):
                yield self.keys_for(step, micro)
            step += 1
