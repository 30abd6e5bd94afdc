"""The shared sampler: DDPM, DDIM and DPM-Solver++(2M) with classifier-free guidance and thresholding.

Every stage and the pipeline sample through :func:`sample`. The model is a function
``model_fn(x_t (B, C, H, W), log_snr (B,)) -> prediction (B, C, H, W)`` in the objective of the
stage's :class:`~imagen.config.DiffusionConfig`; :func:`guided_model_fn` builds one with
classifier-free guidance from a U-Net and its conditioning. The solvers' update coefficients
live in :mod:`imagen.solvers`.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from tqdm.auto import tqdm

from imagen.config import OBJECTIVES, THRESHOLDING, DiffusionConfig
from imagen.diffusion import randn_like_per_sample
from imagen.solvers import alpha_sigma_scalar, check_log_snrs, continuous_log_snrs, solver_steps

logger = logging.getLogger(__name__)

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[int, float, torch.Tensor, torch.Tensor], Any]

# Elements per chunk (64 MiB in float32) when thresholding: bounds the float32 working copy
# for large batches such as B x 3 x 1024 x 1024.
_THRESHOLD_CHUNK_ELEMENTS = 1 << 24


# --- thresholding ------------------------------------------------------------------------------


def _sample_chunks(batch_size: int, sample_numel: int) -> list[slice]:
    per_chunk = max(1, _THRESHOLD_CHUNK_ELEMENTS // max(1, sample_numel))
    return [slice(start, start + per_chunk) for start in range(0, batch_size, per_chunk)]


def abs_quantile_per_sample(x: torch.Tensor, q: float) -> torch.Tensor:
    """Return the q-quantile of ``|x|`` over each sample (B,), in float32.

    Same definition as ``torch.quantile(x.abs().flatten(1), q, dim=1)`` (linear interpolation
    between the two order statistics around ``q * (n - 1)``), which rejects inputs of more than
    2**24 elements. Here ``topk`` selects only the order statistics needed, a few samples at a
    time, so memory stays bounded for B x 3 x 1024 x 1024 batches in any floating dtype.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"invalid quantile {q!r}: expected a float in [0, 1], such as 0.995")
    flat = x.reshape(x.shape[0], -1)
    n = flat.shape[1]
    position = q * (n - 1)
    lower = min(int(math.floor(position)), n - 1)
    upper = min(lower + 1, n - 1)
    weight = position - lower
    result = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for chunk in _sample_chunks(flat.shape[0], n):
        values = flat[chunk].float().abs()
        if n - lower <= upper + 1:
            # Largest n - lower values, descending: the last is order statistic `lower`.
            top = values.topk(n - lower, dim=1, largest=True, sorted=True).values
            low_value, high_value = top[:, -1], top[:, -1 - (upper - lower)]
        else:
            # Smallest upper + 1 values, ascending.
            bottom = values.topk(upper + 1, dim=1, largest=False, sorted=True).values
            low_value, high_value = bottom[:, lower], bottom[:, upper]
        result[chunk] = torch.lerp(low_value, high_value, weight)
    return result


def threshold_x0(x0: torch.Tensor, mode: str, percentile: float = 0.995) -> torch.Tensor:
    """Threshold a predicted x0 (B, C, H, W), each sample on its own.

    "dynamic" (Saharia et al., 2022, "Imagen") sets ``s = max(1, percentile-quantile of |x0|)``,
    clips to [-s, s] and divides by s. A sample already inside [-1, 1] is returned unchanged.
    "static" clips to [-1, 1]; "none" returns x0 as is. The result has the dtype of ``x0``.
    """
    if mode not in THRESHOLDING:
        raise ValueError(f"invalid thresholding {mode!r}: expected one of {', '.join(map(repr, THRESHOLDING))}")
    if mode == "none":
        return x0
    if mode == "static":
        return x0.clamp(-1.0, 1.0)
    scale = abs_quantile_per_sample(x0, percentile).clamp(min=1.0)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    chunks = _sample_chunks(x0.shape[0], x0[0].numel())
    out = torch.empty_like(x0) if len(chunks) > 1 else None
    for chunk in chunks:
        s = scale[chunk].reshape(shape)
        scaled = (torch.minimum(torch.maximum(x0[chunk].float(), -s), s) / s).to(x0.dtype)
        if out is None:
            return scaled
        out[chunk] = scaled
    return out


# --- classifier-free guidance ----------------------------------------------------------------


