"""WebDataset tar shards of image and caption pairs, split across processes and loader workers.

A shard is a tar file in the WebDataset layout: files that share a key (the name before the
first dot) form one sample, ``KEY.png`` (or .jpg, .jpeg, .webp) with ``KEY.txt`` (the
caption) or ``KEY.json`` (an object with a ``caption`` key). Tars are read with the
``webdataset`` package; the split into processes and workers and the shuffling are done here,
so that they are deterministic and a resumed run can skip exactly what it already read.

Each (rank, worker) pair is one of ``world_size * num_workers`` slots. With at least one shard
per slot, shards are dealt to slots; with fewer shards, every slot reads all shards and keeps
every ``num_slots``-th sample. Each slot repeats its stream epoch after epoch, with the shard
order and a shuffle buffer seeded by ``(seed, epoch, slot)``.
"""

from __future__ import annotations

import json
import logging
import random
from itertools import count
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
import webdataset
from torch.utils.data import IterableDataset, get_worker_info

from imagen.data import ImageSpec, SkippedImage, derive_seed, load_image, make_training_pair, seeded_generator

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")


def list_shards(source: str | Path) -> list[Path]:
    """Return the ``.tar`` shards of a folder (sorted), or the single shard ``source`` names."""
    source = Path(source)
    if source.is_file() and source.suffix == ".tar":
        return [source]
    shards = sorted(source.glob("*.tar")) if source.is_dir() else []
    if not shards:
        raise FileNotFoundError(f"no .tar shards at {str(source)!r}: pass --shards a folder of WebDataset .tar files or one .tar file")
    return shards


def _caption_of(sample: dict[str, Any]) -> Optional[str]:
    if "txt" in sample:
        return sample["txt"].decode("utf-8").strip()
    if "json" in sample:
        caption = json.loads(sample["json"]).get("caption")
        return caption if isinstance(caption, str) else None
    return None


class ShardStream(IterableDataset):
    """Endless (or ``epochs``-long) stream of training samples from WebDataset shards.

    Samples have the format of :class:`imagen.data.ImageCaptionFolder` items. An unusable
    sample (undecodable, too small, or without caption) is replaced by the slot's first usable
    sample and reported in ``skipped``, so every raw sample after it yields exactly one item
    (unusable samples before it yield none). That keeps
    ``skip_batches`` exact: when resuming after ``skip_batches`` batches of ``batch_size``,
    each worker skips the samples that its role produced before, decoding only leading unusable
    ones. A DataLoader takes batches from its workers in turn, which fixes how many each produced.
    """

    def __init__(self, shards: Sequence[str | Path], spec: ImageSpec, *, seed: int, rank: int = 0, world_size: int = 1,
                 epochs: Optional[int] = None, shuffle_buffer: int = 256, batch_size: int = 1, skip_batches: int = 0):
        super().__init__()
        if not shards:
            raise ValueError("no shards given: pass at least one .tar file")
        if not 0 <= rank < world_size:
            raise ValueError(f"invalid rank {rank} for world_size {world_size}")
        self.shards = [str(shard) for shard in shards]
        self.spec, self.seed = spec, seed
        self.rank, self.world_size = rank, world_size
        self.epochs, self.shuffle_buffer = epochs, shuffle_buffer
        self.batch_size, self.skip_batches = batch_size, skip_batches

    def _raw_samples(self, slot: int, num_slots: int, epoch: int) -> Iterator[dict[str, Any]]:
        order = torch.randperm(len(self.shards), generator=seeded_generator(self.seed, "shards", epoch)).tolist()
        by_shard = len(self.shards) >= num_slots
        chosen = order[slot::num_slots] if by_shard else order
        urls = [{"url": self.shards[index]} for index in chosen]
        for number, sample in enumerate(webdataset.tarfile_samples(iter(urls))):
            if by_shard or number % num_slots == slot:
                yield sample

    def _shuffled(self, samples: Iterator[dict[str, Any]], rng: random.Random) -> Iterator[dict[str, Any]]:
        buffer: list[dict[str, Any]] = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        while buffer:
            yield buffer.pop(rng.randrange(len(buffer)))

    def _decode(self, sample: dict[str, Any], epoch: int) -> dict[str, Any]:
        name = f"{sample.get('__url__', '?')}:{sample['__key__']}"
        caption = _caption_of(sample)
        image_key = next((key for key in IMAGE_KEYS if key in sample), None)
        if caption is None or image_key is None:
            raise SkippedImage(f"sample {name} has no caption (.txt or .json) or no image ({', '.join(IMAGE_KEYS)})")
        pixels = load_image(sample[image_key], self.spec.required_size, name)
        crop = torch.Generator().manual_seed(derive_seed(self.seed, "crop", sample["__key__"], epoch))
        image, lowres = make_training_pair(pixels, self.spec, crop)
        return {"image": image, "lowres": lowres, "caption": caption, "skipped": []}

    def slot_stream(self, slot: int, num_slots: int, skip: int = 0) -> Iterator[dict[str, Any]]:
        """Yield the samples of slot ``slot`` of ``num_slots``, leaving out the first ``skip``."""
        stand_in: Optional[dict[str, Any]] = None  # the slot's first usable sample replaces unusable ones
        skipped: list[tuple[str, str]] = []
        epochs = count() if self.epochs is None else range(self.epochs)
        for epoch in epochs:
            rng = random.Random(derive_seed(self.seed, "buffer", epoch, slot, num_slots))
            for raw in self._shuffled(self._raw_samples(slot, num_slots, epoch), rng):
                if skip > 0 and stand_in is not None:
                    skip -= 1  # produced before the resume: no need to decode it
                    continue
                try:
                    item = self._decode(raw, epoch)
                except SkippedImage as reason:
                    skipped.append((f"{raw.get('__url__', '?')}:{raw['__key__']}", str(reason)))
                    if stand_in is None:
                        continue  # nothing to stand in yet, so this raw sample yields nothing
                    item = dict(stand_in)
                if stand_in is None:
                    stand_in = dict(item, skipped=[])
                if skip > 0:
                    skip -= 1
                    skipped = []  # reported by the run that read these samples first
                    continue
                item["skipped"], skipped = skipped, []
                yield item
            if stand_in is None:
                raise RuntimeError(f"slot {slot} of {num_slots} found no usable sample in {len(self.shards)} shards")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        # A loader takes batch n from worker n % workers, starting again at worker 0 after a resume.
        # Batch n of the whole run belongs to role n % workers, so this worker plays the role of
        # the batches it will now be asked for, and skips that role's batches before the resume.
        role = (worker + self.skip_batches) % workers
        batches_before = (self.skip_batches - role + workers - 1) // workers if self.skip_batches > role else 0
        return self.slot_stream(self.rank * workers + role, self.world_size * workers, batches_before * self.batch_size)
