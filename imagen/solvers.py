"""Sampling grids and solver update coefficients on an increasing sequence of log-SNR values.

Sampling runs from noise to data, so time t decreases and log-SNR increases along the grid.

Every solver step maps the current sample x (at log-SNR ``lam_t``) and the predicted clean data
x0 to the next, less noisy sample (at ``lam_s > lam_t``) as one linear combination

    x_next = x_coef * x + x0_coef * x0 + prev_x0_coef * x0_prev + noise_coef * z,   z ~ N(0, I)

with scalar coefficients that depend only on the grid, so they are computed once per call, in
float64, before the model runs. ``x0_prev`` is the previous step's x0 (DPM-Solver++ 2M only).
The model is evaluated at the given log-SNR values; the last step goes to clean data
(log-SNR = +inf, alpha = 1, sigma = 0), where all three solvers return x0.

The noise prediction, where a solver needs it, is ``eps = (x - alpha_t x0) / sigma_t``: it is
derived from the (possibly thresholded) x0, so that x0 and eps stay consistent with x.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from imagen.config import SAMPLERS, DiffusionConfig
from imagen.diffusion import log_snr_from_alpha_bar, log_snr_from_t


@dataclass(frozen=True)
class SolverStep:
    """Coefficients of one update from ``log_snr`` to ``next_log_snr`` (see the module docstring)."""

    log_snr: float
    next_log_snr: float
    x_coef: float
    x0_coef: float
    prev_x0_coef: float
    noise_coef: float


def _sigmoid(value: float) -> float:
    if value >= 0:
        return 1.0 / (1.0 + math.exp(-value))
    exp_value = math.exp(value)
    return exp_value / (1.0 + exp_value)


def alpha_sigma_scalar(log_snr: float) -> tuple[float, float]:
    """Float form of :func:`imagen.diffusion.alpha_sigma` for one log-SNR (+-inf allowed)."""
    return math.sqrt(_sigmoid(log_snr)), math.sqrt(_sigmoid(-log_snr))


def check_log_snrs(log_snrs: torch.Tensor | Sequence[float]) -> list[float]:
    """Return ``log_snrs`` as a list of floats after checking it is a finite, strictly increasing 1-D sequence."""
    values = torch.as_tensor(log_snrs, dtype=torch.float64)
    if values.dim() != 1 or values.numel() == 0:
        raise ValueError(f"expected a non-empty 1-D sequence of log-SNR values, got shape {tuple(values.shape)}")
    if not torch.isfinite(values).all():
        raise ValueError(
            f"log-SNR values must be finite, got {values.tolist()}: the final clean point (+inf) is added by the sampler"
        )
    if values.numel() > 1 and not (values[1:] > values[:-1]).all():
        raise ValueError(
            f"log-SNR values must be strictly increasing (from noise to data), got {values.tolist()}"
        )
    return values.tolist()


def continuous_log_snrs(diffusion: DiffusionConfig, num_steps: int) -> torch.Tensor:
    """Return the (num_steps,) float64 log-SNR grid of ``diffusion`` at t = 1, 1 - 1/N, ..., 1/N.

    t is uniformly spaced from 1 to 0; t = 0 is the final clean point, which the sampler adds.
    Raise ValueError when clipping to ``[log_snr_min, log_snr_max]`` makes two grid points equal.
    """
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"invalid num_steps {num_steps!r}: expected an integer >= 1")
    t = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
    log_snrs = log_snr_from_t(t, diffusion)
    if num_steps > 1 and not (log_snrs[1:] > log_snrs[:-1]).all():
        raise ValueError(
            f"num_steps={num_steps} puts several steps on the same clipped log-SNR "
            f"(range [{diffusion.log_snr_min}, {diffusion.log_snr_max}]): use fewer steps or a wider log-SNR range"
        )
    return log_snrs


def discrete_log_snrs(alpha_bar: torch.Tensor, timesteps: Sequence[int]) -> torch.Tensor:
    """Return the float64 log-SNR values of a discrete schedule at ``timesteps``.

    ``alpha_bar`` (T,) is the cumulative product of ``1 - beta`` of a discrete DDPM schedule and
    ``timesteps`` the decreasing integer timesteps to evaluate the model at, for example
    ``[900, 800, ..., 0]``. After the last one the sampler steps to clean data (alpha_bar = 1).
    """
    index = torch.as_tensor(list(timesteps), dtype=torch.long)
    if index.numel() == 0 or index.min() < 0 or index.max() >= alpha_bar.numel():
        raise ValueError(f"invalid timesteps {index.tolist()}: expected indices in [0, {alpha_bar.numel() - 1}]")
    log_snrs = log_snr_from_alpha_bar(alpha_bar.reshape(-1)[index])
    check_log_snrs(log_snrs)
    return log_snrs


def _grid_intervals(log_snrs: Sequence[float]):
    """Yield ``(lam_t, lam_s, alpha_t, sigma_t, alpha_s, sigma_s, c)`` per step, ``c = 1 - exp(lam_t - lam_s)``.

    The grid is checked and closed with the clean point log-SNR = +inf.
    """
    grid = check_log_snrs(log_snrs) + [math.inf]
    for lam_t, lam_s in zip(grid[:-1], grid[1:]):
        alpha_t, sigma_t = alpha_sigma_scalar(lam_t)
        alpha_s, sigma_s = alpha_sigma_scalar(lam_s)
        yield lam_t, lam_s, alpha_t, sigma_t, alpha_s, sigma_s, -math.expm1(lam_t - lam_s)


def ddpm_steps(log_snrs: Sequence[float]) -> list[SolverStep]:
    """Ancestral DDPM steps: sample the posterior q(x_s | x_t, x0) (Ho et al., 2020, "DDPM").

    With ``c = 1 - exp(lam_t - lam_s)`` the posterior mean is
    ``(sigma_s / sigma_t)**2 (alpha_t / alpha_s) x_t + alpha_s c x0`` and the variance
    ``sigma_s**2 c``, DDPM's "fixed small" variance, written in log-SNR form.
    """
    steps = []
    for lam_t, lam_s, alpha_t, sigma_t, alpha_s, sigma_s, c in _grid_intervals(log_snrs):
        steps.append(SolverStep(
            log_snr=lam_t, next_log_snr=lam_s,
            x_coef=(sigma_s / sigma_t) ** 2 * alpha_t / alpha_s,
            x0_coef=alpha_s * c,
            prev_x0_coef=0.0,
            noise_coef=sigma_s * math.sqrt(c),
        ))
    return steps


def ddim_steps(log_snrs: Sequence[float], eta: float = 0.0) -> list[SolverStep]:
    """DDIM steps (Song et al., 2021, "DDIM"): ``x_s = alpha_s x0 + sqrt(sigma_s**2 - std**2) eps + std z``.

    ``std = eta * sigma_s * sqrt(c)`` with ``c = 1 - exp(lam_t - lam_s)``: eta = 0 is deterministic
    and eta = 1 is the ancestral DDPM step. eps is written in terms of x and x0 to give the
    coefficients of the module docstring.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"invalid eta {eta!r}: expected a float in [0, 1] (0 = deterministic DDIM, 1 = DDPM)")
    steps = []
    for lam_t, lam_s, alpha_t, sigma_t, alpha_s, sigma_s, c in _grid_intervals(log_snrs):
        keep = math.sqrt(1.0 - eta**2 * c)  # sqrt(sigma_s**2 - std**2) / sigma_s
        # x0_coef = alpha_s - keep * sigma_s * alpha_t / sigma_t = alpha_s (1 - keep * exp(-(lam_s - lam_t) / 2)),
        # rewritten as (1 - keep) + keep (1 - exp(..)) to avoid cancellation for close grid points.
        half_decay = -math.expm1((lam_t - lam_s) / 2)
        steps.append(SolverStep(
            log_snr=lam_t, next_log_snr=lam_s,
            x_coef=keep * sigma_s / sigma_t,
            x0_coef=alpha_s * (eta**2 * c / (1.0 + keep) + keep * half_decay),
            prev_x0_coef=0.0,
            noise_coef=eta * sigma_s * math.sqrt(c),
        ))
    return steps


