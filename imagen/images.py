"""Image tensors: conversions to and from PIL, antialiased resizing, and grids.

Model-space images are float tensors ``(B, 3, H, W)`` in [-1, 1]; PIL images are 8-bit RGB.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``(B, C, h, w)`` to ``(B, C, *size)`` with antialiased bicubic filtering.

    Antialiasing only changes downsampling; upsampling is plain bicubic. The result is
    clamped to [-1, 1] because bicubic filtering overshoots at edges.
    """
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    resized = F.interpolate(images.float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    return resized.clamp(-1.0, 1.0).to(images.dtype)


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Convert ``(B, 3, H, W)`` in [-1, 1] to a list of RGB PIL images."""
    return [Image.fromarray(array) for array in to_uint8(images)]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Convert ``(B, 3, H, W)`` in [-1, 1] to a ``(B, H, W, 3)`` uint8 array."""
    scaled = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round()
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def from_pil(images: Sequence[Image.Image]) -> torch.Tensor:
    """Convert RGB PIL images of one size to ``(B, 3, H, W)`` in [-1, 1]."""
    arrays = np.stack([np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def make_grid(images: torch.Tensor, columns: int | None = None, padding: int = 2) -> Image.Image:
    """Tile ``(B, 3, H, W)`` in [-1, 1] into one PIL image, ``columns`` per row (default: square-ish)."""
    count = images.shape[0]
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    height, width = images.shape[-2:]
    grid = Image.new("RGB", (columns * (width + padding) + padding, rows * (height + padding) + padding), "white")
    for index, image in enumerate(to_pil(images)):
        row, column = divmod(index, columns)
        grid.paste(image, (padding + column * (width + padding), padding + row * (height + padding)))
    return grid
