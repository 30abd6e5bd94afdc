"""Argument checks and conversions for :class:`imagen.pipeline.ImagenPipeline`.

Each check raises ValueError or TypeError naming the argument, the value received, what is
valid and how to fix it. Per-stage settings accept one value for every stage, a list with one
value per stage, or a dict keyed by stage name.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .config import SAMPLERS, THRESHOLDING, StageConfig
from .images import from_pil, to_pil, to_uint8

OUTPUT_TYPES = ("pil", "np", "pt")
_SEED_LIMIT = 2**63  # torch.Generator.manual_seed accepts seeds in [0, 2**64); s + i must stay below it


@dataclass(frozen=True)
class StageSettings:
    """Resolved sampling settings of one stage; ``noise_aug_level`` is None for the base stage."""

    name: str
    height: int
    width: int
    guidance_scale: float
    num_steps: int
    sampler: str
    noise_aug_level: Optional[float]
    thresholding: str


# --- prompts ----------------------------------------------------------------------------------


def check_prompts(prompt: Any, key: str = "prompt") -> list[str]:
    """Return ``prompt`` (a string or a non-empty list of strings) as a list of strings."""
    if isinstance(prompt, str):
        return [prompt]
    if not isinstance(prompt, (list, tuple)):
        raise TypeError(f"invalid {key} {prompt!r} of type {type(prompt).__name__}: pass a string or a list of strings")
    if len(prompt) == 0:
        raise ValueError(f"{key} is an empty list: pass at least one prompt string")
    for index, item in enumerate(prompt):
        if not isinstance(item, str):
            raise TypeError(f"{key}[{index}] is {type(item).__name__} {item!r}: every prompt must be a string")
    return list(prompt)


def check_negative_prompts(negative_prompt: Any, num_prompts: int) -> Optional[list[str]]:
    """Return one negative prompt per prompt (a single string applies to all), or None."""
    if negative_prompt is None:
        return None
    negatives = check_prompts(negative_prompt, "negative_prompt")
    if len(negatives) == 1:
        return negatives * num_prompts
    if len(negatives) != num_prompts:
        raise ValueError(
            f"got {len(negatives)} negative prompts for {num_prompts} prompts: pass one negative prompt, "
            "or one per prompt"
        )
    return negatives


def check_positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"invalid {key} {value!r}: expected an integer >= 1")
    return int(value)


# --- per-stage settings -------------------------------------------------------------------------


def check_guidance_scale(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"invalid {key} {value!r}: expected a finite number >= 0 (1.0 = no guidance, 5.0 = strong)")
    return float(value)


def check_num_steps(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"invalid {key} {value!r}: expected an integer >= 1 (model evaluations per stage)")
    return int(value)


def check_sampler(key: str, value: Any) -> str:
    if value not in SAMPLERS:
        raise ValueError(f"invalid {key} {value!r}: expected one of {', '.join(map(repr, SAMPLERS))}")
    return value


def check_noise_aug_level(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"invalid {key} {value!r}: expected a number in [0, 1] (0 = clean low-resolution image, 1 = pure noise)")
    return float(value)


def check_thresholding(key: str, value: Any) -> str:
    if value not in THRESHOLDING:
        raise ValueError(f"invalid {key} {value!r}: expected one of {', '.join(map(repr, THRESHOLDING))}")
    return value


def per_stage(
    value: Any,
    key: str,
    run: Sequence[StageConfig],
    cascade: Sequence[StageConfig],
    default: Callable[[StageConfig], Any],
    check: Callable[[str, Any], Any],
) -> list[Any]:
    """Resolve a per-stage argument to one checked value per stage in ``run``.

    ``value`` may be None (each stage's default), one value, a list or tuple with one value
    per stage of ``run`` or per stage of ``cascade`` (in order), or a dict keyed by stage name
    (stages it omits take their default).
    """
    names = [stage.name for stage in run]
    if value is None:
        return [check(f"{key} of stage {stage.name!r}", default(stage)) for stage in run]
    if isinstance(value, Mapping):
        known = {stage.name for stage in cascade}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{key} names unknown stage {unknown[0]!r}: the stages are {[s.name for s in cascade]}")
        return [check(f"{key}[{stage.name!r}]", value[stage.name] if stage.name in value else default(stage)) for stage in run]
    if isinstance(value, (list, tuple)):
        if len(value) == len(run):
            chosen = list(value)
        elif len(value) == len(cascade):
            offsets = {stage.name: index for index, stage in enumerate(cascade)}
            chosen = [value[offsets[name]] for name in names]
        else:
            counts = sorted({len(run), len(cascade)})
            raise ValueError(
                f"got {len(value)} values for {key}: pass one value, or one per stage "
                f"({' or '.join(map(str, counts))} values for the stages {names})"
            )
        return [check(f"{key} of stage {name!r}", item) for name, item in zip(names, chosen)]
    return [check(key, value) for _ in run]


# --- sizes --------------------------------------------------------------------------------------


def stage_sizes(
    stages: Sequence[StageConfig], height: Any, width: Any, reference_resolution: int, key: str = "height/width"
) -> list[tuple[int, int]]:
    """Return the ``(height, width)`` of each stage's output for an input of ``height`` x ``width``.

    ``reference_resolution`` is the square size that ``height`` x ``width`` stands in for:
    stage k outputs ``height * stages[k].resolution / reference_resolution`` rows, likewise for
    columns. Each size must be a whole number and a multiple of that U-Net's downsampling factor.
    """
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"invalid {name} {value!r}: expected a positive integer, such as {reference_resolution}")
    sizes = []
    for stage in stages:
        factor = stage.unet.downsample_factor
        size = []
        for value in (height, width):
            scaled, remainder = divmod(int(value) * stage.resolution, reference_resolution)
            if remainder or scaled % factor:
                raise ValueError(
                    f"invalid {key} {height}x{width}: stage {stage.name!r} would output "
                    f"{int(value) * stage.resolution / reference_resolution:g} pixels, which is not a whole multiple of its "
                    f"U-Net's downsampling factor {factor}; use multiples of {reference_resolution}"
                )
            size.append(scaled)
        sizes.append((size[0], size[1]))
    return sizes


# --- seeds --------------------------------------------------------------------------------------


def make_generators(batch_size: int, generator: Any, seed: Any) -> tuple[list[torch.Generator], Optional[list[int]]]:
    """Return one CPU generator per image and the per-image seeds (None when generators were given).

    Image ``i`` gets seed ``seed + i``. Without a seed or generators, a seed is drawn from
    torch's global random state, so ``torch.manual_seed`` before the call makes it repeatable.
    """
    if generator is not None and seed is not None:
        raise ValueError(f"got both generator and seed={seed!r}: pass only one of them")
    if generator is not None:
        generators = [generator] if isinstance(generator, torch.Generator) else generator
        if not isinstance(generators, (list, tuple)) or not all(isinstance(g, torch.Generator) for g in generators):
            raise TypeError(f"invalid generator {generator!r}: pass a list of torch.Generator, one per image")
        if len(generators) != batch_size:
            raise ValueError(
                f"got {len(generators)} generators for {batch_size} images: pass one torch.Generator per image "
                "(number of prompts x num_images_per_prompt), or a seed"
            )
        return list(generators), None
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed <= _SEED_LIMIT - batch_size:
        raise ValueError(f"invalid seed {seed!r}: expected an integer in [0, 2**63 - number of images]")
    seeds = [int(seed) + index for index in range(batch_size)]
    return [torch.Generator("cpu").manual_seed(value) for value in seeds], seeds


# --- images -------------------------------------------------------------------------------------


def image_to_tensor(image: Any) -> torch.Tensor:
    """Convert a low-resolution input image to ``(B, 3, H, W)`` float32 in [-1, 1] on the CPU.

    Accepted: a PIL image or a list of them; a numpy array ``(H, W, 3)`` or ``(B, H, W, 3)``,
    uint8 in [0, 255] or float in [0, 1]; a tensor ``(3, H, W)`` or ``(B, 3, H, W)`` in [-1, 1].
    """
    if isinstance(image, Image.Image):
        return from_pil([image])
    if isinstance(image, (list, tuple)) and image and all(isinstance(item, Image.Image) for item in image):
        sizes = {item.size for item in image}
        if len(sizes) > 1:
            raise ValueError(f"images have different sizes {sorted(sizes)}: pass images of one size")
        return from_pil(list(image))
    if isinstance(image, np.ndarray):
        array = image[None] if image.ndim == 3 else image
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"invalid image array of shape {image.shape}: expected (H, W, 3) or (B, H, W, 3)")
        if array.dtype == np.uint8:
            tensor = torch.from_numpy(array.astype(np.float32) / 127.5 - 1.0)
        elif np.issubdtype(array.dtype, np.floating):
            if array.min() < 0 or array.max() > 1:
                raise ValueError(
                    f"float image array in [{array.min():g}, {array.max():g}]: expected values in [0, 1], or pass uint8"
                )
            tensor = torch.from_numpy(array.astype(np.float32) * 2.0 - 1.0)
        else:
            raise TypeError(f"invalid image array dtype {array.dtype}: expected uint8 or float")
        return tensor.permute(0, 3, 1, 2).contiguous()
    if isinstance(image, torch.Tensor):
        tensor = image[None] if image.dim() == 3 else image
        if tensor.dim() != 4 or tensor.shape[1] != 3 or not tensor.is_floating_point():
            raise ValueError(
                f"invalid image tensor of shape {tuple(image.shape)} and dtype {image.dtype}: "
                "expected float (3, H, W) or (B, 3, H, W) in [-1, 1]"
            )
        return tensor.detach().float().cpu().clamp(-1.0, 1.0)
    raise TypeError(
        f"invalid image of type {type(image).__name__}: pass a PIL image, a numpy array (H, W, 3) "
        "or a tensor (B, 3, H, W) in [-1, 1]"
    )


def check_output_type(output_type: Any) -> str:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"invalid output_type {output_type!r}: expected one of {', '.join(map(repr, OUTPUT_TYPES))}")
    return output_type


def convert_output(images: torch.Tensor, output_type: str) -> Union[list[Image.Image], np.ndarray, torch.Tensor]:
    """Convert ``(B, 3, H, W)`` in [-1, 1] to PIL images, a uint8 array ``(B, H, W, 3)`` or a CPU float tensor."""
    if output_type == "pil":
        return to_pil(images)
    if output_type == "np":
        return to_uint8(images)
    return images.detach().float().cpu()
