"""Diffusion core: schedules, conversions between objectives, the loss and noise augmentation."""

from __future__ import annotations

import math

import pytest
import torch

from imagen.config import OBJECTIVES, DiffusionConfig
from imagen.diffusion import (
    alpha_sigma,
    convert_prediction,
    diffusion_loss,
    log_snr_from_alpha_bar,
    log_snr_from_t,
    log_snr_unclipped,
    min_snr_weight,
    noise_augment,
    prediction_to_eps,
    prediction_to_v,
    prediction_to_x0,
    q_sample,
    randn_like_per_sample,
    training_target,
)


def config(schedule: str = "cosine", objective: str = "v", gamma: float | None = None) -> DiffusionConfig:
    return DiffusionConfig(schedule=schedule, objective=objective, log_snr_min=-20.0, log_snr_max=20.0, min_snr_gamma=gamma)


def noisy_batch(batch: int = 4, seed: int = 0):
    """Return x0, eps (B, 3, 8, 8) and log_snr (B,) in float64, log-SNR spread over [-8, 8]."""
    generator = torch.Generator().manual_seed(seed)
    x0 = torch.rand(batch, 3, 8, 8, generator=generator, dtype=torch.float64) * 2 - 1
    eps = torch.randn(batch, 3, 8, 8, generator=generator, dtype=torch.float64)
    log_snr = torch.linspace(-8.0, 8.0, batch, dtype=torch.float64)
    return x0, eps, log_snr


# --- schedules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_log_snr_decreasing_in_t(schedule):
    t = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)
    log_snr = log_snr_from_t(t, config(schedule))
    assert torch.all(log_snr[1:] <= log_snr[:-1])
    assert torch.all(log_snr[1:-1][1:] < log_snr[1:-1][:-1])
    assert log_snr.min() >= -20.0
    assert log_snr.max() <= 20.0


def test_cosine_schedule_endpoints_clip():
    t = torch.tensor([0.0, 1.0])
    log_snr = log_snr_from_t(t, config("cosine"))
    assert log_snr.tolist() == [20.0, -20.0]
    assert log_snr.dtype == torch.float32


def test_cosine_alpha_bar_matches_cos_squared():
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    alpha_bar = torch.sigmoid(log_snr_unclipped(t, "cosine"))
    torch.testing.assert_close(alpha_bar, torch.cos(math.pi * t / 2) ** 2, rtol=0, atol=1e-12)


def test_schedules_follow_discrete_ddpm_tables():
    diffusers = pytest.importorskip("diffusers")
    t = torch.arange(1, 1001, dtype=torch.float64) / 1000
    linear = diffusers.DDPMScheduler(beta_schedule="linear").alphas_cumprod.double()
    cosine = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()
    # The continuous linear schedule has a constant 1e-4 where DDPM's sum of betas grows as 1e-4 t:
    # log alpha_bar agrees to about 0.12 over a range of 10.
    log_linear = torch.log(torch.sigmoid(log_snr_unclipped(t, "linear")))
    assert (log_linear - linear.log()).abs().max() < 0.15
    # Nichol & Dhariwal's discrete cosine table has an offset s = 0.008 that the continuous form drops.
    assert (torch.sigmoid(log_snr_unclipped(t, "cosine")) - cosine).abs().max() < 0.01


def test_log_snr_from_t_rejects_out_of_range():
    with pytest.raises(ValueError, match="expected values in"):
        log_snr_from_t(torch.tensor([0.5, 1.5]), config())
    with pytest.raises(ValueError, match="invalid schedule 'sqrt'"):
        log_snr_unclipped(torch.tensor([0.5]), "sqrt")


def test_log_snr_from_alpha_bar_inverts_sigmoid():
    alpha_bar = torch.tensor([0.9999, 0.5, 1e-4], dtype=torch.float64)
    torch.testing.assert_close(torch.sigmoid(log_snr_from_alpha_bar(alpha_bar)), alpha_bar, rtol=1e-12, atol=0)


def test_alpha_sigma_unit_norm():
    log_snr = torch.tensor([-math.inf, -30.0, -1.0, 0.0, 2.5, 30.0, math.inf], dtype=torch.float64)
    alpha, sigma = alpha_sigma(log_snr)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(log_snr), rtol=0, atol=1e-15)
    torch.testing.assert_close(torch.log(alpha[1:-1] ** 2 / sigma[1:-1] ** 2), log_snr[1:-1])
    assert (alpha[0].item(), sigma[0].item()) == (0.0, 1.0)
    assert (alpha[-1].item(), sigma[-1].item()) == (1.0, 0.0)