def dpmpp_2m_steps(log_snrs: Sequence[float]) -> list[SolverStep]:
    """DPM-Solver++(2M) steps in data prediction form (Lu et al., 2022, "DPM-Solver++").

    With half-log-SNR step ``h = (lam_s - lam_t) / 2`` the first-order step is
    ``x_s = (sigma_s / sigma_t) x - alpha_s expm1(-h) x0``. Later steps replace x0 by
    ``(1 + 1 / (2 r)) x0 - x0_prev / (2 r)`` with ``r = h_prev / h``. The first step (no history)
    and the last step (to clean data, where h is infinite) are first order.
    """
    grid = check_log_snrs(log_snrs) + [math.inf]
    steps = []
    for index, (lam_t, lam_s) in enumerate(zip(grid[:-1], grid[1:])):
        alpha_s, sigma_s = alpha_sigma_scalar(lam_s)
        sigma_t = alpha_sigma_scalar(lam_t)[1]
        h = (lam_s - lam_t) / 2
        first_order = -alpha_s * math.expm1(-h)
        x0_coef, prev_x0_coef = first_order, 0.0
        if index > 0 and math.isfinite(lam_s):
            ratio = ((lam_t - grid[index - 1]) / 2) / h
            x0_coef = first_order * (1.0 + 0.5 / ratio)
            prev_x0_coef = -first_order * 0.5 / ratio
        steps.append(SolverStep(
            log_snr=lam_t, next_log_snr=lam_s,
            x_coef=sigma_s / sigma_t,
            x0_coef=x0_coef,
            prev_x0_coef=prev_x0_coef,
            noise_coef=0.0,
        ))
    return steps


def solver_steps(solver: str, log_snrs: Sequence[float], eta: float = 0.0) -> list[SolverStep]:
    """Return the update coefficients of ``solver`` ("ddpm", "ddim" or "dpmpp_2m") on ``log_snrs``.

    ``eta`` applies to "ddim" only.
    """
    if solver == "ddpm":
        return ddpm_steps(log_snrs)
    if solver == "ddim":
        return ddim_steps(log_snrs, eta)
    if solver == "dpmpp_2m":
        return dpmpp_2m_steps(log_snrs)
    raise ValueError(f"invalid solver {solver!r}: expected one of {', '.join(map(repr, SAMPLERS))}")
