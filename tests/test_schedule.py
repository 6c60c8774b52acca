"""dit_jax.diffusion.schedule: betas, IDDPM respacing and diffusers' timestep grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dit_jax.diffusion.schedule import (
    alphas_cumprod_from_betas,
    diffusers_timesteps,
    linear_betas,
    respace_betas,
    scaled_linear_betas,
    space_timesteps,
)


def test_linear_betas_match_diffusers_and_dit_endpoints():
    betas = linear_betas()
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert betas[0] == 1e-4 and betas[-1] == 0.02
    np.testing.assert_allclose(betas, DDPMScheduler(beta_schedule="linear").betas.numpy(), rtol=1e-6)


def test_scaled_linear_betas_match_diffusers():
    betas = scaled_linear_betas()
    reference = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).betas
    np.testing.assert_allclose(betas, reference.numpy(), rtol=1e-6)
    assert np.isclose(betas[0], 0.00085) and np.isclose(betas[-1], 0.012)
    assert np.all(np.diff(np.sqrt(betas)) > 0)  # linear in sqrt space, so strictly increasing


def test_alphas_cumprod_matches_diffusers():
    np.testing.assert_allclose(
        alphas_cumprod_from_betas(linear_betas()), DDPMScheduler().alphas_cumprod.numpy(), rtol=1e-6
    )


@pytest.mark.parametrize("betas", [np.zeros(4), np.full(4, 1.0), np.ones((2, 2)) * 0.1, np.array([])])
def test_alphas_cumprod_rejects_bad_betas(betas):
    with pytest.raises(ValueError, match="betas must"):
        alphas_cumprod_from_betas(betas)


# space_timesteps --------------------------------------------------------------------------------


def test_space_timesteps_ddim_is_one_integer_stride():
    np.testing.assert_array_equal(space_timesteps(1000, "ddim50"), np.arange(0, 1000, 20))
    # 7 steps need stride 143 (ceil(1000 / 143) == 7), the smallest that gives exactly 7.
    np.testing.assert_array_equal(space_timesteps(1000, "ddim7"), np.arange(0, 1000, 143))


def test_space_timesteps_dit_250():
    kept = space_timesteps(1000, "250")
    assert kept.dtype == np.int64 and kept.shape == (250,)
    assert kept[0] == 0 and kept[-1] == 999
    # Evenly spread by a float stride of 999 / 249, each pick rounded to the nearest timestep.
    ideal = np.arange(250) * (999 / 249)
    assert np.max(np.abs(kept - ideal)) <= 0.5 + 1e-9
    assert set(np.diff(kept).tolist()) <= {4, 5}


def test_space_timesteps_sections():
    # IDDPM's own example: 300 steps cut into three sections of 100 strided to 10, 15, 20 steps.
    kept = space_timesteps(300, "10,15,20")
    assert kept.size == 45
    for start, count in [(0, 10), (100, 15), (200, 20)]:
        section = kept[(kept >= start) & (kept < start + 100)]
        assert section.size == count and section[0] == start and section[-1] == start + 99
    np.testing.assert_array_equal(space_timesteps(300, [10, 15, 20]), kept)
    # The remainder goes to the first sections: 10 = 4 + 3 + 3.
    np.testing.assert_array_equal(space_timesteps(10, [2, 2, 2]), [0, 3, 4, 6, 7, 9])


@settings(max_examples=60, deadline=None)
@given(
    num_timesteps=st.integers(1, 400),
    counts=st.lists(st.integers(1, 40), min_size=1, max_size=4),
)
@example(num_timesteps=143, counts=[1, 1, 36, 1])  # a remainder step makes section 2 hold 36
@example(num_timesteps=143, counts=[1, 1, 1, 36])  # the last section holds 35
def test_space_timesteps_properties(num_timesteps, counts):
    # Each section holds num_timesteps // len(counts) steps, the first (num_timesteps % len(counts))
    # one more (the remainder goes to the first sections, as in IDDPM).
    size, extra = divmod(num_timesteps, len(counts))
    if any(c > size + (i < extra) for i, c in enumerate(counts)):
        with pytest.raises(ValueError):
            space_timesteps(num_timesteps, counts)
        return
    kept = space_timesteps(num_timesteps, counts)
    assert kept.size == sum(counts)  # sections never overlap, picks never repeat
    assert np.all(np.diff(kept) > 0) and kept[0] == 0 and kept[-1] < num_timesteps


@pytest.mark.parametrize(
    "spec,message",
    [
        ("ddim999", "cannot keep exactly 999 of 1000 timesteps with an integer stride"),
        ("ddim37", "the nearest step counts that can are 36 and 38"),
        ("ddimx", "expected 'ddim<N>' with an integer N"),
        ("1001", "section 0 of '1001' holds 1000 timesteps but asks for 1001"),
        ("abc", "expected '250', '10,15,20', 'ddim50' or a list of ints"),
        ("0", "every section needs at least 1 step"),
    ],
)
def test_space_timesteps_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        space_timesteps(1000, spec)


# respace_betas ----------------------------------------------------------------------------------


def test_respace_betas_keeps_alphas_cumprod_and_maps_timesteps():
    betas = linear_betas()
    kept = space_timesteps(1000, "250")
    new_betas, timestep_map = respace_betas(betas, kept[::-1])  # order does not matter
    np.testing.assert_array_equal(timestep_map, kept)
    alphas_cumprod = alphas_cumprod_from_betas(betas)
    np.testing.assert_allclose(np.cumprod(1.0 - new_betas), alphas_cumprod[kept], rtol=1e-12)
    assert new_betas[0] == pytest.approx(betas[0], rel=1e-12)  # timestep 0 kept: beta unchanged
    assert np.all(new_betas[1:] > betas[kept[1:]])  # later steps each cover several original ones


def test_respace_betas_equal_diffusers_prev_timestep_betas():
    """diffusers steps custom timesteps with 1 - alpha_bar[t] / alpha_bar[prev t] from the ORIGINAL
    schedule: exactly IDDPM's respaced betas, so both walk the same chain."""
    kept = space_timesteps(1000, "25")
    new_betas, timestep_map = respace_betas(linear_betas(), kept)
    scheduler = DDPMScheduler()
    # Give diffusers the float64 schedule so the comparison is of the math, not float32 rounding.
    scheduler.alphas_cumprod = torch.from_numpy(alphas_cumprod_from_betas(linear_betas()))
    scheduler.set_timesteps(timesteps=timestep_map[::-1].tolist())
    for respaced_index, t in enumerate(timestep_map):
        # "fixed_large" is diffusers' current_beta_t = 1 - alpha_bar[t] / alpha_bar[prev t].
        diffusers_beta = float(scheduler._get_variance(int(t), variance_type="fixed_large"))
        assert diffusers_beta == pytest.approx(new_betas[respaced_index], rel=1e-12)