# --- noise ------------------------------------------------------------------------------------------


def test_randn_per_sample_independent_of_batch():
    def generators(seeds):
        return [torch.Generator().manual_seed(seed) for seed in seeds]

    batch = randn_like_per_sample((3, 2, 4, 4), generators([7, 8, 9]))
    alone = randn_like_per_sample((1, 2, 4, 4), generators([8]))
    reordered = randn_like_per_sample((2, 2, 4, 4), generators([9, 7]))
    torch.testing.assert_close(batch[1], alone[0], rtol=0, atol=0)
    torch.testing.assert_close(batch[2], reordered[0], rtol=0, atol=0)
    torch.testing.assert_close(batch[0], reordered[1], rtol=0, atol=0)
    assert not torch.equal(batch[0], batch[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_randn_per_sample_dtype(dtype):
    noise = randn_like_per_sample((2, 3, 4, 4), [torch.Generator().manual_seed(0)] * 2, dtype=dtype)
    assert noise.dtype == dtype
    assert noise.shape == (2, 3, 4, 4)


def test_randn_per_sample_without_generators():
    noise = randn_like_per_sample((2, 3), None, dtype=torch.float32)
    assert noise.shape == (2, 3)


def test_randn_per_sample_rejects_generator_count():
    with pytest.raises(ValueError, match="got 1 generators for a batch of 2"):
        randn_like_per_sample((2, 3), [torch.Generator()])


def test_q_sample_definition():
    x0, eps, log_snr = noisy_batch()
    alpha, sigma = alpha_sigma(log_snr)
    expected = alpha.view(-1, 1, 1, 1) * x0 + sigma.view(-1, 1, 1, 1) * eps
    torch.testing.assert_close(q_sample(x0, log_snr, eps), expected)
    clean = q_sample(x0, torch.full((4,), math.inf, dtype=torch.float64), eps)
    torch.testing.assert_close(clean, x0, rtol=0, atol=0)


def test_q_sample_rejects_wrong_log_snr_shape():
    x0, eps, _ = noisy_batch()
    with pytest.raises(ValueError, match="expected a per-sample tensor of shape"):
        q_sample(x0, torch.zeros(3), eps)


# --- objectives ----------------------------------------------------------------------------------


@pytest.mark.parametrize("source", OBJECTIVES)
@pytest.mark.parametrize("target", OBJECTIVES)
def test_conversion_round_trip(source, target):
    x0, eps, log_snr = noisy_batch()
    x_t = q_sample(x0, log_snr, eps)
    pred = training_target(x0, eps, log_snr, source)
    converted = convert_prediction(pred, x_t, log_snr, source, target)
    torch.testing.assert_close(converted, training_target(x0, eps, log_snr, target), rtol=1e-9, atol=1e-9)
    back = convert_prediction(converted, x_t, log_snr, target, source)
    torch.testing.assert_close(back, pred, rtol=1e-9, atol=1e-9)


def test_named_conversions_recover_truth():
    x0, eps, log_snr = noisy_batch()
    x_t = q_sample(x0, log_snr, eps)
    v = training_target(x0, eps, log_snr, "v")
    torch.testing.assert_close(prediction_to_x0(v, x_t, log_snr, "v"), x0)
    torch.testing.assert_close(prediction_to_eps(v, x_t, log_snr, "v"), eps)
    torch.testing.assert_close(prediction_to_v(eps, x_t, log_snr, "eps"), v)
    torch.testing.assert_close(prediction_to_x0(eps, x_t, log_snr, "eps"), x0)
    torch.testing.assert_close(prediction_to_eps(x0, x_t, log_snr, "x0"), eps)


def test_v_target_definition():
    x0, eps, log_snr = noisy_batch()
    alpha, sigma = alpha_sigma(log_snr.view(-1, 1, 1, 1))
    torch.testing.assert_close(training_target(x0, eps, log_snr, "v"), alpha * eps - sigma * x0)
    assert training_target(x0, eps, log_snr, "eps") is eps
    assert training_target(x0, eps, log_snr, "x0") is x0


def test_conversion_rejects_unknown_objective():
    x0, eps, log_snr = noisy_batch()
    with pytest.raises(ValueError, match="invalid objective 'score'"):
        convert_prediction(eps, x0, log_snr, "score", "x0")
    with pytest.raises(ValueError, match="invalid objective 'score'"):
        training_target(x0, eps, log_snr, "score")


# --- loss -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_loss_zero_for_exact_prediction(objective):
    x0, eps, log_snr = noisy_batch()
    target = training_target(x0, eps, log_snr, objective)
    loss = diffusion_loss(target, x0, eps, log_snr, objective, min_snr_gamma=5.0)
    assert loss.shape == (4,)
    assert loss.dtype == torch.float32
    assert torch.all(loss == 0)


def test_loss_is_per_sample_mse():
    x0, eps, log_snr = noisy_batch()
    pred = eps + 0.1 * torch.arange(4, dtype=torch.float64).view(-1, 1, 1, 1)
    loss = diffusion_loss(pred, x0, eps, log_snr, "eps", min_snr_gamma=None)
    torch.testing.assert_close(loss, torch.tensor([0.0, 0.01, 0.04, 0.09]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("gamma", [0.5, 5.0, 1e6])
def test_min_snr_loss_same_for_every_objective(gamma):
    # One x0 estimate expressed in each objective: min-SNR weighting makes all three losses equal
    # to min(snr, gamma) * MSE(x0_hat, x0) (Hang et al., 2023).
    x0, eps, log_snr = noisy_batch(batch=6)
    log_snr = torch.linspace(-6.0, 6.0, 6, dtype=torch.float64)
    x_t = q_sample(x0, log_snr, eps)
    x0_hat = x0 + 0.05 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = torch.exp(log_snr).clamp(max=gamma) * (x0_hat - x0).pow(2).flatten(1).mean(1)
    for objective in OBJECTIVES:
        pred = convert_prediction(x0_hat, x_t, log_snr, "x0", objective)
        loss = diffusion_loss(pred, x0, eps, log_snr, objective, min_snr_gamma=gamma)
        torch.testing.assert_close(loss, expected.float(), rtol=1e-5, atol=1e-9)


def test_min_snr_weight_extreme_log_snr_finite():
    log_snr = torch.tensor([-20.0, 20.0])
    for objective in OBJECTIVES:
        weight = min_snr_weight(log_snr, objective, 5.0)
        assert torch.isfinite(weight).all()
        assert (weight > 0).all()


def test_loss_rejects_bad_inputs():
    x0, eps, log_snr = noisy_batch()
    with pytest.raises(ValueError, match="invalid min_snr_gamma 0"):
        diffusion_loss(eps, x0, eps, log_snr, "eps", min_snr_gamma=0)
    with pytest.raises(ValueError, match="prediction shape"):
        diffusion_loss(eps[:, :2], x0, eps, log_snr, "eps")


# --- noise augmentation ---------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_noise_augment_end_points(schedule):
    x0, eps, _ = noisy_batch()
    x0, eps = x0.float(), eps.float()
    cfg = config(schedule)
    assert torch.equal(noise_augment(x0, torch.zeros(4), cfg, eps), x0)
    assert torch.equal(noise_augment(x0, torch.ones(4), cfg, eps), eps)


def test_noise_augment_matches_schedule():
    x0, eps, _ = noisy_batch()
    level = torch.tensor([0.0, 0.1, 0.5, 1.0])
    cfg = config("cosine")
    augmented = noise_augment(x0, level, cfg, eps)
    middle = level[1:3]
    expected = q_sample(x0[1:3], log_snr_from_t(middle.double(), cfg), eps[1:3])
    torch.testing.assert_close(augmented[1:3], expected)
    assert torch.equal(augmented[0], x0[0])
    assert torch.equal(augmented[3], eps[3])


def test_noise_augment_keeps_dtype():
    x0, eps, _ = noisy_batch()
    augmented = noise_augment(x0.half(), torch.full((4,), 0.2), config(), eps.half())
    assert augmented.dtype == torch.float16


def test_noise_augment_rejects_level():
    x0, eps, _ = noisy_batch()
    with pytest.raises(ValueError, match="invalid noise augmentation level"):
        noise_augment(x0, torch.full((4,), -0.1), config(), eps)
