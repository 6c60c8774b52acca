"""Step-by-step parity of dit_jax.diffusion.samplers against diffusers' schedulers.

Each test drives our sampler and the matching diffusers scheduler with the same deterministic toy
network from the same x_T (float32) and compares every intermediate sample with
max|ours - ref| / max|ref| < 1e-5. Stochastic steps get the same noise on both sides: ours draws
`jax.random.normal(key_i, shape, float32)` (the samplers' documented noise contract) and diffusers
is handed exactly that array.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from diffusers.schedulers import scheduling_ddpm

from dit_jax.diffusion.samplers import (
    DDIMSampler,
    DDPMSampler,
    DPMSolverPP2MSampler,
    Sampler,
    SamplerCarry,
    make_sampler,
)
from dit_jax.diffusion.schedule import linear_betas, scaled_linear_betas, space_timesteps

RTOL = 1e-5
SHAPE = (2, 4, 4, 3)  # (B, H, W, C) NHWC
_rng = np.random.default_rng(0)
# Fixed random parameters of the toy network (never zeros, so no step can pass trivially).
EPS_GAIN = _rng.uniform(0.5, 1.5, SHAPE[1:]).astype(np.float32)
VAR_GAIN = _rng.uniform(-2.0, 2.0, SHAPE[1:]).astype(np.float32)
VAR_BIAS = _rng.uniform(-0.8, 0.8, SHAPE[1:]).astype(np.float32)
X_T = _rng.standard_normal(SHAPE).astype(np.float32)
BASE_KEY = jax.random.key(1234)


def toy_model(x: np.ndarray, t: int, learned: bool) -> np.ndarray:
    """A deterministic stand-in for the network, NHWC float32: epsilon (+ variance values in [-1, 1])."""
    x = np.asarray(x, dtype=np.float32)
    eps = np.tanh(x * EPS_GAIN + np.float32(t / 1000.0))
    if not learned:
        return eps
    variance_values = np.tanh(x * VAR_GAIN + VAR_BIAS - np.float32(t / 1000.0))
    return np.concatenate([eps, variance_values], axis=-1)


def nchw(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2))))


def nhwc(a: torch.Tensor) -> np.ndarray:
    return np.transpose(a.numpy(), (0, 2, 3, 1))


@functools.partial(jax.jit, static_argnums=0)
def jitted_step(sampler: Sampler, carry: SamplerCarry, model_output, i, key) -> SamplerCarry:
    return sampler.step(carry, model_output, i, key)


def step_key(i: int) -> jax.Array:
    return jax.random.fold_in(BASE_KEY, i)


def step_noise(i: int) -> np.ndarray:
    """The noise our stochastic samplers draw at step i (their documented contract)."""
    return np.asarray(jax.random.normal(step_key(i), SHAPE, jnp.float32))


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def run_parity(sampler: Sampler, reference_step, learned: bool) -> list[float]:
    """Walk both chains in lockstep; each side feeds the toy model its own current sample."""
    # Short chains run eagerly (no per-sampler compile); long ones amortise one jit compile.
    step = functools.partial(jitted_step, sampler) if sampler.num_steps > 50 else sampler.step
    carry = sampler.init(jnp.asarray(X_T))
    reference = nchw(X_T)
    errors = []
    for i, t in enumerate(sampler.model_timesteps):
        ours_out = toy_model(np.asarray(sampler.sample(carry)), t, learned)
        carry = step(carry, jnp.asarray(ours_out), jnp.int32(i), step_key(i))
        ref_out = toy_model(nhwc(reference), t, learned)
        reference = reference_step(nchw(ref_out), t, reference, nchw(step_noise(i)))
        errors.append(relative_error(np.asarray(sampler.sample(carry)), nhwc(reference)))
    return errors


def assert_parity(errors: list[float]) -> None:
    worst = int(np.argmax(errors))
    assert errors[worst] < RTOL, f"step {worst}: relative error {errors[worst]:.2e} (all: {errors})"


# DDPM -------------------------------------------------------------------------------------------


@pytest.fixture
def ddpm_noise_feed(monkeypatch):
    """Make diffusers' DDPMScheduler draw the noise we hand it (it has no variance_noise argument)."""
    pending: list[torch.Tensor] = []

    def fake_randn(shape, **kwargs):
        assert tuple(shape) == tuple(pending[0].shape)
        return pending.pop(0)

    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", fake_randn)
    return pending


