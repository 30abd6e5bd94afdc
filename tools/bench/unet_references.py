"""Reference U-Nets for the U-Net benchmark, built at about the width and depth of our comparison config.

* ``diffusers_if``: diffusers' ``UNet2DConditionModel`` laid out like DeepFloyd IF stage I.
  It has ResNet blocks with scale-shift time conditioning, simple cross-attention blocks whose
  keys include the image tokens, and text added to the time embedding. Here it has
  block_out_channels (64, 128, 192, 256), 2 layers per block and 512-wide cross-attention,
  29.9M parameters.
* ``imagen_pytorch``: the ``Unet`` of the imagen-pytorch package with dim=64,
  dim_mults=(1, 2, 3, 4), num_resnet_blocks=2 and self- and cross-attention at the three lower
  levels: 23.8M parameters.
* ``ours``: :class:`imagen.unet.EfficientUNet` with the same widths and attention levels, and
  residual blocks (1, 4, 4, 4) per level, so that its parameter count (27.3M) lies between theirs.
  As in the Efficient U-Net, the blocks sit at the lower resolutions. At 64 px, one block of 64
  channels costs as many FLOPs as one of 128 channels at 32 px. But its convolutions run less
  efficiently, and it does twice as much GroupNorm and SiLU work per FLOP.

Both references are optional: a missing package makes :func:`build` raise ``ImportError``,
and the benchmark records the reason and goes on without that reference.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types
from typing import Callable

import torch

from imagen.config import UNetConfig

TEXT_DIM = 512
REFERENCES = ("ours", "diffusers_if", "imagen_pytorch")

OURS_CONFIG = UNetConfig(
    in_channels=3,
    out_channels=3,
    base_channels=64,
    channel_mults=(1, 2, 3, 4),
    num_res_blocks=(1, 4, 4, 4),
    self_attention=(False, True, True, True),
    cross_attention=(False, True, True, True),
    head_dim=64,
    cond_dim=512,
    text_embed_dim=TEXT_DIM,
    lowres_cond=False,
    dropout=0.0,
    gradient_checkpointing=False,
)

# A forward call: (model, x (B, 3, H, W), t (B,) in [0, 1], text (B, L, D), mask (B, L) bool) -> (B, 3, H, W).
ForwardFn = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _ours() -> tuple[torch.nn.Module, ForwardFn]:
    from imagen.unet import EfficientUNet

    def forward(model, x, t, text, mask):
        log_snr = 20.0 - 40.0 * t  # t = 0 clean -> log-SNR 20, t = 1 -> -20
        return model(x, log_snr, text, mask)

    return EfficientUNet(OURS_CONFIG), forward


def _diffusers_if() -> tuple[torch.nn.Module, ForwardFn]:
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
        up_block_types=("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        block_out_channels=(64, 128, 192, 256),
        layers_per_block=2,
        attention_head_dim=64,
        cross_attention_dim=512,
        encoder_hid_dim=TEXT_DIM,
        addition_embed_type="text",
        addition_embed_type_num_heads=64,
        resnet_time_scale_shift="scale_shift",
        resnet_skip_time_act=True,
        act_fn="gelu",
        time_embedding_act_fn="gelu",
        norm_num_groups=32,
    )

    def forward(model, x, t, text, mask):
        return model(x, t * 1000, encoder_hidden_states=text, encoder_attention_mask=mask).sample

    return model, forward


def _import_imagen_pytorch_unet() -> type:
    """Import ``imagen_pytorch.imagen_pytorch.Unet`` without the package's training-side imports.

    The package ``__init__`` pulls in its trainer and data modules; this loads only the model
    module. torchvision and kornia, which only the ``Imagen`` wrapper uses (for resizing and
    augmentation), get empty stand-in modules during the import when they cannot be imported.
    The torchvision wheels on PyPI are built for CUDA torch and fail to load with a CPU build.
    ``get_encoded_dim`` is evaluated as a default argument at import time and would download a
    T5 config. It is replaced by a function returning 768, the width of its default T5
    (t5-v1_1-base), because the benchmark always passes ``text_embed_dim``.
    """
    spec = importlib.util.find_spec("imagen_pytorch")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("imagen-pytorch is not installed: pip install --no-deps imagen-pytorch einops-exts beartype")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers  # noqa: F401  (imported before the stand-ins so that it sees the real packages)

    stand_ins = []
    for top, sub in (("torchvision", "transforms"), ("kornia", "augmentation")):
        try:
            importlib.import_module(f"{top}.{sub}")
        except Exception:  # a CUDA-built torchvision fails with RuntimeError, not only ImportError
            parent, child = types.ModuleType(top), types.ModuleType(f"{top}.{sub}")
            setattr(parent, sub, child)
            sys.modules[top], sys.modules[f"{top}.{sub}"] = parent, child
            stand_ins += [top, f"{top}.{sub}"]
    package = types.ModuleType("imagen_pytorch")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules["imagen_pytorch"] = package
    try:
        t5 = importlib.import_module("imagen_pytorch.t5")
        t5.get_encoded_dim = lambda name: 768
        return importlib.import_module("imagen_pytorch.imagen_pytorch").Unet
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)


def _imagen_pytorch() -> tuple[torch.nn.Module, ForwardFn]:
    unet_class = _import_imagen_pytorch_unet()
    model = unet_class(
        dim=64,
        dim_mults=(1, 2, 3, 4),
        num_resnet_blocks=2,
        layer_attns=(False, True, True, True),
        layer_cross_attns=(False, True, True, True),
        text_embed_dim=TEXT_DIM,
    )

    def forward(model, x, t, text, mask):
        return model(x, t, text_embeds=text, text_mask=mask)

    return model, forward


def build(name: str) -> tuple[torch.nn.Module, ForwardFn]:
    """Build reference ``name`` (one of :data:`REFERENCES`) with fresh weights and its forward call."""
    builders = {"ours": _ours, "diffusers_if": _diffusers_if, "imagen_pytorch": _imagen_pytorch}
    if name not in builders:
        raise ValueError(f"unknown reference U-Net {name!r}: choose from {list(builders)}")
    return builders[name]()
