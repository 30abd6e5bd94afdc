"""Tests of the Efficient U-Net (imagen/unet.py), its attention layers and its GroupNorm."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from imagen.config import UNetConfig, load_cascade_config
from imagen.norm import group_norm
from imagen.unet import SKIP_SCALE, EfficientUNet

TEXT_DIM = 24


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**changes) -> UNetConfig:
    """A 3-level U-Net (downsampling factor 4) small enough for CPU tests."""
    cfg = UNetConfig(
        in_channels=3,
        out_channels=3,
        base_channels=16,
        channel_mults=(1, 2, 2),
        num_res_blocks=(1, 1, 2),
        self_attention=(False, True, True),
        cross_attention=(False, True, True),
        head_dim=16,
        cond_dim=32,
        text_embed_dim=TEXT_DIM,
        lowres_cond=False,
        dropout=0.0,
        gradient_checkpointing=False,
    )
    return dataclasses.replace(cfg, **changes)


SR_CHANGES = dict(lowres_cond=True, self_attention=(False, False, False), cross_attention=(False, False, True))


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Add noise to every parameter, so zero-initialized layers take part in the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def make_model(seed: int = 0, **changes) -> EfficientUNet:
    torch.manual_seed(seed)
    return randomize_(EfficientUNet(tiny_config(**changes)), seed).eval()


def make_inputs(cfg: UNetConfig, batch=2, height=16, width=16, length=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = dict(
        x=torch.randn(batch, cfg.in_channels, height, width, generator=generator),
        log_snr=torch.randn(batch, generator=generator) * 5,
        text_embeds=torch.randn(batch, length, cfg.text_embed_dim, generator=generator),
        text_mask=torch.ones(batch, length, dtype=torch.bool),
    )
    if cfg.lowres_cond:
        inputs["lowres_image"] = torch.randn(batch, cfg.in_channels, height, width, generator=generator)
        inputs["lowres_noise_level"] = torch.rand(batch, generator=generator)
    return inputs


@pytest.mark.parametrize("changes", [{}, SR_CHANGES], ids=["base", "sr"])
@pytest.mark.parametrize("size", [(16, 16), (8, 20), (24, 12)])
def test_output_shape(changes, size):
    model = make_model(**changes)
    inputs = make_inputs(model.cfg, height=size[0], width=size[1])
    with torch.no_grad():
        out = model(**inputs)
    assert out.shape == (2, model.cfg.out_channels, *size)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("size", [(18, 16), (16, 10), (3, 4)])
def test_bad_shape_error_names_shape_and_factor(size):
    model = make_model()
    inputs = make_inputs(model.cfg, height=size[0], width=size[1])
    with pytest.raises(ValueError) as info:
        model(**inputs)
    message = str(info.value)
    assert str(tuple(inputs["x"].shape)) in message
    assert "downsampling factor 4" in message


def test_input_errors():
    model = make_model()
    inputs = make_inputs(model.cfg)
    cases = {
        "x has shape": dict(x=torch.randn(2, 4, 16, 16)),
        "log_snr has shape": dict(log_snr=torch.zeros(3)),
        "text_embeds has shape": dict(text_embeds=torch.randn(2, 7, TEXT_DIM + 1)),
        "text_mask has shape": dict(text_mask=torch.ones(2, 7)),
        "only for super-resolution": dict(lowres_image=torch.randn(2, 3, 16, 16), lowres_noise_level=torch.zeros(2)),
    }
    for expected, change in cases.items():
        with pytest.raises(ValueError, match=expected):
            model(**{**inputs, **change})
    with pytest.raises(ValueError, match="text_mask was given without text_embeds"):
        model(**{**inputs, "text_embeds": None})


def test_sr_requires_lowres_inputs():
    model = make_model(**SR_CHANGES)
    inputs = make_inputs(model.cfg)
    with pytest.raises(ValueError, match="missing lowres_image or lowres_noise_level"):
        model(**{**inputs, "lowres_image": None})
    with pytest.raises(ValueError, match="missing lowres_image or lowres_noise_level"):
        model(**{**inputs, "lowres_noise_level": None})
    with pytest.raises(ValueError, match="lowres_image has shape"):
        model(**{**inputs, "lowres_image": torch.randn(2, 3, 8, 8)})


def pad_text(embeds, mask, length, seed=1):
    """Pad to ``length`` tokens with random values behind a False mask (the model must ignore them)."""
    batch, current, dim = embeds.shape
    generator = torch.Generator().manual_seed(seed)
    padding = torch.randn(batch, length - current, dim, generator=generator) * 10
    return torch.cat([embeds, padding], 1), torch.cat([mask, torch.zeros(batch, length - current, dtype=torch.bool)], 1)


@pytest.mark.parametrize("changes", [{}, SR_CHANGES], ids=["base", "sr"])
def test_mask_padding_invariance(changes):
    model = make_model(**changes)
    inputs = make_inputs(model.cfg, length=20)
    inputs["text_mask"][0, 9:] = False  # prompt of 9 tokens padded to 20
    inputs["text_mask"][1, 15:] = False
    inputs["text_embeds"][~inputs["text_mask"]] = 0.0
    long_embeds, long_mask = pad_text(inputs["text_embeds"], inputs["text_mask"], 128)
    with torch.no_grad():
        short = model(**inputs)
        long = model(**{**inputs, "text_embeds": long_embeds, "text_mask": long_mask})
    assert (short - long).abs().max().item() <= 1e-5


@pytest.mark.parametrize("changes", [{}, SR_CHANGES], ids=["base", "sr"])
def test_null_condition(changes):
    model = make_model(**changes)
    inputs = make_inputs(model.cfg)
    null_mask = torch.zeros_like(inputs["text_mask"])
    with torch.no_grad():
        conditional = model(**inputs)
        masked = model(**{**inputs, "text_mask": null_mask})
        no_text = model(**{**inputs, "text_embeds": None, "text_mask": None})
    assert torch.isfinite(masked).all()
    assert torch.allclose(masked, no_text, atol=1e-5)
    assert not torch.allclose(masked, conditional, atol=1e-3)


def test_bf16_text_embeds_accepted():
    model = make_model()
    inputs = make_inputs(model.cfg)
    with torch.no_grad():
        expected = model(**inputs)
        out = model(**{**inputs, "text_embeds": inputs["text_embeds"].bfloat16()})
    assert out.dtype == torch.float32
    assert torch.allclose(out, expected, atol=0.05)


def test_text_changes_output():
    model = make_model()
    inputs = make_inputs(model.cfg)
    with torch.no_grad():
        first = model(**inputs)
        second = model(**{**inputs, "text_embeds": inputs["text_embeds"].flip(0)})
    assert not torch.allclose(first[0], second[0], atol=1e-3)


def test_sr_uses_lowres_image_and_noise_level():
    model = make_model(**SR_CHANGES)
    inputs = make_inputs(model.cfg)
    with torch.no_grad():
        reference = model(**inputs)
        new_image = model(**{**inputs, "lowres_image": inputs["lowres_image"].flip(-1)})
        new_level = model(**{**inputs, "lowres_noise_level": 1.0 - inputs["lowres_noise_level"]})
    assert not torch.allclose(reference, new_image, atol=1e-3)
    assert not torch.allclose(reference, new_level, atol=1e-3)


def test_log_snr_changes_output():
    model = make_model()
    inputs = make_inputs(model.cfg)
    with torch.no_grad():
        reference = model(**inputs)
        shifted = model(**{**inputs, "log_snr": inputs["log_snr"] + 0.5})
    assert not torch.allclose(reference, shifted, atol=1e-4)


def all_gradients(model, inputs):
    model.zero_grad(set_to_none=True)
    model(**inputs).square().mean().backward()
    return {name: param.grad for name, param in model.named_parameters()}


@pytest.mark.parametrize(
    "changes",
    [{}, SR_CHANGES, dict(self_attention=(False, True, False), cross_attention=(False, False, True))],
    ids=["base", "sr", "mixed-attention"],
)
def test_every_parameter_gets_gradient(changes):
    model = make_model(**changes).train()
    grads = all_gradients(model, make_inputs(model.cfg))
    missing = [name for name, grad in grads.items() if grad is None]
    assert missing == []
    zero = [name for name, grad in grads.items() if grad.abs().max().item() == 0.0]
    assert zero == []


def test_every_parameter_in_graph_with_null_text():
    model = make_model().train()
    inputs = make_inputs(model.cfg)
    grads = all_gradients(model, {**inputs, "text_mask": torch.zeros_like(inputs["text_mask"])})
    assert [name for name, grad in grads.items() if grad is None] == []


def test_fresh_model_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = EfficientUNet(tiny_config(**SR_CHANGES)).train()
    grads = all_gradients(model, make_inputs(model.cfg))
    assert [name for name, grad in grads.items() if grad is None] == []


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-channels-last"])
def test_gradient_checkpointing_same_gradients(bf16):
    model = make_model(dropout=0.1).train()
    checkpointed = make_model(dropout=0.1, gradient_checkpointing=True).train()
    checkpointed.load_state_dict(model.state_dict())
    inputs = make_inputs(model.cfg)
    if bf16:
        model, checkpointed = (m.to(memory_format=torch.channels_last) for m in (model, checkpointed))
        inputs["x"] = inputs["x"].contiguous(memory_format=torch.channels_last)
    grads = []
    for m in (model, checkpointed):
        torch.manual_seed(5)  # the same dropout masks in both runs
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            grads.append(all_gradients(m, inputs))
    plain, recomputed = grads
    for name, grad in plain.items():
        assert torch.allclose(grad, recomputed[name], atol=1e-6, rtol=1e-5), name


def test_channels_last_fp32_matches_contiguous():
    model = make_model().train()
    inputs = make_inputs(model.cfg)
    reference = all_gradients(model, inputs)
    with torch.no_grad():
        expected = model(**inputs)
    model = model.to(memory_format=torch.channels_last)
    inputs_cl = {**inputs, "x": inputs["x"].contiguous(memory_format=torch.channels_last)}
    with torch.no_grad():
        out = model(**inputs_cl)
    assert torch.allclose(out, expected, atol=1e-5)
    grads = all_gradients(model, inputs_cl)
    for name, grad in reference.items():
        assert torch.allclose(grad, grads[name], atol=1e-5, rtol=1e-4), name


def test_bf16_autocast_channels_last_matches_fp32():
    model = make_model(**SR_CHANGES).train()
    inputs = make_inputs(model.cfg)
    reference = all_gradients(model, inputs)
    with torch.no_grad():
        expected = model(**inputs)
    model = model.to(memory_format=torch.channels_last)
    inputs = {**inputs, "x": inputs["x"].contiguous(memory_format=torch.channels_last)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs)
    assert out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last)
    error = (out.float() - expected).norm() / expected.norm()
    assert error.item() < 0.05
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**inputs).float().square().mean()
    loss.backward()
    names = [name for name, _ in model.named_parameters()]
    grads = {name: param.grad for name, param in model.named_parameters()}
    assert all(grads[name].dtype == torch.float32 for name in names)
    flat = torch.cat([grads[name].flatten() for name in names])
    flat_reference = torch.cat([reference[name].flatten() for name in names])
    assert ((flat - flat_reference).norm() / flat_reference.norm()).item() < 0.05
    # Per parameter, relative to the largest gradient entry of the whole model.
    scale = flat_reference.abs().max()
    for name in names:
        assert (grads[name] - reference[name]).abs().max().item() < 0.05 * scale.item(), name


def test_skip_connections_scaled():
    model = make_model()
    seen = {}
    model.down_levels[0].register_forward_hook(lambda module, args, out: seen.__setitem__("down", out))
    model.up_levels[0].register_forward_pre_hook(lambda module, args: seen.__setitem__("up_input", args[0]))
    with torch.no_grad():
        model(**make_inputs(model.cfg))
    width = model.widths[0]
    assert seen["up_input"].shape[1] == 2 * width
    assert torch.allclose(seen["up_input"][:, width:], seen["down"] * SKIP_SCALE)
    assert SKIP_SCALE == pytest.approx(2 ** -0.5)


@pytest.mark.parametrize("stage, target", [("base", 2.0e9), ("sr256", 600e6), ("sr1024", 400e6)])
def test_paper_parameter_counts(stage, target):
    cfg = load_cascade_config("imagen-paper").stage(stage).unet
    with torch.device("meta"):
        model = EfficientUNet(cfg)
    count = sum(param.numel() for param in model.parameters())
    assert abs(count / target - 1) <= 0.15, f"{stage}: {count / 1e6:.0f}M parameters, target {target / 1e6:.0f}M"


@pytest.mark.parametrize("name", ["imagen-tiny", "imagen-small"])
def test_shipped_configs_build(name):
    for stage in load_cascade_config(name).stages:
        with torch.device("meta"):
            model = EfficientUNet(stage.unet)
        assert sum(param.numel() for param in model.parameters()) > 0


@pytest.mark.parametrize("affine", ["none", "per-channel", "per-sample"])
def test_group_norm_channels_last_bf16_gradients(affine):
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 32, 6, 5, generator=generator) * 3 + 1).contiguous(memory_format=torch.channels_last)
    shape = {"none": None, "per-channel": (32,), "per-sample": (2, 32)}[affine]
    weight = torch.randn(shape, generator=generator).requires_grad_() if shape else None
    bias = torch.randn(shape, generator=generator).requires_grad_() if shape else None
    grad_out = torch.randn(2, 32, 6, 5, generator=generator)
    params = [p for p in (weight, bias) if p is not None]

    x_ref = x.clone().requires_grad_()
    expected = F.group_norm(x_ref, 8)
    if weight is not None:
        expected = expected * weight.view(-1, 32, 1, 1) + bias.view(-1, 32, 1, 1)
    expected_grads = torch.autograd.grad(expected, [x_ref, *params], grad_out)

    x_bf16 = x.bfloat16().requires_grad_()
    out = group_norm(x_bf16, 8, weight, bias)
    assert out.dtype == torch.bfloat16
    assert out.is_contiguous(memory_format=torch.channels_last)
    grads = torch.autograd.grad(out, [x_bf16, *params], grad_out.bfloat16().contiguous(memory_format=torch.channels_last))
    assert (out.float() - expected).abs().max().item() < 0.05
    for grad, reference in zip(grads, expected_grads):
        assert grad.shape == reference.shape
        relative = (grad.float() - reference).norm() / reference.norm()
        assert relative.item() < 0.02


def test_group_norm_per_sample_fp32_matches_reference():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 4, 4, generator=generator)
    weight, bias = torch.randn(2, 16, generator=generator), torch.randn(2, 16, generator=generator)
    expected = F.group_norm(x, 4) * weight[:, :, None, None] + bias[:, :, None, None]
    assert torch.allclose(group_norm(x, 4, weight, bias), expected, atol=1e-6)
    with pytest.raises(ValueError, match="must have the same shape"):
        group_norm(x, 4, weight, bias[:, :8])
