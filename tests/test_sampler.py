"""Shared sampler: parity with diffusers' schedulers, oracle recovery, guidance and thresholding."""

from __future__ import annotations

import math

import pytest
import torch

from imagen.config import OBJECTIVES, DiffusionConfig
from imagen.diffusion import alpha_sigma, randn_like_per_sample
from imagen.sampler import abs_quantile_per_sample, guided_model_fn, sample, threshold_x0
from imagen.solvers import continuous_log_snrs, discrete_log_snrs, solver_steps

SOLVERS = ("ddpm", "ddim", "dpmpp_2m")
DIFFUSERS_OBJECTIVE = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def config(objective: str = "v", schedule: str = "cosine") -> DiffusionConfig:
    return DiffusionConfig(schedule=schedule, objective=objective, log_snr_min=-20.0, log_snr_max=20.0, min_snr_gamma=None)


def generators(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def analytic_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A deterministic, nonlinear stand-in for a network: prediction (B, C, H, W) from x_t and timestep t (B,)."""
    t = t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return 0.8 * torch.tanh(x) + 0.3 * torch.sin(x * t / 300.0) + 0.05 * t / 1000


# --- parity with diffusers -----------------------------------------------------------------------


def diffusers_scheduler(solver: str, objective: str, thresholding: str, spacing: str | None = None):
    diffusers = pytest.importorskip("diffusers")
    options = dict(
        timestep_spacing=spacing or ("linspace" if solver == "dpmpp_2m" else "leading"),
        num_train_timesteps=1000,
        beta_schedule="linear",
        prediction_type=DIFFUSERS_OBJECTIVE[objective],
        thresholding=thresholding == "dynamic",
        dynamic_thresholding_ratio=0.995,
        sample_max_value=1e6,  # diffusers caps s at this value: lift the cap to match s = max(1, quantile)
    )
    if solver == "ddpm":
        return diffusers.DDPMScheduler(**options, clip_sample=thresholding == "static", variance_type="fixed_small")
    if solver == "ddim":
        return diffusers.DDIMScheduler(**options, clip_sample=thresholding == "static", set_alpha_to_one=True)
    return diffusers.DPMSolverMultistepScheduler(
        **options, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", final_sigmas_type="zero"
    )


def run_parity(
    solver: str,
    objective: str,
    thresholding: str,
    num_steps: int | None = None,
    eta: float = 0.0,
    spacing: str | None = None,
    timesteps: list[int] | None = None,
) -> None:
    """Compare ``sample`` with the diffusers scheduler on the same timesteps, model and noise."""
    scheduler = diffusers_scheduler(solver, objective, thresholding, spacing)
    if timesteps is None:
        scheduler.set_timesteps(num_steps)
    else:
        scheduler.set_timesteps(timesteps=timesteps)
    timesteps = scheduler.timesteps.tolist()
    shape = (3, 3, 8, 8)
    seeds = (1, 2, 3)

    # Reference: the scheduler's own loop on the same initial noise and per-sample noise streams.
    reference_generators = generators(seeds)
    x = randn_like_per_sample(shape, reference_generators, dtype=torch.float64)
    for t in timesteps:
        prediction = analytic_model(x, torch.full((shape[0],), t))
        if solver == "ddpm":
            x = scheduler.step(prediction, t, x, generator=reference_generators).prev_sample
        elif solver == "ddim":
            x = scheduler.step(
                prediction, t, x, eta=eta, use_clipped_model_output=True, generator=reference_generators
            ).prev_sample
        else:
            x = scheduler.step(prediction, t, x).prev_sample
    reference = x

    log_snrs = discrete_log_snrs(scheduler.alphas_cumprod, timesteps)
    timestep_of = dict(zip(log_snrs.tolist(), timesteps))
    calls = []

    def model_fn(x_t, log_snr):
        calls.append(log_snr.dtype)
        return analytic_model(x_t, torch.tensor([timestep_of[value] for value in log_snr.tolist()]))

    ours = sample(
        model_fn, shape, diffusion=config(objective, "linear"), solver=solver, log_snrs=log_snrs, eta=eta,
        thresholding=thresholding, generators=generators(seeds), dtype=torch.float64, progress=False,
    )
    assert len(calls) == len(timesteps)
    assert all(dtype == torch.float64 for dtype in calls)
    # diffusers computes its coefficients in float32 (and DPM-Solver's state too), hence a relative bound.
    scale = max(1.0, reference.abs().max().item())
    assert (ours - reference).abs().max().item() <= 1e-5 * scale


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("thresholding", ["none", "static", "dynamic"])
def test_ddpm_matches_diffusers(objective, thresholding):
    run_parity("ddpm", objective, thresholding, num_steps=10)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("thresholding", ["none", "static", "dynamic"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_matches_diffusers(objective, thresholding, eta):
    run_parity("ddim", objective, thresholding, num_steps=10, eta=eta)


# diffusers' DPMSolverMultistepScheduler has no static clipping option.
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("thresholding", ["none", "dynamic"])
def test_dpmpp_2m_matches_diffusers(objective, thresholding):
    run_parity("dpmpp_2m", objective, thresholding, num_steps=10)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("num_steps", [1, 2, 3, 25])
def test_parity_step_counts(solver, num_steps):
    run_parity(solver, "eps", "none", num_steps=num_steps, eta=0.3)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_parity_timestep_spacing(spacing):
    # DDIM steps from t to t - 1000 // N, which is the next listed timestep for these two spacings.
    run_parity("ddim", "v", "dynamic", num_steps=8, eta=0.4, spacing=spacing)


@pytest.mark.parametrize("solver", ["ddpm", "dpmpp_2m"])
def test_parity_custom_timesteps(solver):
    run_parity(solver, "eps", "dynamic", timesteps=[999, 871, 640, 402, 233, 90, 17, 0])


# --- solver invariants ----------------------------------------------------------------------------


def oracle_model(x0: torch.Tensor, objective: str):
    """Return a model_fn that predicts the true noise of x_t for the fixed clean data ``x0``."""

    def model_fn(x_t, log_snr):
        alpha, sigma = alpha_sigma(log_snr.double().view(-1, 1, 1, 1))
        eps = (x_t - alpha * x0) / sigma
        return {"eps": eps, "x0": x0.expand_as(x_t), "v": alpha * eps - sigma * x0}[objective].to(x_t.dtype)

    return model_fn


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_oracle_recovers_x0(solver, objective, schedule):
    x0 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.8 - 0.9
    out = sample(
        oracle_model(x0, objective), x0.shape, diffusion=config(objective, schedule), solver=solver, num_steps=7,
        eta=0.7, generators=generators([0, 1]), dtype=torch.float64, progress=False,
    )
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-6)


def test_ddim_eta_one_equals_ddpm():
    def model_fn(x, log_snr):
        return analytic_model(x, log_snr * 50)

    outputs = [
        sample(model_fn, (2, 3, 8, 8), diffusion=config("eps"), solver=solver, num_steps=6, eta=1.0,
               thresholding="none", generators=generators([4, 5]), dtype=torch.float64, progress=False)
        for solver in ("ddpm", "ddim")
    ]
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("solver", SOLVERS)
def test_last_step_lands_on_clean_data(solver):
    steps = solver_steps(solver, continuous_log_snrs(config(), 5), eta=0.5)
    assert math.isinf(steps[-1].next_log_snr)
    assert steps[-1].x_coef == 0.0
    assert steps[-1].noise_coef == 0.0
    assert [step.next_log_snr for step in steps[:-1]] == [step.log_snr for step in steps[1:]]


def test_continuous_grid_spans_schedule():
    log_snrs = continuous_log_snrs(config(schedule="cosine"), 4)
    assert log_snrs.tolist()[0] == -20.0
    assert torch.all(log_snrs[1:] > log_snrs[:-1])
    # t = 0.25 on the cosine schedule: log_snr = -2 log tan(pi / 8).
    assert log_snrs[-1].item() == pytest.approx(-2 * math.log(math.tan(math.pi / 8)))


def test_generator_reproducible_across_batches():
    def model_fn(x, log_snr):
        return analytic_model(x, log_snr * 50)

    def run(seeds):
        return sample(model_fn, (len(seeds), 3, 8, 8), diffusion=config(), solver="ddpm", num_steps=4,
                      generators=generators(seeds), progress=False)

    batch = run([10, 11, 12])
    alone = run([11])
    moved = run([12, 10])
    torch.testing.assert_close(batch[1], alone[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(batch[0], moved[1], rtol=0, atol=1e-6)
    torch.testing.assert_close(batch[2], moved[0], rtol=0, atol=1e-6)
    assert not torch.allclose(batch[0], batch[1])


def test_callback_sees_every_step():
    seen = []

    def callback(index, log_snr, x_t, x0):
        seen.append((index, log_snr, x_t.shape, x0.clone()))
        return "ignored"

    out = sample(lambda x, log_snr: torch.zeros_like(x), (1, 3, 4, 4), diffusion=config(), solver="dpmpp_2m",
                 num_steps=3, callback=callback, progress=True)
    assert [entry[0] for entry in seen] == [0, 1, 2]
    assert [entry[1] for entry in seen] == continuous_log_snrs(config(), 3).tolist()
    assert all(entry[2] == (1, 3, 4, 4) for entry in seen)
    assert torch.equal(seen[-1][3], out)


def test_sample_keeps_no_graph():
    weight = torch.ones(1, requires_grad=True)
    out = sample(lambda x, log_snr: x * weight, (1, 3, 4, 4), diffusion=config(), solver="ddim", num_steps=2,
                 progress=False)
    assert not out.requires_grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sample_low_precision(dtype):
    out = sample(lambda x, log_snr: torch.tanh(x), (2, 3, 8, 8), diffusion=config(), solver="dpmpp_2m",
                 num_steps=3, generators=generators([0, 1]), dtype=dtype, progress=False)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    assert out.abs().max() <= 1.0


def test_sample_rejects_bad_arguments():
    def model_fn(x, log_snr):
        return x

    base = dict(diffusion=config(), solver="ddim", num_steps=2, progress=False)
    with pytest.raises(ValueError, match="invalid solver 'euler'"):
        sample(model_fn, (1, 3, 4, 4), **{**base, "solver": "euler"})
    with pytest.raises(ValueError, match="invalid thresholding 'soft'"):
        sample(model_fn, (1, 3, 4, 4), **base, thresholding="soft")
    with pytest.raises(ValueError, match="pass exactly one"):
        sample(model_fn, (1, 3, 4, 4), **base, log_snrs=[0.0, 1.0])
    with pytest.raises(ValueError, match="invalid num_steps 0"):
        sample(model_fn, (1, 3, 4, 4), **{**base, "num_steps": 0})
    with pytest.raises(ValueError, match="strictly increasing"):
        sample(model_fn, (1, 3, 4, 4), **{**base, "num_steps": None}, log_snrs=[1.0, 0.0])
    with pytest.raises(ValueError, match="must be finite"):
        sample(model_fn, (1, 3, 4, 4), **{**base, "num_steps": None}, log_snrs=[0.0, math.inf])
    with pytest.raises(ValueError, match="invalid eta 1.5"):
        sample(model_fn, (1, 3, 4, 4), **base, eta=1.5)
    with pytest.raises(ValueError, match="got 2 generators for a batch of 1"):
        sample(model_fn, (1, 3, 4, 4), **base, generators=generators([0, 1]))
    with pytest.raises(ValueError, match="invalid sample shape"):
        sample(model_fn, (0, 3, 4, 4), **base)
    with pytest.raises(ValueError, match="model_fn returned shape"):
        sample(lambda x, log_snr: x[:, :2], (1, 3, 4, 4), **base)
    with pytest.raises(ValueError, match="same clipped log-SNR"):
        narrow = DiffusionConfig("cosine", "v", -1.0, 1.0, None)
        sample(model_fn, (1, 3, 4, 4), **{**base, "diffusion": narrow, "num_steps": 50})
    with pytest.raises(ValueError, match="invalid timesteps"):
        discrete_log_snrs(torch.linspace(0.99, 0.01, 10), [12, 3])


# --- classifier-free guidance ----------------------------------------------------------------------


class CountingModel:
    """A conditional stand-in model that records the batch size of each call."""

    def __init__(self):
        self.batch_sizes = []

    def __call__(self, x, log_snr, text_embeds=None, text_mask=None, lowres_image=None):
        self.batch_sizes.append(x.shape[0])
        pooled = (text_embeds * text_mask.unsqueeze(-1)).sum(dim=(1, 2)).view(-1, 1, 1, 1)
        out = torch.tanh(x) * (1 + pooled) + log_snr.view(-1, 1, 1, 1) * 0.01
        if lowres_image is not None:
            out = out + lowres_image
        return out


def conditions(batch: int = 2, cond_length: int = 5, uncond_length: int = 3):
    generator = torch.Generator().manual_seed(3)
    cond = {
        "text_embeds": torch.randn(batch, cond_length, 4, generator=generator),
        "text_mask": torch.rand(batch, cond_length, generator=generator) > 0.3,
        "lowres_image": None,
    }
    uncond = {
        "text_embeds": torch.zeros(batch, uncond_length, 4),
        "text_mask": torch.zeros(batch, uncond_length, dtype=torch.bool),
        "lowres_image": None,
    }
    return cond, uncond


def test_guidance_one_batched_forward():
    model = CountingModel()
    cond, uncond = conditions()
    x, log_snr = torch.randn(2, 3, 4, 4), torch.tensor([-1.0, 2.0])
    guided = guided_model_fn(model, cond, uncond, guidance_scale=3.0)(x, log_snr)
    assert model.batch_sizes == [4]
    pred_c, pred_u = model(x, log_snr, **cond), model(x, log_snr, **uncond)
    torch.testing.assert_close(guided, pred_u + 3.0 * (pred_c - pred_u))


def test_guidance_scale_one_exactly_conditional():
    model = CountingModel()
    cond, uncond = conditions()
    x, log_snr = torch.randn(2, 3, 4, 4), torch.zeros(2)
    guided = guided_model_fn(model, cond, uncond, guidance_scale=1.0)(x, log_snr)
    assert torch.equal(guided, model(x, log_snr, **cond))


def test_guidance_scale_zero_exactly_unconditional():
    model = CountingModel()
    cond, uncond = conditions()
    x, log_snr = torch.randn(2, 3, 4, 4), torch.zeros(2)
    guided = guided_model_fn(model, cond, uncond, guidance_scale=0.0)(x, log_snr)
    assert torch.equal(guided, model(x, log_snr, **uncond))


def test_guidance_pads_text_and_broadcasts_uncond():
    calls = []

    def model(x, log_snr, text_embeds, text_mask, lowres_image):
        calls.append((text_embeds.shape, text_mask.shape, lowres_image))
        return x

    cond, uncond = conditions(cond_length=2, uncond_length=6)
    uncond = {key: value[:1] if value is not None else None for key, value in uncond.items()}
    guided_model_fn(model, cond, uncond, guidance_scale=2.0)(torch.randn(2, 3, 4, 4), torch.zeros(2))
    assert calls == [((4, 6, 4), (4, 6), None)]


def test_guidance_inside_sampler():
    model = CountingModel()
    cond, uncond = conditions()
    out = sample(guided_model_fn(model, cond, uncond, 5.0), (2, 3, 4, 4), diffusion=config(), solver="dpmpp_2m",
                 num_steps=4, generators=generators([0, 1]), progress=False)
    assert model.batch_sizes == [4, 4, 4, 4]
    assert out.shape == (2, 3, 4, 4)


def test_guidance_rejects_bad_conditions():
    model = CountingModel()
    cond, uncond = conditions()
    with pytest.raises(ValueError, match="invalid guidance_scale -1.0"):
        guided_model_fn(model, cond, uncond, -1.0)
    with pytest.raises(ValueError, match="cond keys"):
        guided_model_fn(model, cond, {"text_embeds": uncond["text_embeds"]}, 2.0)
    with pytest.raises(TypeError, match="condition 'lowres_image'"):
        guided_model_fn(model, cond, {**uncond, "lowres_image": torch.zeros(2, 3, 4, 4)}, 2.0)
    with pytest.raises(ValueError, match="differ in more than the sequence length"):
        guided_model_fn(model, cond, {**uncond, "text_embeds": torch.zeros(2, 3, 7)}, 2.0)
    with pytest.raises(ValueError, match="batch sizes 2 \\(cond\\) and 3 \\(uncond\\)"):
        guided_model_fn(model, cond, {**uncond, "text_mask": torch.zeros(3, 3, dtype=torch.bool)}, 2.0)
    guided = guided_model_fn(model, cond, uncond, 2.0)
    with pytest.raises(ValueError, match="sample batch 3 differs from the condition batch 2"):
        guided(torch.zeros(3, 3, 4, 4), torch.zeros(3))


# --- thresholding -------------------------------------------------------------------------------------


def test_quantile_matches_torch_quantile():
    x = torch.randn(5, 3, 7, 9, generator=torch.Generator().manual_seed(0))
    for q in (0.0, 0.3, 0.5, 0.9, 0.995, 1.0):
        expected = torch.quantile(x.abs().flatten(1), q, dim=1)
        # torch.quantile rounds the position q * (n - 1) to float32; the sampler keeps it in float64.
        torch.testing.assert_close(abs_quantile_per_sample(x, q), expected, rtol=1e-5, atol=1e-6)


def test_dynamic_threshold_per_sample():
    generator = torch.Generator().manual_seed(0)
    inside = torch.rand(3, 8, 8, generator=generator) * 1.8 - 0.9
    outside = torch.randn(3, 8, 8, generator=generator) * 4
    x0 = torch.stack([inside, outside, inside])
    out = threshold_x0(x0, "dynamic", 0.995)
    assert torch.equal(out[0], inside)
    assert torch.equal(out[2], inside)
    s = torch.quantile(outside.abs().flatten(), 0.995)
    assert s > 1
    torch.testing.assert_close(out[1], outside.clamp(-s, s) / s)
    assert out[1].abs().max() == pytest.approx(1.0)
    torch.testing.assert_close(threshold_x0(x0[1:2], "dynamic", 0.995)[0], out[1], rtol=0, atol=0)


def test_dynamic_threshold_quantile_below_one_clips():
    # 99.5% of the values inside [-1, 1]: s = 1, so the few outliers are clipped and nothing is rescaled.
    x0 = torch.full((1, 1, 20, 20), 0.5)
    x0[0, 0, 0, 0] = 7.0
    out = threshold_x0(x0, "dynamic", 0.995)
    assert out[0, 0, 0, 0] == 1.0
    assert torch.equal(out.flatten()[1:], x0.flatten()[1:])


def test_static_and_no_threshold():
    x0 = torch.tensor([-3.0, -0.5, 0.25, 2.0]).view(1, 1, 2, 2)
    assert threshold_x0(x0, "static").flatten().tolist() == [-1.0, -0.5, 0.25, 1.0]
    assert threshold_x0(x0, "none") is x0
    with pytest.raises(ValueError, match="invalid thresholding 'clip'"):
        threshold_x0(x0, "clip")
    with pytest.raises(ValueError, match="invalid quantile 1.5"):
        threshold_x0(x0, "dynamic", 1.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dynamic_threshold_low_precision(dtype):
    x0 = (torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    x0[0] = x0[0].clamp(-1, 1)
    out = threshold_x0(x0, "dynamic")
    assert out.dtype == dtype
    assert torch.equal(out[0], x0[0])
    expected = threshold_x0(x0.float(), "dynamic")
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=1e-2)


def test_dynamic_threshold_1024_batch():
    # 2 x 3 x 1024 x 1024 = 6.3M elements per batch; torch.quantile accepts one sample (3.1M) at a time.
    x0 = torch.randn(2, 3, 1024, 1024, generator=torch.Generator().manual_seed(0), dtype=torch.bfloat16) * 2
    x0[1] *= 0.1  # |x0[1]| has a 99.5% quantile near 0.56, so it is only clipped
    scale = abs_quantile_per_sample(x0, 0.995)
    for index in range(2):
        expected = torch.quantile(x0[index].float().abs().flatten(), 0.995)
        assert scale[index].item() == pytest.approx(expected.item(), rel=1e-6)
    out = threshold_x0(x0, "dynamic")
    assert out.dtype == torch.bfloat16
    assert out[0].abs().max() <= 1.0
    assert torch.equal(out[1], x0[1].clamp(-1, 1))