def _pair_condition(key: str, cond: Any, uncond: Any, batch_size: int) -> Any:
    """Concatenate one conditional and one unconditional keyword argument along the batch."""
    if cond is None and uncond is None:
        return None
    if not isinstance(cond, torch.Tensor) or not isinstance(uncond, torch.Tensor):
        raise TypeError(
            f"condition {key!r}: expected tensors (or None) in both cond and uncond, "
            f"got {type(cond).__name__} and {type(uncond).__name__}"
        )
    if uncond.shape[0] == 1 and batch_size > 1:
        uncond = uncond.expand(batch_size, *uncond.shape[1:])
    if cond.shape[0] != batch_size or uncond.shape[0] != batch_size:
        raise ValueError(
            f"condition {key!r}: batch sizes {cond.shape[0]} (cond) and {uncond.shape[0]} (uncond) "
            f"must equal the batch size {batch_size}, or 1 for uncond"
        )
    if cond.dim() >= 2 and cond.shape[2:] == uncond.shape[2:] and cond.shape[1] != uncond.shape[1]:
        # Text of different lengths: zero-pad the sequence dimension (zeros and False are the padding
        # that pad_text in imagen.text_encoder uses, so padded tokens stay masked).
        length = max(cond.shape[1], uncond.shape[1])
        cond, uncond = (
            torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, length - t.shape[1])) for t in (cond, uncond)
        )
    if cond.shape != uncond.shape:
        raise ValueError(
            f"condition {key!r}: cond shape {tuple(cond.shape)} and uncond shape {tuple(uncond.shape)} differ "
            "in more than the sequence length (dimension 1)"
        )
    return torch.cat([cond, uncond.to(cond.dtype)])


def guided_model_fn(
    model: Callable[..., torch.Tensor],
    cond: Mapping[str, Optional[torch.Tensor]],
    uncond: Mapping[str, Optional[torch.Tensor]],
    guidance_scale: float,
) -> ModelFn:
    """Wrap ``model(x, log_snr, **kwargs)`` into a classifier-free guided ``model_fn(x, log_snr)``.

    The result returns ``pred_u + w * (pred_c - pred_u)`` on every output channel, where
    ``pred_c`` uses the keyword arguments ``cond`` and ``pred_u`` uses ``uncond`` (the null
    condition the model was trained with, or a negative prompt). Both branches run as one
    forward pass on a doubled batch. ``guidance_scale`` w = 1 runs only the conditional branch
    and w = 0 only the unconditional one, so they return exactly ``pred_c`` and ``pred_u``.

    ``cond`` and ``uncond`` have the same keys; values are tensors with the batch first (uncond
    may have batch 1) or None in both. Tensors that differ only in dimension 1 (text of different
    length) are zero-padded to the longer one.
    """
    if guidance_scale < 0 or not math.isfinite(guidance_scale):
        raise ValueError(f"invalid guidance_scale {guidance_scale!r}: expected a float >= 0 (1.0 = no guidance)")
    if set(cond) != set(uncond):
        raise ValueError(
            f"cond keys {sorted(cond)} and uncond keys {sorted(uncond)} differ: pass the same keyword arguments to both"
        )
    sizes = {t.shape[0] for t in cond.values() if isinstance(t, torch.Tensor)}
    if len(sizes) > 1:
        raise ValueError(f"cond tensors have different batch sizes {sorted(sizes)}: expected one batch size")
    batch_size = sizes.pop() if sizes else None

    if guidance_scale == 1.0:
        return lambda x, log_snr: model(x, log_snr, **cond)
    if guidance_scale == 0.0:
        return lambda x, log_snr: model(x, log_snr, **uncond)

    paired = {
        key: _pair_condition(key, cond[key], uncond[key], batch_size if batch_size is not None else 1) for key in cond
    }

    def guided(x: torch.Tensor, log_snr: torch.Tensor) -> torch.Tensor:
        if batch_size is not None and x.shape[0] != batch_size:
            raise ValueError(
                f"sample batch {x.shape[0]} differs from the condition batch {batch_size}: "
                "build the conditions for the same number of images"
            )
        out = model(torch.cat([x, x]), torch.cat([log_snr, log_snr]), **paired)
        pred_c, pred_u = out.chunk(2)
        return pred_u + guidance_scale * (pred_c - pred_u)

    return guided


# --- the sampling loop ---------------------------------------------------------------------------


def _prediction_to_x0(pred: torch.Tensor, x: torch.Tensor, alpha: float, sigma: float, objective: str) -> torch.Tensor:
    """Scalar-coefficient form of :func:`imagen.diffusion.prediction_to_x0`, for one shared log-SNR."""
    if objective == "x0":
        return pred
    if objective == "eps":
        return (x - sigma * pred) / alpha
    return alpha * x - sigma * pred


