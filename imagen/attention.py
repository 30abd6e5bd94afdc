"""Attention layers of the Efficient U-Net: text context, image attention, attention pooling.

Text conditioning follows Imagen (Saharia et al., 2022, section 2.2 and appendix B): the
frozen text encoder's token embeddings become keys and values of the U-Net's attention layers,
and an attention-pooled summary joins the timestep embedding. A learned null token always
sits in front of the text tokens, so every query has at least one valid key. With an all-False
text mask (the null condition of classifier-free guidance), text attention goes to that token
alone and stays finite. All attention runs through ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def split_heads(tokens: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Reshape (B, N, heads * head_dim) to (B, heads, N, head_dim) as a view."""
    batch, length, width = tokens.shape
    return tokens.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def merge_heads(tokens: torch.Tensor) -> torch.Tensor:
    """Reshape (B, heads, N, head_dim) to (B, N, heads * head_dim)."""
    batch, num_heads, length, head_dim = tokens.shape
    return tokens.transpose(1, 2).reshape(batch, length, num_heads * head_dim)


def image_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """Return (B, C, H, W) as tokens (B, H*W, C); a view when ``x`` is channels_last."""
    batch, channels, height, width = x.shape
    return x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)


def tokens_to_image(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Return tokens (B, H*W, C) as a channels_last (B, C, H, W) view of the same memory."""
    batch, _, channels = tokens.shape
    return tokens.reshape(batch, height, width, channels).permute(0, 3, 1, 2)


class TextContext(nn.Module):
    """Projects text-encoder tokens (B, L, D) to the context width and prepends a learned null token.

    Returns ``context`` (B, 1 + L, context_dim) and ``mask`` (B, 1 + L) bool, True where a key is
    valid. The null token at position 0 is always valid. With ``text_embeds=None`` the context is
    the null token alone, which gives the same result as an all-False mask.
    """

    def __init__(self, text_dim: int, context_dim: int):
        super().__init__()
        self.text_dim = text_dim
        self.norm = nn.LayerNorm(text_dim)
        self.proj = nn.Linear(text_dim, context_dim)
        self.null_token = nn.Parameter(torch.randn(1, 1, context_dim) * 0.02)

    def forward(
        self, text_embeds: Optional[torch.Tensor], text_mask: Optional[torch.Tensor], batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        null = self.null_token.expand(batch, 1, -1)
        null_mask = torch.ones(batch, 1, dtype=torch.bool, device=null.device)
        if text_embeds is None:
            return null, null_mask
        # Text from a bfloat16 encoder or cache is cast to the layer's dtype (float32 under autocast).
        tokens = self.proj(self.norm(text_embeds.to(self.proj.weight.dtype)))
        context = torch.cat([null.to(tokens.dtype), tokens], dim=1)
        mask = torch.cat([null_mask, text_mask], dim=1)
        return context, mask


class AttentionPool(nn.Module):
    """Pools the text context (B, 1 + L, context_dim) to one vector (B, out_dim) with masked attention.

    The query is a learned vector plus the mean of the valid text tokens.
    """

    def __init__(self, context_dim: int, out_dim: int, head_dim: int):
        super().__init__()
        self.num_heads = context_dim // head_dim if context_dim % head_dim == 0 else 1
        self.query = nn.Parameter(torch.randn(1, 1, context_dim) * 0.02)
        self.to_q = nn.Linear(context_dim, context_dim, bias=False)
        self.to_kv = nn.Linear(context_dim, 2 * context_dim, bias=False)
        self.to_out = nn.Linear(context_dim, out_dim)

    def forward(self, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Mean of the valid text tokens; the null token at position 0 is left out.
        text_mask = mask[:, 1:].unsqueeze(-1)
        text_sum = context[:, 1:].masked_fill(~text_mask, 0.0).sum(1, keepdim=True)
        mean = text_sum / text_mask.sum(1, keepdim=True).clamp_min(1).to(text_sum.dtype)
        query = self.to_q(self.query.to(mean.dtype) + mean)
        key, value = self.to_kv(context).chunk(2, dim=-1)
        pooled = F.scaled_dot_product_attention(
            split_heads(query, self.num_heads),
            split_heads(key, self.num_heads),
            split_heads(value, self.num_heads),
            attn_mask=mask[:, None, None, :],
        )
        return self.to_out(merge_heads(pooled).squeeze(1))


class ImageAttention(nn.Module):
    """Multi-head attention of image tokens, added back to the (B, C, H, W) input.

    ``self_attention`` with ``cross_attention``: keys and values are [image tokens; text tokens]
    (the Imagen base and 64 -> 256 stages). ``self_attention`` alone: image tokens only.
    ``cross_attention`` alone: text tokens only (the 256 -> 1024 stage, where self-attention over
    65k image tokens would be too expensive). Tokens are a view of channels_last memory, so the
    layer adds no layout copies there.
    """

    def __init__(self, channels: int, head_dim: int, context_dim: int, self_attention: bool, cross_attention: bool):
        super().__init__()
        if not (self_attention or cross_attention):
            raise ValueError("ImageAttention needs self_attention or cross_attention (or both); got neither")
        self.num_heads = channels // head_dim
        self.self_attention = self_attention
        self.cross_attention = cross_attention
        self.norm = nn.LayerNorm(channels)
        if self_attention:
            self.to_qkv = nn.Linear(channels, 3 * channels, bias=False)
        else:
            self.to_q = nn.Linear(channels, channels, bias=False)
        if cross_attention:
            self.to_text_kv = nn.Linear(context_dim, 2 * channels, bias=False)
        self.to_out = nn.Linear(channels, channels)
        # Zero output projection: the block starts as the identity.
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        tokens = self.norm(image_to_tokens(x))
        attn_mask = None
        if self.self_attention:
            query, key, value = self.to_qkv(tokens).chunk(3, dim=-1)
            if self.cross_attention:
                text_key, text_value = self.to_text_kv(context).chunk(2, dim=-1)
                key = torch.cat([key, text_key.to(key.dtype)], dim=1)
                value = torch.cat([value, text_value.to(value.dtype)], dim=1)
                image_mask = torch.ones(batch, height * width, dtype=torch.bool, device=x.device)
                attn_mask = torch.cat([image_mask, context_mask], dim=1)[:, None, None, :]
        else:
            query = self.to_q(tokens)
            key, value = self.to_text_kv(context).chunk(2, dim=-1)
            key, value = key.to(query.dtype), value.to(query.dtype)
            attn_mask = context_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            split_heads(query, self.num_heads),
            split_heads(key, self.num_heads),
            split_heads(value, self.num_heads),
            attn_mask=attn_mask,
        )
        out = self.to_out(merge_heads(out))
        return x + tokens_to_image(out, height, width)
