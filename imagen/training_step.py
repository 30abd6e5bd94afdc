"""The diffusion training loss of one stage, with every random draw taken from per-sample seeds.

Each sample has one generator, seeded with the sample's seed. It draws three uniform numbers
(the time ``t`` in [0, 1], the caption-dropout draw, and the noise-augmentation level of the
low-resolution image in ``[0, train_noise_aug_max]``), then the image noise ``eps``, then the
augmentation noise. So a sample's loss depends on its seed, never on its batch or position,
and a resumed run draws exactly the same values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from imagen.config import StageConfig
from imagen.diffusion import diffusion_loss, log_snr_from_t, noise_augment, q_sample, randn_like_per_sample
from imagen.images import resize
from imagen.text_encoder import null_text_condition


@dataclass
class SampleNoise:
    """Random draws for a batch: ``t``, ``drop_caption``, ``lowres_level`` (B,); ``eps`` and ``lowres_eps`` (B, 3, H, W)."""

    t: torch.Tensor
    drop_caption: torch.Tensor
    lowres_level: Optional[torch.Tensor]
    eps: torch.Tensor
    lowres_eps: Optional[torch.Tensor]


def draw_sample_noise(seeds: Sequence[int], image_shape: Sequence[int], stage: StageConfig,
                      caption_dropout: float) -> SampleNoise:
    """Draw the training randomness of ``len(seeds)`` samples on the CPU, one generator per seed.

    ``image_shape`` is ``(B, 3, H, W)`` of the (cropped) training images; the augmentation noise
    has the same shape because the low-resolution image is upsampled to it first.
    """
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    scalars = torch.stack([torch.rand(3, generator=generator) for generator in generators])
    eps = randn_like_per_sample(image_shape, generators)
    lowres_level = lowres_eps = None
    if stage.is_super_resolution:
        lowres_level = scalars[:, 2] * stage.train_noise_aug_max
        lowres_eps = randn_like_per_sample(image_shape, generators)
    return SampleNoise(t=scalars[:, 0], drop_caption=scalars[:, 1] < caption_dropout,
                       lowres_level=lowres_level, eps=eps, lowres_eps=lowres_eps)


def drop_captions(embeds: torch.Tensor, mask: torch.Tensor, drop: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the text of samples where ``drop`` (B,) is True by the null condition.

    ``embeds`` (B, L, D) and ``mask`` (B, L) bool. The null condition is the one the sampler's
    unconditional branch uses (:func:`imagen.text_encoder.null_text_condition`).
    """
    null_embeds, null_mask = null_text_condition(embeds.shape[0], embeds.shape[1], embeds.shape[2],
                                                 device=embeds.device, dtype=embeds.dtype)
    drop = drop.to(embeds.device)
    return (torch.where(drop[:, None, None], null_embeds, embeds), torch.where(drop[:, None], null_mask, mask))


def stage_loss(model: nn.Module, stage: StageConfig, images: torch.Tensor, lowres: Optional[torch.Tensor],
               text_embeds: torch.Tensor, text_mask: torch.Tensor, noise: SampleNoise,
               memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """Return the per-sample diffusion loss (B,) of ``model`` on a batch of one stage.

    ``images`` (B, 3, H, W) in [-1, 1]; ``lowres`` (B, 3, h, w) for super-resolution stages, else
    None; ``text_embeds`` (B, L, D) and ``text_mask`` (B, L) before caption dropout. The noisy
    image is ``x_t = alpha x0 + sigma eps`` at ``log_snr(t)``; a low-resolution image is
    upsampled to (H, W) and noise-augmented at its level, and the model receives the level.
    """
    device = images.device
    diffusion = stage.diffusion
    log_snr = log_snr_from_t(noise.t.to(device), diffusion)
    eps = noise.eps.to(device)
    x_t = q_sample(images, log_snr, eps).contiguous(memory_format=memory_format)
    text_embeds, text_mask = drop_captions(text_embeds, text_mask, noise.drop_caption)

    lowres_image = lowres_level = None
    if stage.is_super_resolution:
        if lowres is None:
            raise ValueError(f"stage {stage.name!r} is a super-resolution stage: pass the low-resolution images")
        upsampled = resize(lowres, tuple(images.shape[-2:]))
        lowres_level = noise.lowres_level.to(device)
        lowres_image = noise_augment(upsampled, lowres_level, diffusion, noise.lowres_eps.to(device))
        lowres_image = lowres_image.contiguous(memory_format=memory_format)

    prediction = model(x_t, log_snr, text_embeds, text_mask, lowres_image=lowres_image, lowres_noise_level=lowres_level)
    return diffusion_loss(prediction, images, eps, log_snr, diffusion.objective, diffusion.min_snr_gamma)