@pytest.mark.parametrize(
    "kept,message",
    [([], "kept_timesteps is empty"), ([3, 3], "has duplicates"), ([0, 1000], "must lie in \\[0, 1000\\)")],
)
def test_respace_betas_errors(kept, message):
    with pytest.raises(ValueError, match=message):
        respace_betas(linear_betas(), kept)


# diffusers_timesteps ----------------------------------------------------------------------------

_SCHEDULERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler}


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 3, 7, 20, 50, 999])
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_diffusers_timesteps_match_set_timesteps(sampler, spacing, steps, steps_offset):
    scheduler = _SCHEDULERS[sampler](timestep_spacing=spacing, steps_offset=steps_offset)
    scheduler.set_timesteps(steps)
    ours = diffusers_timesteps(1000, steps, spacing, steps_offset, sampler=sampler)
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours, scheduler.timesteps.numpy())


@pytest.mark.parametrize(
    "args,kwargs,message",
    [
        ((1000, 10, "karras"), {}, "unknown timestep spacing 'karras'; choose one of leading, trailing"),
        ((1000, 0), {}, "steps must be an int in \\[1, 1000\\]"),
        ((1000, 1001), {}, "steps must be an int in \\[1, 1000\\]"),
        ((1000, 10), {"sampler": "euler"}, "unknown sampler 'euler'; choose one of ddpm, ddim, dpm\\+\\+"),
        ((0, 10), {}, "num_train_timesteps must be a positive int"),
    ],
)
def test_diffusers_timesteps_errors(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        diffusers_timesteps(*args, **kwargs)
