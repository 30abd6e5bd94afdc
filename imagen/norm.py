"""Group normalization with a fast backward pass for bfloat16 channels_last tensors.

In PyTorch 2.13 on CPU, the GroupNorm backward pass is about 15x slower on a bfloat16
channels_last input than on the same tensor in NCHW layout. Measured on a 2-core AVX-512 CPU
with an (8, 64, 64, 64) tensor, it takes 5.3 ms against 0.34 ms, while the forward pass is fast
in both layouts. :class:`GroupNorm` keeps the native forward pass and computes the gradient
with a few vectorized elementwise passes and per-channel sums over the (B, H*W, C) view that
channels_last memory already is. Other dtypes, layouts and devices use
``torch.nn.functional.group_norm``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

MAX_GROUPS = 32


def num_groups_for(channels: int) -> int:
    """Return the GroupNorm group count for ``channels``: the largest divisor up to 32 with 2+ channels per group.

    With one channel per group the norm would subtract a preceding convolution's bias exactly,
    leaving that bias without effect. A single channel gets one group.
    """
    for groups in range(min(MAX_GROUPS, max(channels // 2, 1)), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def _is_bf16_channels_last(x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dim() == 4
        and x.dtype == torch.bfloat16
        and x.is_contiguous(memory_format=torch.channels_last)
        and not x.is_contiguous()
    )


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """View a channels_last (B, C, H, W) tensor as (B, H*W, C) without a copy."""
    batch, channels, height, width = x.shape
    return x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)


class _ChannelsLastGroupNorm(torch.autograd.Function):
    """GroupNorm on a bfloat16 channels_last CPU input, with per-channel or per-sample affine.

    ``weight`` and ``bias`` are None, (C,) or (B, C); statistics and parameter gradients are float32.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, groups: int, eps: float):
        batch, channels, height, width = x.shape
        per_sample = weight is not None and weight.dim() == 2
        # A float32 weight makes the native kernel return float32 mean and rstd for the backward pass.
        native_weight = x.new_ones(channels, dtype=torch.float32) if weight is None or per_sample else weight.float()
        native_bias = None if bias is None or per_sample else bias.float()
        out, mean, rstd = torch.ops.aten.native_group_norm(
            x, native_weight, native_bias, batch, channels, height * width, groups, eps
        )
        if per_sample:
            # FiLM: scale and shift per image and channel, applied to the normalized (B, H*W, C) tokens.
            shift = bias.to(x.dtype).unsqueeze(1) if bias is not None else torch.zeros_like(weight, dtype=x.dtype).unsqueeze(1)
            out = _image(torch.addcmul(shift, _tokens(out), weight.to(x.dtype).unsqueeze(1)), height, width)
        gamma = weight.float().expand(batch, channels) if weight is not None else native_weight.expand(batch, channels)
        ctx.save_for_backward(x, gamma, mean, rstd)
        ctx.groups = groups
        ctx.weight_shape = None if weight is None else weight.shape
        ctx.bias_shape = None if bias is None else bias.shape
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, gamma, mean, rstd = ctx.saved_tensors
        groups = ctx.groups
        batch, channels, height, width = x.shape
        per_group = channels // groups
        count = height * width * per_group
        dtype = x.dtype

        # Per-(B, C) copies of the per-(B, G) statistics.
        mean_c = mean.repeat_interleave(per_group, dim=1)
        rstd_c = rstd.repeat_interleave(per_group, dim=1)

        x_tokens = _tokens(x)
        if not grad_out.is_contiguous(memory_format=torch.channels_last):
            grad_out = grad_out.contiguous(memory_format=torch.channels_last)
        grad_tokens = _tokens(grad_out)

        # x_hat = (x - mean) * rstd, recomputed in one pass.
        x_hat = torch.addcmul((-mean_c * rstd_c).to(dtype).unsqueeze(1), x_tokens, rstd_c.to(dtype).unsqueeze(1))
        sum_grad = grad_tokens.sum(1).float()  # (B, C), accumulated in float32 and rounded once
        sum_grad_xhat = (grad_tokens * x_hat).sum(1).float()

        # dx = rstd * (g * dy - mean_group(g * dy) - x_hat * mean_group(g * dy * x_hat)), g = gamma.
        k1 = (gamma * sum_grad).view(batch, groups, per_group).sum(-1) / count
        k2 = (gamma * sum_grad_xhat).view(batch, groups, per_group).sum(-1) / count
        k1 = k1.repeat_interleave(per_group, dim=1)
        k2 = k2.repeat_interleave(per_group, dim=1)
        coeff_grad = rstd_c * gamma
        coeff_xhat = -rstd_c * k2
        offset = -rstd_c * k1
        grad_x = torch.addcmul(offset.to(dtype).unsqueeze(1), x_hat, coeff_xhat.to(dtype).unsqueeze(1))
        grad_x.addcmul_(grad_tokens, coeff_grad.to(dtype).unsqueeze(1))

        grad_weight = grad_bias = None
        if ctx.weight_shape is not None:
            grad_weight = sum_grad_xhat if len(ctx.weight_shape) == 2 else sum_grad_xhat.sum(0)
        if ctx.bias_shape is not None:
            grad_bias = sum_grad if len(ctx.bias_shape) == 2 else sum_grad.sum(0)
        return _image(grad_x, height, width), grad_weight, grad_bias, None, None


def _image(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """View (B, H*W, C) tokens as a channels_last (B, C, H, W) tensor."""
    batch, _, channels = tokens.shape
    return tokens.view(batch, height, width, channels).permute(0, 3, 1, 2)


def group_norm(
    x: torch.Tensor, groups: int, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float = 1e-5
) -> torch.Tensor:
    """Group-normalize ``x`` (B, C, H, W), then scale by ``weight`` and shift by ``bias``.

    ``weight`` and ``bias`` are None, per channel (C,) as in ``F.group_norm``, or per image and
    channel (B, C) for FiLM conditioning (both must then have the same shape). A bfloat16
    channels_last CPU input takes the fast backward path described in the module docstring, and
    its weight and bias gradients come back in float32.
    """
    per_sample = weight is not None and weight.dim() == 2
    if per_sample and (bias is not None and bias.shape != weight.shape):
        raise ValueError(f"per-sample weight {tuple(weight.shape)} and bias {tuple(bias.shape)} must have the same shape")
    if _is_bf16_channels_last(x) and torch.is_grad_enabled():
        return _ChannelsLastGroupNorm.apply(x, weight, bias, groups, eps)
    if not per_sample:
        return F.group_norm(x, groups, weight, bias, eps)
    normalized = F.group_norm(x, groups, None, None, eps)
    scale = weight.to(normalized.dtype)[:, :, None, None]
    if bias is None:
        return normalized * scale
    return torch.addcmul(bias.to(normalized.dtype)[:, :, None, None], normalized, scale)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state dict) with the fast channels_last backward pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