def ddpm_reference_step(scheduler: DDPMScheduler, feed: list[torch.Tensor]):
    def reference_step(out, t, sample, noise):
        feed[:] = [noise]
        return scheduler.step(out, int(t), sample).prev_sample

    return reference_step


@pytest.mark.parametrize("variance_type", ["learned_range", "fixed_small"])
@pytest.mark.parametrize(
    "spacing,steps,offset",
    [("leading", 10, 1), ("trailing", 7, 0), ("linspace", 6, 0)],
)
def test_ddpm_matches_diffusers_spacings(ddpm_noise_feed, variance_type, spacing, steps, offset):
    learned = variance_type == "learned_range"
    sampler = make_sampler(
        "ddpm", steps=steps, betas=linear_betas(), timestep_spacing=spacing, steps_offset=offset
    )
    assert isinstance(sampler, DDPMSampler)
    scheduler = DDPMScheduler(
        variance_type=variance_type, clip_sample=False, timestep_spacing=spacing, steps_offset=offset
    )
    scheduler.set_timesteps(steps)
    assert sampler.model_timesteps == tuple(scheduler.timesteps.tolist())
    assert_parity(run_parity(sampler, ddpm_reference_step(scheduler, ddpm_noise_feed), learned))


@pytest.mark.parametrize("variance_type", ["learned_range", "fixed_small"])
def test_ddpm_dit_respacing_250_matches_diffusers(ddpm_noise_feed, variance_type):
    """DiT's sampler: DDPM on space_timesteps(1000, "250"), diffusers stepping the same timesteps."""
    learned = variance_type == "learned_range"
    sampler = make_sampler("ddpm", steps=250, betas=linear_betas())
    kept = space_timesteps(1000, "250")
    assert sampler.model_timesteps == tuple(int(t) for t in kept[::-1])
    scheduler = DDPMScheduler(variance_type=variance_type, clip_sample=False)
    scheduler.set_timesteps(timesteps=[int(t) for t in kept[::-1]])
    # Stock diffusers keeps alphas_cumprod in float32, so 1 - alpha_bar loses ~3 digits near t = 0
    # (alpha_bar ~ 0.9999); over 250 steps that alone reaches ~1.3e-5. Bound it loosely ...
    stock_errors = run_parity(sampler, ddpm_reference_step(scheduler, ddpm_noise_feed), learned)
    assert max(stock_errors) < 5e-5, stock_errors
    # ... and hold the step logic to 1e-5 with the schedule in float64: its 0-dim float64 scalars
    # make diffusers form each coefficient in float64 while the arrays stay float32, as ours do.
    scheduler.alphas_cumprod = torch.from_numpy(np.cumprod(1.0 - linear_betas()))
    assert_parity(run_parity(sampler, ddpm_reference_step(scheduler, ddpm_noise_feed), learned))


def test_ddpm_clip_denoised_matches_diffusers_clip_sample(ddpm_noise_feed):
    sampler = make_sampler("ddpm", steps=10, betas=linear_betas(), clip_denoised=True)
    scheduler = DDPMScheduler(variance_type="learned_range", clip_sample=True)
    scheduler.set_timesteps(timesteps=list(sampler.model_timesteps))
    assert_parity(run_parity(sampler, ddpm_reference_step(scheduler, ddpm_noise_feed), True))


def test_ddpm_learned_variance_false_ignores_variance_channels(ddpm_noise_feed):
    """learned_variance=False on a 2C output is DiT's fixed_small sampler reading only epsilon."""
    sampler = make_sampler("ddpm", steps=8, betas=linear_betas(), learned_variance=False)
    scheduler = DDPMScheduler(variance_type="fixed_small", clip_sample=False)
    scheduler.set_timesteps(timesteps=list(sampler.model_timesteps))
    step = ddpm_reference_step(scheduler, ddpm_noise_feed)

    def reference_step(out, t, sample, noise):
        return step(out[:, : SHAPE[-1]], t, sample, noise)

    assert_parity(run_parity(sampler, reference_step, True))


# DDIM -------------------------------------------------------------------------------------------


def ddim_reference_step(scheduler: DDIMScheduler, eta: float, clip: bool):
    def reference_step(out, t, sample, noise):
        result = scheduler.step(
            out[:, : SHAPE[-1]],
            int(t),
            sample,
            eta=eta,
            use_clipped_model_output=clip,
            variance_noise=noise if eta > 0 else None,
        )
        return result.prev_sample

    return reference_step


