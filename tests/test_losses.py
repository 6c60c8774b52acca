"""dit_jax.diffusion.losses: the variational bound against diffusers' DDPMScheduler ("learned_range")
and torch.distributions' Gaussian KL, its zero at the true posterior, and the discretised decoder
likelihood against exact normal bins."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers import scheduling_ddpm

from dit_jax.diffusion.losses import DiffusionTables, discretized_gaussian_log_likelihood, variational_bound_terms
from dit_jax.diffusion.schedule import linear_betas


@pytest.fixture(scope="module")
def tables():
    return DiffusionTables.from_betas(linear_betas(1000))


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2), np.float64))


def test_vlb_matches_diffusers_posterior_and_torch_kl(tables, monkeypatch):
    """For t > 0 the bound is KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) per element, averaged
    over the image, in bits. diffusers' DDPM step (noise zeroed) gives both means, its
    `_get_variance` both log variances, torch.distributions the KL."""
    monkeypatch.setattr(scheduling_ddpm, "randn_tensor", lambda shape, **kw: torch.zeros(shape, dtype=kw["dtype"]))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                              variance_type="learned_range", clip_sample=False)
    # diffusers keeps its chain in float32, where 1 - alphas_cumprod cancels to ~1e-4 relative
    # error at the first steps (1 - 0.9999): its formulas run on float64 tables here instead.
    scheduler.betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    rng = np.random.default_rng(0)
    shape = (5, 8, 8, 2)  # NHWC
    x0 = rng.uniform(-1, 1, shape).astype(np.float32)
    noise = rng.normal(size=shape).astype(np.float32)
    eps_pred = (noise + 0.3 * rng.normal(size=shape)).astype(np.float32)
    var_values = rng.uniform(-1, 1, shape).astype(np.float32)
    t = np.array([1, 2, 37, 500, 999])
    xt = scheduler.add_noise(_nchw(x0), _nchw(noise), torch.from_numpy(t)).numpy().transpose(0, 2, 3, 1).astype(np.float32)

    terms = jax.jit(lambda *arrays: variational_bound_terms(tables, *arrays))
    ours = np.asarray(terms(*(jnp.asarray(a) for a in (x0, xt, t, eps_pred, var_values))))

    for i, step in enumerate(t.tolist()):
        sample = _nchw(xt[i : i + 1])
        var = _nchw(var_values[i : i + 1])

        def mean_of(eps):
            return scheduler.step(torch.cat([_nchw(eps[i : i + 1]), var], dim=1), step, sample).prev_sample

        model = torch.distributions.Normal(mean_of(eps_pred), torch.exp(0.5 * scheduler._get_variance(step, var)))
        posterior_var = scheduler._get_variance(step, variance_type="fixed_small")
        true = torch.distributions.Normal(mean_of(noise), torch.sqrt(posterior_var))
        expected = float(torch.distributions.kl_divergence(true, model).mean()) / math.log(2.0)
        assert expected > 0
        assert abs(ours[i] - expected) <= 1e-4 * expected, (step, ours[i], expected)


def test_kl_vanishes_when_the_model_is_the_true_posterior(tables):
    rng = np.random.default_rng(0)
    x0 = jnp.asarray(rng.uniform(-1, 1, (4, 8, 8, 1)), jnp.float32)
    noise = jnp.asarray(rng.normal(size=x0.shape), jnp.float32)
    t = jnp.array([1, 10, 500, 999])
    xt = tables.sqrt_alphas_cumprod[t][:, None, None, None] * x0 + tables.sqrt_one_minus_alphas_cumprod[t][:, None, None, None] * noise
    terms = jax.jit(lambda eps, var: variational_bound_terms(tables, x0, xt, t, eps, var))
    exact = np.asarray(terms(noise, -jnp.ones_like(x0)))  # var value -1: the posterior's variance
    np.testing.assert_allclose(exact, 0.0, atol=1e-5)
    # +1 picks beta_t, far from the posterior variance only at small t (they meet for large t).
    assert np.asarray(terms(noise, jnp.ones_like(x0)))[0] > 0.1
    wrong_eps = np.asarray(terms(noise + 0.5, -jnp.ones_like(x0)))
    assert np.all(wrong_eps > exact + 1e-3)


def test_discretized_likelihood_matches_normal_bins():
    from scipy.stats import norm

    levels = np.array([0, 1, 77, 128, 254, 255])
    x = levels / 127.5 - 1.0
    mean = x + np.array([0.0, 0.01, -0.02, 0.005, 0.0, -0.03])
    log_scale = np.log(np.array([0.01, 0.02, 0.05, 0.004, 0.03, 0.02]))
    got = np.exp(np.asarray(discretized_gaussian_log_likelihood(jnp.asarray(x), jnp.asarray(mean), jnp.asarray(log_scale))))
    sd = np.exp(log_scale)
    upper = np.where(levels == 255, 1.0, norm.cdf((x + 1 / 255 - mean) / sd))
    lower = np.where(levels == 0, 0.0, norm.cdf((x - 1 / 255 - mean) / sd))
    # IDDPM's tanh approximation of the normal CDF is good to about 1e-3.
    np.testing.assert_allclose(got, upper - lower, atol=3e-3)