@torch.no_grad()
def sample(
    model_fn: ModelFn,
    shape: Sequence[int],
    *,
    diffusion: DiffusionConfig,
    solver: str,
    num_steps: Optional[int] = None,
    log_snrs: Optional[torch.Tensor | Sequence[float]] = None,
    eta: float = 0.0,
    thresholding: str = "dynamic",
    threshold_percentile: float = 0.995,
    generators: Optional[list[torch.Generator]] = None,
    device: Optional[torch.device | str] = None,
    dtype: torch.dtype = torch.float32,
    callback: Optional[Callback] = None,
    progress: bool = True,
) -> torch.Tensor:
    """Draw samples of ``shape`` (B, C, H, W) by solving the reverse diffusion from noise to data.

    The model is evaluated at ``num_steps`` log-SNR values of ``diffusion``'s schedule, at t
    uniformly spaced from 1 down to (not including) 0, or at the given strictly increasing
    ``log_snrs`` (for example :func:`imagen.solvers.discrete_log_snrs` of a discrete schedule);
    give exactly one of the two. After the last evaluation the solver steps to clean data, so the
    output is that step's (thresholded) x0 prediction: in [-1, 1] unless ``thresholding="none"``.

    solver: "ddpm" (ancestral), "ddim" (with ``eta`` in [0, 1]) or "dpmpp_2m".
    thresholding: "dynamic", "static" or "none", applied to each step's x0 (see :func:`threshold_x0`).
    generators: one ``torch.Generator`` per sample for the initial noise and every later draw, so
        a seed gives the same image at any batch size and position; None uses the global state.
    dtype: dtype of the samples and of ``x_t`` given to the model; the model receives ``log_snr``
        (B,) in float64 when dtype is float64, else float32. For mixed precision keep float32 and
        cast inside ``model_fn`` (for example with ``torch.autocast``).
    callback: called after each model evaluation as ``callback(step_index, log_snr, x_t, x0)``;
        its return value is ignored.
    progress: show a tqdm progress bar over the steps.

    The loop runs under ``torch.no_grad()``, so no autograd graph is kept across steps.
    """
    shape = tuple(int(size) for size in shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"invalid sample shape {shape}: expected (B, C, H, W) with positive sizes")
    if diffusion.objective not in OBJECTIVES:
        raise ValueError(f"invalid objective {diffusion.objective!r}: expected one of {OBJECTIVES}")
    if thresholding not in THRESHOLDING:
        raise ValueError(f"invalid thresholding {thresholding!r}: expected one of {', '.join(map(repr, THRESHOLDING))}")
    if (num_steps is None) == (log_snrs is None):
        raise ValueError(
            f"got num_steps={num_steps!r} and log_snrs={log_snrs!r}: pass exactly one "
            "(num_steps for the continuous schedule, log_snrs for an explicit grid)"
        )
    grid = continuous_log_snrs(diffusion, num_steps).tolist() if log_snrs is None else check_log_snrs(log_snrs)
    steps = solver_steps(solver, grid, eta)
    logger.debug("sampling %s with %s over %d steps, log-SNR %s", shape, solver, len(steps), grid)

    x = randn_like_per_sample(shape, generators, device, dtype)
    log_snr_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    x0_prev = None
    progress_bar = tqdm(total=len(steps), desc=f"sampling ({solver})", disable=not progress)
    for index, step in enumerate(steps):
        log_snr = torch.full((shape[0],), step.log_snr, dtype=log_snr_dtype, device=x.device)
        pred = model_fn(x, log_snr)
        if pred.shape != x.shape:
            raise ValueError(
                f"model_fn returned shape {tuple(pred.shape)} for x_t of shape {tuple(x.shape)}: "
                f"expected a prediction of the same shape in the {diffusion.objective!r} objective"
            )
        alpha, sigma = alpha_sigma_scalar(step.log_snr)
        x0 = threshold_x0(_prediction_to_x0(pred, x, alpha, sigma, diffusion.objective), thresholding, threshold_percentile)
        x0 = x0.to(dtype)
        if callback is not None:
            callback(index, step.log_snr, x, x0)

        if math.isinf(step.next_log_snr):
            x = x0
            progress_bar.update(1)
            break
        x_next = x * step.x_coef + x0 * step.x0_coef
        if step.prev_x0_coef != 0.0:
            x_next = x_next + x0_prev * step.prev_x0_coef
        if step.noise_coef > 0.0:
            x_next = x_next + randn_like_per_sample(shape, generators, x.device, dtype) * step.noise_coef
        x, x0_prev = x_next, x0
        progress_bar.update(1)
    progress_bar.close()
    return x