@pytest.mark.parametrize("eta", [0.0, 0.7])
@pytest.mark.parametrize(
    "spacing,steps,offset,diffusers_spacing",
    [
        ("dit", 20, 0, "leading"),  # IDDPM's "ddim20" grid is diffusers' leading grid
        ("leading", 10, 1, "leading"),
        ("trailing", 7, 0, "trailing"),
        ("linspace", 9, 0, "linspace"),
    ],
)
def test_ddim_matches_diffusers(eta, spacing, steps, offset, diffusers_spacing):
    sampler = make_sampler(
        "ddim", steps=steps, betas=linear_betas(), eta=eta, timestep_spacing=spacing, steps_offset=offset
    )
    assert isinstance(sampler, DDIMSampler)
    scheduler = DDIMScheduler(
        clip_sample=False, timestep_spacing=diffusers_spacing, steps_offset=offset
    )
    scheduler.set_timesteps(steps)
    assert sampler.model_timesteps == tuple(scheduler.timesteps.tolist())
    # Learned-sigma output: the variance half must be ignored.
    assert_parity(run_parity(sampler, ddim_reference_step(scheduler, eta, False), learned=True))


def test_ddim_scaled_linear_clip_matches_diffusers():
    """SD/PixArt schedule, clipping with epsilon re-derived from the clipped x_0."""
    sampler = make_sampler(
        "ddim", steps=10, betas=scaled_linear_betas(), eta=0.3, clip_denoised=True
    )
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=True
    )
    scheduler.set_timesteps(10)
    assert sampler.model_timesteps == tuple(scheduler.timesteps.tolist())
    assert_parity(run_parity(sampler, ddim_reference_step(scheduler, 0.3, True), learned=False))


# DPM-Solver++ 2M --------------------------------------------------------------------------------


def dpm_reference_step(scheduler: DPMSolverMultistepScheduler):
    def reference_step(out, t, sample, noise):
        # diffusers slices a learned-sigma output to 3 channels itself; hand it epsilon only.
        return scheduler.step(out[:, : SHAPE[-1]], int(t), sample).prev_sample

    return reference_step


def dpm_scheduler(**config) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, **config)


@pytest.mark.parametrize("steps", [2, 5, 20])
def test_dpm_dit_spacing_matches_diffusers_custom_timesteps(steps):
    sampler = make_sampler("dpm++", steps=steps, betas=linear_betas())
    assert isinstance(sampler, DPMSolverPP2MSampler)
    scheduler = dpm_scheduler()
    scheduler.set_timesteps(timesteps=list(sampler.model_timesteps))
    assert sampler.model_timesteps == tuple(int(t) for t in space_timesteps(1000, f"ddim{steps}")[::-1])
    assert_parity(run_parity(sampler, dpm_reference_step(scheduler), learned=True))


@pytest.mark.parametrize(
    "spacing,steps,offset",
    [("linspace", 12, 0), ("leading", 16, 1), ("trailing", 7, 0), ("trailing", 1, 0)],
)
def test_dpm_diffusers_spacings_match(spacing, steps, offset):
    sampler = make_sampler(
        "dpm++", steps=steps, betas=scaled_linear_betas(), timestep_spacing=spacing, steps_offset=offset
    )
    scheduler = dpm_scheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        timestep_spacing=spacing,
        steps_offset=offset,
    )
    scheduler.set_timesteps(steps)
    assert sampler.model_timesteps == tuple(scheduler.timesteps.tolist())
    assert_parity(run_parity(sampler, dpm_reference_step(scheduler), learned=False))


def test_dpm_scan_loop_matches_step_by_step():
    """The sampler drives a lax.scan (what the pipeline does) with the same result."""
    sampler = make_sampler("dpm++", steps=6, betas=linear_betas())
    gain = jnp.asarray(EPS_GAIN)

    def model(x, t):
        return jnp.tanh(x * gain + t.astype(jnp.float32) / 1000.0)

    @jax.jit
    def scanned(x_T):
        def body(carry, i):
            out = model(sampler.sample(carry), sampler.timestep(i))
            return sampler.step(carry, out, i, None), None

        carry, _ = jax.lax.scan(body, sampler.init(x_T), jnp.arange(sampler.num_steps))
        return sampler.sample(carry)

    carry = sampler.init(jnp.asarray(X_T))
    for i in range(sampler.num_steps):
        out = model(sampler.sample(carry), jnp.int32(sampler.model_timesteps[i]))
        carry = jitted_step(sampler, carry, out, jnp.int32(i), None)
    # Only XLA's fusion differs between the two programs.
    assert relative_error(np.asarray(scanned(jnp.asarray(X_T))), np.asarray(sampler.sample(carry))) < 1e-5


