"""Continuous-time Gaussian diffusion in log-SNR form: schedules, noise, targets and the loss.

Notation (Kingma et al., 2021, "Variational Diffusion Models"): a noisy sample is
``x_t = alpha * x0 + sigma * eps`` with ``alpha**2 + sigma**2 = 1`` and
``log_snr = log(alpha**2 / sigma**2)``, so ``alpha**2 = sigmoid(log_snr)`` and
``sigma**2 = sigmoid(-log_snr)``. Time ``t`` in [0, 1] runs from clean data (t = 0) to noise (t = 1).
The v target is ``v = alpha * eps - sigma * x0`` (Salimans & Ho, 2022, "Progressive Distillation").

Per-sample scalars such as ``log_snr`` have shape (B,) and broadcast over (B, C, H, W) images.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from imagen.config import OBJECTIVES, SCHEDULES, DiffusionConfig

# Offset of the continuous linear schedule: log_snr(0) = -log(expm1(1e-4)), about 9.2,
# matching DDPM's first beta of 1e-4 (the linear schedule of Kingma et al., 2021).
_LINEAR_BETA_START = 1e-4
_LINEAR_BETA_SLOPE = 10.0


def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"invalid objective {objective!r}: expected one of {', '.join(map(repr, OBJECTIVES))}")


def _per_sample(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) tensor to (B, 1, ..., 1) so it broadcasts against ``like``."""
    if value.dim() != 1 or value.shape[0] not in (1, like.shape[0]):
        raise ValueError(
            f"expected a per-sample tensor of shape ({like.shape[0]},) for a batch of shape {tuple(like.shape)}, "
            f"got shape {tuple(value.shape)}: pass one value per sample"
        )
    return value.reshape(-1, *([1] * (like.dim() - 1)))


def log_snr_unclipped(t: torch.Tensor, schedule: str) -> torch.Tensor:
    """Map time ``t`` (B,) in [0, 1] to log-SNR (B,) without clipping, in float64.

    cosine: ``alpha_bar(t) = cos(pi t / 2)**2`` (Nichol & Dhariwal, 2021, eq. 17 without the
    offset), so ``log_snr = -2 log tan(pi t / 2)``, which is +inf at t = 0 and -inf at t = 1.
    linear: the continuous form of DDPM's linear betas, ``log_snr = -log(expm1(1e-4 + 10 t**2))``
    (Kingma et al., 2021), about 9.2 at t = 0 and -10.0 at t = 1.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"invalid schedule {schedule!r}: expected one of {', '.join(map(repr, SCHEDULES))}")
    t = t.to(torch.float64)
    if schedule == "cosine":
        # tan(pi t / 2) = 1 / tan(pi (1 - t) / 2): evaluate the half below t = 0.5 on each side,
        # so pi/2 rounding never makes tan negative near t = 1.
        folded = torch.where(t <= 0.5, t, 1.0 - t)
        log_tan = torch.log(torch.tan(math.pi * folded / 2))
        return torch.where(t <= 0.5, -2.0 * log_tan, 2.0 * log_tan)
    return -torch.log(torch.expm1(_LINEAR_BETA_START + _LINEAR_BETA_SLOPE * t**2))


def log_snr_from_t(t: torch.Tensor, cfg: DiffusionConfig) -> torch.Tensor:
    """Map time ``t`` (B,) in [0, 1] to log-SNR (B,) on ``cfg.schedule``, clipped to ``[cfg.log_snr_min, cfg.log_snr_max]``.

    t = 0 (clean) gives the largest log-SNR and t = 1 the smallest; the result is non-increasing
    in t and has the dtype of ``t`` (float32 for integer input).
    """
    if t.min() < 0 or t.max() > 1:
        raise ValueError(f"invalid times t in [{t.min().item()}, {t.max().item()}]: expected values in [0, 1]")
    dtype = t.dtype if t.is_floating_point() else torch.float32
    log_snr = log_snr_unclipped(t, cfg.schedule).clamp(cfg.log_snr_min, cfg.log_snr_max)
    return log_snr.to(dtype)


def log_snr_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Map a discrete ``alpha_bar`` table (cumulative product of ``1 - beta``) to log-SNR, in float64."""
    alpha_bar = alpha_bar.to(torch.float64)
    return torch.log(alpha_bar) - torch.log1p(-alpha_bar)


