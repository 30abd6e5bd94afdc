"""Efficient U-Net of Imagen (Saharia et al., 2022, appendix B), one class for every stage.

Layout, from full resolution down (level ``i`` works at ``resolution / 2**i`` with
``base_channels * channel_mults[i]`` channels):

* Down block ``i``: a stride-2 convolution first (levels > 0), then ``num_res_blocks[i]``
  residual blocks, then attention at the levels where the config enables it. Downsampling before the
  convolutions runs them at the lower resolution (the paper's "Efficient U-Net" change).
* Up block ``i``: concatenation with down block ``i``'s output scaled by 1/sqrt(2) (except at
  the lowest level, which continues from down block ``i`` directly), the residual blocks, the
  attention, then a learned 2x upsampling (:class:`Upsample`) to level ``i - 1``.
* Conditioning: a sinusoidal embedding of log-SNR, plus an attention-pooled text vector, plus
  (super-resolution) an embedding of the low-resolution image's noise-augmentation level, summed
  into one ``cond_dim`` vector that scales and shifts every residual block's second norm.

The model is written for channels_last memory: attention tokens are views of channels_last
feature maps, and :class:`imagen.norm.GroupNorm` avoids PyTorch's slow channels_last bfloat16
GroupNorm backward pass.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from imagen.attention import AttentionPool, ImageAttention, TextContext
from imagen.config import UNetConfig
from imagen.norm import GroupNorm, group_norm, num_groups_for

SKIP_SCALE = 2.0 ** -0.5  # scale of the U-Net skip connections (Imagen, appendix B)

# log-SNR in [-20, 20] is multiplied by this before the sinusoidal embedding, so the embedding
# spans about the same range as the usual 0..1000 timestep (the fastest frequency has a
# period of 2*pi/25 = 0.25 log-SNR units).
LOG_SNR_EMBED_SCALE = 25.0
NOISE_LEVEL_EMBED_SCALE = 1000.0  # noise-augmentation level in [0, 1] -> 0..1000


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def sinusoidal_embedding(values: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Embed scalars (B,) as (B, dim) float32 ``[cos(v * f_k), sin(v * f_k)]``.

    Frequencies ``f_k = max_period ** (-k / (dim / 2))`` for ``k < dim / 2`` (Vaswani et al., 2017);
    ``dim`` must be even.
    """
    half = dim // 2
    exponents = torch.arange(half, device=values.device, dtype=torch.float32) / half
    freqs = torch.exp(-math.log(max_period) * exponents)
    angles = values.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class ScalarEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar per sample (B,), followed by a 2-layer MLP to ``cond_dim``."""

    def __init__(self, cond_dim: int, scale: float):
        super().__init__()
        self.scale = scale
        self.freq_dim = max(64, min(256, cond_dim // 2 * 2))
        self.mlp = nn.Sequential(nn.Linear(self.freq_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(values * self.scale, self.freq_dim))


class ResBlock(nn.Module):
    """GroupNorm, SiLU, 3x3 conv, GroupNorm with FiLM from the conditioning vector, SiLU, 3x3 conv, plus skip.

    ``cond`` is SiLU of the conditioning vector, (B, cond_dim). The second convolution starts at
    zero, so the block starts as its skip path (a 1x1 convolution when the width changes).
    """

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int, dropout: float):
        super().__init__()
        self.norm1 = GroupNorm(num_groups_for(in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2_groups = num_groups_for(out_channels)
        self.film = nn.Linear(cond_dim, 2 * out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(cond).chunk(2, dim=1)
        h = group_norm(h, self.norm2_groups, 1.0 + scale, shift)
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.skip(x)


class Upsample(nn.Module):
    """2x upsampling (B, C_in, H, W) -> (B, C_out, 2H, 2W): each pixel maps linearly to a 2x2 patch.

    The same function as a transposed convolution with kernel 2 and stride 2, computed as one
    matrix product on the channels_last pixels followed by a pixel shuffle. Forward plus backward,
    that measured 1.5-2x faster than ``nn.ConvTranspose2d`` under bfloat16 autocast in
    channels_last (PyTorch 2.13, 2-core AVX-512 CPU, batch 8, the up-sampling shapes of a
    64-128-192-256 channel U-Net at 64 px).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.out_channels = out_channels
        self.proj = nn.Linear(in_channels, 4 * out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        patches = self.proj(x.permute(0, 2, 3, 1))  # (B, H, W, 4 * C_out); no copy for channels_last x
        patches = patches.view(batch, height, width, 2, 2, self.out_channels).permute(0, 1, 3, 2, 4, 5)
        pixels = patches.reshape(batch, 2 * height, 2 * width, self.out_channels)
        return pixels.permute(0, 3, 1, 2).contiguous(memory_format=_memory_format(x))


class Level(nn.Module):
    """Residual blocks and optional attention at one resolution: the body of a down or up block."""

    def __init__(self, in_channels: int, channels: int, num_blocks: int, cfg: UNetConfig, level: int):
        super().__init__()
        self.blocks = nn.ModuleList(
            ResBlock(in_channels if index == 0 else channels, channels, cfg.cond_dim, cfg.dropout)
            for index in range(num_blocks)
        )
        self_attn, cross_attn = cfg.self_attention[level], cfg.cross_attention[level]
        self.attention = (
            ImageAttention(channels, cfg.head_dim, cfg.cond_dim, self_attn, cross_attn)
            if (self_attn or cross_attn)
            else None
        )
        self.gradient_checkpointing = cfg.gradient_checkpointing

    def _run(self, module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor):
        for block in self.blocks:
            x = self._run(block, x, cond)
        if self.attention is not None:
            x = self._run(self.attention, x, context, context_mask)
        return x


class EfficientUNet(nn.Module):
    """Imagen's Efficient U-Net for a base (text-to-image) or super-resolution stage.

    ``forward(x, log_snr, text_embeds, text_mask, lowres_image, lowres_noise_level)`` maps a
    noisy image (B, in_channels, H, W) to the prediction (B, out_channels, H, W) in the
    diffusion objective's space. H and W must be multiples of ``cfg.downsample_factor``.
    """

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        widths = [cfg.base_channels * mult for mult in cfg.channel_mults]
        self.widths = widths
        levels = len(widths)
        input_channels = cfg.in_channels * (2 if cfg.lowres_cond else 1)

        self.log_snr_embed = ScalarEmbedding(cfg.cond_dim, LOG_SNR_EMBED_SCALE)
        self.noise_level_embed = ScalarEmbedding(cfg.cond_dim, NOISE_LEVEL_EMBED_SCALE) if cfg.lowres_cond else None
        self.text_context = TextContext(cfg.text_embed_dim, cfg.cond_dim)
        self.text_pool = AttentionPool(cfg.cond_dim, cfg.cond_dim, cfg.head_dim)

        self.init_conv = nn.Conv2d(input_channels, widths[0], 3, padding=1)
        self.downsamples = nn.ModuleList(
            nn.Conv2d(widths[i - 1], widths[i], kernel_size=2, stride=2) for i in range(1, levels)
        )
        self.down_levels = nn.ModuleList(
            Level(widths[i], widths[i], cfg.num_res_blocks[i], cfg, i) for i in range(levels)
        )
        # The lowest up level continues from the lowest down level; the others take a skip too.
        self.up_levels = nn.ModuleList(
            Level(widths[i] if i == levels - 1 else 2 * widths[i], widths[i], cfg.num_res_blocks[i], cfg, i)
            for i in range(levels)
        )
        self.upsamples = nn.ModuleList(Upsample(widths[i], widths[i - 1]) for i in range(1, levels))
        self.out_norm = GroupNorm(num_groups_for(widths[0]), widths[0])
        self.out_conv = nn.Conv2d(widths[0], cfg.out_channels, 3, padding=1)

    def check_inputs(
        self,
        x: torch.Tensor,
        log_snr: torch.Tensor,
        text_embeds: Optional[torch.Tensor],
        text_mask: Optional[torch.Tensor],
        lowres_image: Optional[torch.Tensor],
        lowres_noise_level: Optional[torch.Tensor],
    ) -> None:
        """Raise ValueError naming the first input whose shape or presence does not fit the config."""
        cfg = self.cfg
        factor = cfg.downsample_factor
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"x has shape {tuple(x.shape)}: expected (B, {cfg.in_channels}, H, W) for this U-Net config"
            )
        batch, _, height, width = x.shape
        if height % factor or width % factor:
            raise ValueError(
                f"image shape {tuple(x.shape)} is invalid: height and width must be multiples of the U-Net's "
                f"downsampling factor {factor}; pad or resize to ({-(-height // factor) * factor}, "
                f"{-(-width // factor) * factor})"
            )
        if log_snr.shape != (batch,):
            raise ValueError(f"log_snr has shape {tuple(log_snr.shape)}: expected ({batch},), one value per image")
        if text_embeds is not None:
            if text_embeds.dim() != 3 or text_embeds.shape[0] != batch or text_embeds.shape[2] != cfg.text_embed_dim:
                raise ValueError(
                    f"text_embeds has shape {tuple(text_embeds.shape)}: expected ({batch}, L, {cfg.text_embed_dim})"
                )
            if text_mask is not None and (text_mask.shape != text_embeds.shape[:2] or text_mask.dtype != torch.bool):
                raise ValueError(
                    f"text_mask has shape {tuple(text_mask.shape)} and dtype {text_mask.dtype}: expected a bool "
                    f"tensor of shape {tuple(text_embeds.shape[:2])}"
                )
        elif text_mask is not None:
            raise ValueError("text_mask was given without text_embeds: pass both, or neither for unconditional")
        if cfg.lowres_cond:
            if lowres_image is None or lowres_noise_level is None:
                raise ValueError(
                    "missing lowres_image or lowres_noise_level: this super-resolution U-Net needs the "
                    "low-resolution image upsampled to the size of x and its noise-augmentation level (B,)"
                )
            if lowres_image.shape != x.shape:
                raise ValueError(
                    f"lowres_image has shape {tuple(lowres_image.shape)}: expected {tuple(x.shape)}, the shape of x "
                    "(upsample it before the call)"
                )
            if lowres_noise_level.shape != (batch,):
                raise ValueError(f"lowres_noise_level has shape {tuple(lowres_noise_level.shape)}: expected ({batch},)")
        elif lowres_image is not None or lowres_noise_level is not None:
            raise ValueError(
                "lowres_image and lowres_noise_level are only for super-resolution U-Nets (lowres_cond=true); "
                "pass None to this base U-Net"
            )

    def forward(
        self,
        x: torch.Tensor,
        log_snr: torch.Tensor,
        text_embeds: Optional[torch.Tensor] = None,
        text_mask: Optional[torch.Tensor] = None,
        lowres_image: Optional[torch.Tensor] = None,
        lowres_noise_level: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Predict (B, out_channels, H, W) from the noisy image ``x`` (B, in_channels, H, W).

        ``log_snr`` (B,) is the noise level of ``x``. ``text_embeds`` (B, L, D) with ``text_mask``
        (B, L) bool (True = real token; None = all True) conditions on text; ``text_embeds=None`` or
        an all-False mask means unconditional. Super-resolution stages also take ``lowres_image``
        (B, in_channels, H, W), already upsampled and noise-augmented, and its augmentation level
        ``lowres_noise_level`` (B,) in [0, 1].
        """
        self.check_inputs(x, log_snr, text_embeds, text_mask, lowres_image, lowres_noise_level)
        batch = x.shape[0]
        if text_embeds is not None and text_mask is None:
            text_mask = torch.ones(text_embeds.shape[:2], dtype=torch.bool, device=x.device)

        context, context_mask = self.text_context(text_embeds, text_mask, batch)
        cond = self.log_snr_embed(log_snr) + self.text_pool(context, context_mask)
        if self.cfg.lowres_cond:
            cond = cond + self.noise_level_embed(lowres_noise_level)
            x = torch.cat([x, lowres_image.to(x.dtype)], dim=1)
        cond = F.silu(cond)

        h = self.init_conv(x)
        skips = []
        for level, body in enumerate(self.down_levels):
            if level > 0:
                h = self.downsamples[level - 1](h)
            h = body(h, cond, context, context_mask)
            skips.append(h)

        top = len(self.up_levels) - 1
        for level in range(top, -1, -1):
            if level < top:
                h = torch.cat([h, skips[level] * SKIP_SCALE], dim=1)
            h = self.up_levels[level](h, cond, context, context_mask)
            if level > 0:
                h = self.upsamples[level - 1](h)

        return self.out_conv(F.silu(self.out_norm(h)))
