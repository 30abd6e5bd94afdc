"""Caption embeddings for training: the on-disk encoder cache with an in-memory copy in front of it."""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Optional, Sequence

import torch

from imagen.text_encoder import EmbeddingCache, stack_text

logger = logging.getLogger(__name__)


class CaptionEmbeddings:
    """Map captions to ``(embeds (B, L, D) float32, mask (B, L) bool)`` through an :class:`EmbeddingCache`.

    Recently used embeddings stay in memory (least recently used first out, at most
    ``max_bytes``), so a training step reads the disk cache only for captions it has not
    seen lately. ``L`` is the longest caption of the batch, at least 1. With
    ``write_cache=False`` (processes other than the main one) captions missing from the disk
    cache are encoded but not stored, so that only the main process writes files.
    """

    def __init__(self, cache: EmbeddingCache, max_bytes: int = 1 << 30, write_cache: bool = True):
        self.cache = cache
        self.max_bytes = max_bytes
        self.write_cache = write_cache
        self._memory: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._bytes = 0

    @property
    def dim(self) -> int:
        return self.cache.encoder.dim

    def _remember(self, caption: str, embedding: torch.Tensor) -> None:
        size = embedding.numel() * embedding.element_size()
        if caption in self._memory or size > self.max_bytes:
            return
        self._memory[caption] = embedding
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, dropped = self._memory.popitem(last=False)
            self._bytes -= dropped.numel() * dropped.element_size()

    def _fetch(self, captions: Sequence[str]) -> None:
        """Load (encoding if needed) the captions that are not in memory."""
        missing = [caption for caption in dict.fromkeys(captions) if caption not in self._memory]
        if not missing:
            return
        # NOTE: without write_cache, a caption missing from the disk cache is encoded in a batch that
        # depends on the data, and padding can change its embedding by rounding; a resumed run may
        # then differ slightly. Only WebDataset runs on several processes meet uncached captions.
        cached = missing if self.write_cache else [c for c in missing if self.cache.path_for(c).is_file()]
        uncached = [caption for caption in missing if caption not in set(cached)]
        for group, source in ((cached, self.cache.get), (uncached, self.cache.encoder.encode)):
            if not group:
                continue
            embeds, mask = source(group)
            for row, caption in enumerate(group):
                self._remember(caption, embeds[row, :int(mask[row].sum())].cpu().clone())

    def precompute(self, captions: Sequence[str], chunk_size: int = 256) -> None:
        """Encode every caption that the disk cache lacks, ``chunk_size`` at a time."""
        unique = list(dict.fromkeys(captions))
        for start in range(0, len(unique), chunk_size):
            self._fetch(unique[start:start + chunk_size])
        logger.info("text embeddings ready for %d captions (cache %s: %d read, %d encoded)",
                    len(unique), self.cache.folder, self.cache.hits, self.cache.misses)

    def lookup(self, captions: Sequence[str], device: Optional[torch.device] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the padded embeddings and mask of ``captions`` on ``device``."""
        self._fetch(captions)
        rows = []
        for caption in captions:
            embedding = self._memory.get(caption)
            if embedding is None:  # evicted within this batch: larger than max_bytes allows
                source = self.cache.get if self.write_cache else self.cache.encoder.encode
                embeds, mask = source([caption])
                embedding = embeds[0, :int(mask[0].sum())].cpu()
            else:
                self._memory.move_to_end(caption)
            rows.append(embedding)
        embeds, mask = stack_text(rows, self.dim)
        if embeds.shape[1] == 0:  # only empty captions: keep one masked position for attention
            embeds, mask = embeds.new_zeros(len(rows), 1, self.dim), mask.new_zeros(len(rows), 1)
        return embeds.to(device), mask.to(device)