def alpha_sigma(log_snr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(alpha, sigma)`` for ``log_snr``, both in [0, 1] with ``alpha**2 + sigma**2 = 1``.

    ``log_snr = +inf`` gives (1, 0), clean data; ``-inf`` gives (0, 1), pure noise.
    """
    return torch.sigmoid(log_snr).sqrt(), torch.sigmoid(-log_snr).sqrt()


def randn_like_per_sample(
    shape: Sequence[int],
    generators: Optional[list[torch.Generator]],
    device: Optional[torch.device | str] = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Draw standard normal noise of ``shape`` (B, ...), sample ``i`` from ``generators[i]``.

    Each sample's noise depends only on its own generator, so a seed gives the same noise at any
    batch size and position. The noise is drawn on each generator's device in ``dtype`` and then
    moved to ``device``, so a CPU generator gives the same values whatever the target device.
    With ``generators=None`` the global random state is used.
    """
    shape = tuple(shape)
    if generators is None:
        return torch.randn(shape, device=device, dtype=dtype)
    if len(generators) != shape[0]:
        raise ValueError(
            f"got {len(generators)} generators for a batch of {shape[0]}: pass one torch.Generator per sample, or None"
        )
    draws = [torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in generators]
    return torch.stack(draws).to(device if device is not None else draws[0].device)


def q_sample(x0: torch.Tensor, log_snr: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Diffuse clean data: ``x_t = alpha * x0 + sigma * eps`` for x0, eps (B, C, H, W) and log_snr (B,)."""
    alpha, sigma = alpha_sigma(_per_sample(log_snr, x0))
    return (alpha * x0 + sigma * eps).to(x0.dtype)


def convert_prediction(
    pred: torch.Tensor, x_t: torch.Tensor, log_snr: torch.Tensor, source: str, target: str
) -> torch.Tensor:
    """Convert a prediction of ``x_t`` (B, C, H, W) at ``log_snr`` (B,) from one objective to another.

    The conversions are exact inverses of each other; with ``x_t = alpha x0 + sigma eps``:
    ``x0 = (x_t - sigma eps) / alpha = alpha x_t - sigma v`` and
    ``eps = (x_t - alpha x0) / sigma = sigma x_t + alpha v``. Dividing by alpha near pure noise
    (or sigma near clean data) amplifies rounding, which the v objective avoids.
    """
    _check_objective(source)
    _check_objective(target)
    if source == target:
        return pred
    alpha, sigma = alpha_sigma(_per_sample(log_snr, x_t))
    if source == "eps":
        x0 = (x_t - sigma * pred) / alpha
        eps = pred
    elif source == "x0":
        x0 = pred
        eps = (x_t - alpha * pred) / sigma
    else:
        x0 = alpha * x_t - sigma * pred
        eps = sigma * x_t + alpha * pred
    if target == "x0":
        out = x0
    elif target == "eps":
        out = eps
    else:
        out = alpha * eps - sigma * x0
    return out.to(pred.dtype)


def prediction_to_x0(pred: torch.Tensor, x_t: torch.Tensor, log_snr: torch.Tensor, objective: str) -> torch.Tensor:
    """Convert a model prediction in ``objective`` space to the predicted clean data x0 (B, C, H, W)."""
    return convert_prediction(pred, x_t, log_snr, objective, "x0")


def prediction_to_eps(pred: torch.Tensor, x_t: torch.Tensor, log_snr: torch.Tensor, objective: str) -> torch.Tensor:
    """Convert a model prediction in ``objective`` space to the predicted noise eps (B, C, H, W)."""
    return convert_prediction(pred, x_t, log_snr, objective, "eps")


def prediction_to_v(pred: torch.Tensor, x_t: torch.Tensor, log_snr: torch.Tensor, objective: str) -> torch.Tensor:
    """Convert a model prediction in ``objective`` space to the velocity ``v = alpha eps - sigma x0``."""
    return convert_prediction(pred, x_t, log_snr, objective, "v")


def training_target(x0: torch.Tensor, eps: torch.Tensor, log_snr: torch.Tensor, objective: str) -> torch.Tensor:
    """Return the regression target for ``objective``: eps, x0, or ``v = alpha eps - sigma x0``."""
    _check_objective(objective)
    if objective == "eps":
        return eps
    if objective == "x0":
        return x0
    alpha, sigma = alpha_sigma(_per_sample(log_snr, x0))
    return (alpha * eps - sigma * x0).to(x0.dtype)


def min_snr_weight(log_snr: torch.Tensor, objective: str, gamma: float) -> torch.Tensor:
    """Return the per-sample min-SNR loss weight (B,) for the MSE on ``objective``.

    Min-SNR weighting (Hang et al., 2023, "Efficient Diffusion Training via Min-SNR Weighting
    Strategy") weights the x0 error by ``min(snr, gamma)``. The eps error is ``snr`` times the x0
    error and the v error ``snr + 1`` times, so the weights are ``min(snr, gamma) / snr`` for eps
    and ``min(snr, gamma) / (snr + 1)`` for v, computed here without overflow from log-SNR.
    """
    _check_objective(objective)
    if gamma <= 0:
        raise ValueError(f"invalid min_snr_gamma {gamma!r}: expected a float > 0, or None to turn weighting off")
    log_snr = log_snr.to(torch.float32)
    if objective == "x0":
        return torch.exp(log_snr).clamp(max=gamma)
    if objective == "eps":
        return (gamma * torch.exp(-log_snr)).clamp(max=1.0)
    # snr / (snr + 1) = sigmoid(log_snr) and gamma / (snr + 1) = gamma * sigmoid(-log_snr).
    return torch.minimum(torch.sigmoid(log_snr), gamma * torch.sigmoid(-log_snr))


def diffusion_loss(
    pred: torch.Tensor,
    x0: torch.Tensor,
    eps: torch.Tensor,
    log_snr: torch.Tensor,
    objective: str,
    min_snr_gamma: Optional[float] = None,
) -> torch.Tensor:
    """Return the per-sample loss (B,): the mean squared error of ``pred`` against the objective's target.

    ``pred``, ``x0`` and ``eps`` are (B, C, H, W); ``x0`` and ``eps`` are the clean data and the
    noise that made ``x_t``. With ``min_snr_gamma`` set, each sample's error is scaled by
    :func:`min_snr_weight`. The result is float32 whatever the input dtype.
    """
    if pred.shape != x0.shape:
        raise ValueError(
            f"prediction shape {tuple(pred.shape)} differs from the data shape {tuple(x0.shape)}: "
            "the model must predict one value per pixel and channel"
        )
    target = training_target(x0, eps, log_snr, objective)
    loss = (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)
    if min_snr_gamma is not None:
        loss = loss * min_snr_weight(log_snr, objective, min_snr_gamma)
    return loss


def noise_augment(
    lowres_upsampled: torch.Tensor, level: torch.Tensor, cfg: DiffusionConfig, eps: torch.Tensor
) -> torch.Tensor:
    """Noise-augment the upsampled low-resolution image of a super-resolution stage.

    ``level`` (B,) in [0, 1] is read as time t on the stage's schedule, so the image becomes
    ``alpha * lowres + sigma * eps`` at ``log_snr_from_t(level, cfg)``. The end points are exact:
    level 0 returns the clean image and level 1 returns ``eps``. The same function serves training
    (random levels) and sampling (a fixed level); the U-Net is given ``level`` itself.
    ``lowres_upsampled`` and ``eps`` are (B, C, H, W).
    """
    if level.min() < 0 or level.max() > 1:
        raise ValueError(
            f"invalid noise augmentation level in [{level.min().item()}, {level.max().item()}]: "
            "expected values in [0, 1] (0 = clean, 1 = pure noise)"
        )
    level = level.to(torch.float64)
    log_snr = log_snr_from_t(level, cfg)
    # Pin the end points to +-inf: the clipped schedule would leave a little noise at level 0.
    log_snr = torch.where(level <= 0, math.inf, torch.where(level >= 1, -math.inf, log_snr))
    alpha, sigma = alpha_sigma(_per_sample(log_snr, lowres_upsampled))
    augmented = alpha.to(lowres_upsampled.dtype) * lowres_upsampled + sigma.to(eps.dtype) * eps
    return augmented.to(lowres_upsampled.dtype)