# Static-argument behaviour ---------------------------------------------------------------------


def test_equal_samplers_hash_equal_and_do_not_retrace():
    traces = []

    @functools.partial(jax.jit, static_argnums=0)
    def counted_step(sampler, carry, out, i, key):
        traces.append(sampler.name)
        return sampler.step(carry, out, i, key)

    x = jnp.asarray(X_T)
    out = jnp.asarray(toy_model(X_T, 999, learned=True))
    for name in ("ddpm", "ddim", "dpm++"):
        first = make_sampler(name, steps=10, betas=linear_betas())
        second = make_sampler(name, steps=10, betas=linear_betas())
        assert first == second and hash(first) == hash(second)
        for sampler in (first, second):
            counted_step(sampler, sampler.init(x), out, jnp.int32(3), step_key(0))
    assert traces == ["ddpm", "ddim", "dpm++"]
    assert make_sampler("ddim", steps=10, betas=linear_betas()) != make_sampler(
        "ddim", steps=10, betas=linear_betas(), eta=0.5
    )


def test_sampler_timestep_and_num_steps():
    sampler = make_sampler("ddim", steps=50, betas=linear_betas())
    assert sampler.num_steps == 50
    assert sampler.model_timesteps[0] == 980 and sampler.model_timesteps[-1] == 0
    assert int(jax.jit(sampler.timestep)(jnp.int32(1))) == 960


# Errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(name="euler"), "unknown sampler 'euler'; choose one of ddpm, ddim, dpm\\+\\+"),
        (dict(steps=0), "steps must be an int between 1 and 1000"),
        (dict(steps=1001), "steps must be an int between 1 and 1000"),
        (dict(steps=2.5), "steps must be an int"),
        (dict(timestep_spacing="karras"), "unknown timestep_spacing 'karras'; choose one of dit, leading"),
        (dict(name="ddpm", eta=0.5), "eta=0.5 only applies to the ddim sampler"),
        (dict(eta=-1.0), "eta must be >= 0"),
        (dict(name="dpm++", learned_variance=True), "learned_variance only applies to the ddpm"),
        (dict(name="dpm++", clip_denoised=True), "clip_denoised is supported by ddpm and ddim only"),
        (dict(steps=999), "cannot keep exactly 999 of 1000 timesteps with an integer stride"),
        (dict(timestep_spacing="leading", steps_offset=101, steps=10), "outside \\[0, 1000\\)"),
    ],
)
def test_make_sampler_errors(kwargs, message):
    arguments = dict(name="ddim", steps=10, betas=linear_betas()) | kwargs
    with pytest.raises(ValueError, match=message):
        make_sampler(arguments.pop("name"), **arguments)


def test_make_sampler_rejects_bad_betas():
    with pytest.raises(ValueError, match="betas must lie strictly between 0 and 1"):
        make_sampler("ddpm", steps=10, betas=np.linspace(0.0, 0.02, 1000))


def test_step_errors():
    x = jnp.asarray(X_T)
    eps = jnp.asarray(toy_model(X_T, 500, learned=False))
    ddpm = make_sampler("ddpm", steps=10, betas=linear_betas())
    with pytest.raises(ValueError, match="needs a PRNG key, got None"):
        ddpm.step(ddpm.init(x), eps, jnp.int32(0), None)
    with pytest.raises(ValueError, match="expected the same leading dims and 3 \\(epsilon\\) or 6"):
        ddpm.step(ddpm.init(x), eps[..., :2], jnp.int32(0), step_key(0))
    learned = make_sampler("ddpm", steps=10, betas=linear_betas(), learned_variance=True)
    with pytest.raises(ValueError, match="learned_variance=True but model_output has as many channels"):
        learned.step(learned.init(x), eps, jnp.int32(0), step_key(0))
    ddim_eta = make_sampler("ddim", steps=10, betas=linear_betas(), eta=1.0)
    with pytest.raises(ValueError, match="ddim with eta > 0 is stochastic"):
        ddim_eta.step(ddim_eta.init(x), eps, jnp.int32(0), None)
