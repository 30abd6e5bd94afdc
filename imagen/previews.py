"""Sample grids written during training, drawn with the shared sampler from the EMA weights."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from PIL import Image
from torch import nn

from imagen.config import StageConfig
from imagen.diffusion import noise_augment, randn_like_per_sample
from imagen.images import make_grid, resize
from imagen.sampler import guided_model_fn, sample
from imagen.text_encoder import null_text_condition


@torch.no_grad()
def sample_stage(model: nn.Module, stage: StageConfig, text_embeds: torch.Tensor, text_mask: torch.Tensor,
                 lowres: Optional[torch.Tensor], generators: list[torch.Generator], *, num_steps: Optional[int] = None,
                 autocast_dtype: Optional[torch.dtype] = None, progress: bool = False) -> torch.Tensor:
    """Sample ``(B, 3, R, R)`` in [-1, 1] from one stage with its sampler, step count and guidance scale.

    ``text_embeds`` (B, L, D) and ``text_mask`` (B, L); the unconditional branch gets the null
    condition. For a super-resolution stage ``lowres`` (B, 3, r, r) in [-1, 1] is upsampled to R
    and noise-augmented at ``stage.sample_noise_aug_level`` with noise from ``generators``.
    """
    device = next(model.parameters()).device
    batch = text_embeds.shape[0]
    shape = (batch, 3, stage.resolution, stage.resolution)
    cond = {"text_embeds": text_embeds.to(device), "text_mask": text_mask.to(device),
            "lowres_image": None, "lowres_noise_level": None}
    if stage.is_super_resolution:
        if lowres is None:
            raise ValueError(f"stage {stage.name!r} is a super-resolution stage: pass low-resolution images to upsample")
        level = torch.full((batch,), stage.sample_noise_aug_level, device=device)
        eps = randn_like_per_sample(shape, generators, device)
        upsampled = resize(lowres.to(device), (stage.resolution, stage.resolution))
        cond["lowres_image"] = noise_augment(upsampled, level, stage.diffusion, eps)
        cond["lowres_noise_level"] = level
    null_embeds, null_mask = null_text_condition(batch, text_embeds.shape[1], text_embeds.shape[2], device=device)
    uncond = dict(cond, text_embeds=null_embeds, text_mask=null_mask)

    guided = guided_model_fn(model, cond, uncond, stage.guidance_scale)
    if autocast_dtype is not None:
        def model_fn(x: torch.Tensor, log_snr: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, dtype=autocast_dtype):
                return guided(x, log_snr).float()
    else:
        model_fn = guided
    return sample(model_fn, shape, diffusion=stage.diffusion, solver=stage.sampler,
                  num_steps=num_steps or stage.num_steps, thresholding=stage.thresholding, generators=generators, device=device, progress=progress)


def preview_grid(samples: torch.Tensor, lowres: Optional[torch.Tensor] = None,
                 reference: Optional[torch.Tensor] = None) -> Image.Image:
    """Tile samples in one row; for super-resolution, the upsampled inputs above and the references below."""
    rows = [samples]
    size = tuple(samples.shape[-2:])
    if lowres is not None:
        rows.insert(0, resize(lowres.to(samples.device, samples.dtype), size))
    if reference is not None:
        rows.append(resize(reference.to(samples.device, samples.dtype), size))
    return make_grid(torch.cat(rows), columns=samples.shape[0])


def write_preview(path: Path, samples: torch.Tensor, lowres: Optional[torch.Tensor] = None,
                  reference: Optional[torch.Tensor] = None) -> Path:
    """Write :func:`preview_grid` as a PNG, through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    preview_grid(samples, lowres, reference).save(temporary, format="PNG")
    temporary.replace(path)
    return path

