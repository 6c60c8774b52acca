"""DiT's training objective (IDDPM's "hybrid" loss): epsilon-prediction MSE, plus, for a model
that learns its variance, the variational bound L_vlb that trains the variance channels alone.

    tables = DiffusionTables.from_betas(linear_betas(1000))
    loss, terms = diffusion_loss(model, tables, x0, t, cond, noise)   # terms: {"mse", "vb"}

The model mean and log variance are those a DDPM step samples from (`dit_jax.diffusion.samplers`
DDPM with "learned_range"); tests/test_losses.py checks them, and the KL between the true and the
model posterior, against diffusers' DDPMScheduler and torch.distributions.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class DiffusionTables:
    """Per-timestep constants of the training chain, float32 (computed in float64)."""

    sqrt_alphas_cumprod: jax.Array
    sqrt_one_minus_alphas_cumprod: jax.Array
    sqrt_recip_alphas_cumprod: jax.Array
    sqrt_recipm1_alphas_cumprod: jax.Array
    posterior_mean_coef_x0: jax.Array  # weight of x_0 in the mean of q(x_{t-1} | x_t, x_0)
    posterior_mean_coef_xt: jax.Array  # weight of x_t in that mean
    posterior_log_variance_clipped: jax.Array  # log variance of q(x_{t-1} | x_t, x_0); t=0 borrows t=1's
    log_betas: jax.Array

    @classmethod
    def from_betas(cls, betas: np.ndarray) -> DiffusionTables:
        betas = np.asarray(betas, np.float64)
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.concatenate([[1.0], ac[:-1]])
        posterior_variance = betas * (1.0 - ac_prev) / (1.0 - ac)
        # The variance at t=0 is 0; IDDPM clips its log to the t=1 value so the range stays finite.
        clipped = np.log(np.concatenate([posterior_variance[1:2], posterior_variance[1:]]))
        tables = dict(
            sqrt_alphas_cumprod=np.sqrt(ac),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
            posterior_mean_coef_x0=betas * np.sqrt(ac_prev) / (1.0 - ac),
            posterior_mean_coef_xt=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
            posterior_log_variance_clipped=clipped,
            log_betas=np.log(betas),
        )
        return cls(**{k: jnp.asarray(v, jnp.float32) for k, v in tables.items()})

    @property
    def num_timesteps(self) -> int:
        return self.log_betas.shape[0]


def _at(table: jax.Array, t: jax.Array) -> jax.Array:
    return table[t][:, None, None, None]  # (B, 1, 1, 1), broadcast over NHWC


def gaussian_kl(mean1: jax.Array, logvar1: jax.Array, mean2: jax.Array, logvar2: jax.Array) -> jax.Array:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + jnp.square(mean1 - mean2) * jnp.exp(-logvar2))


def _approx_standard_normal_cdf(x: jax.Array) -> jax.Array:
    # The tanh approximation IDDPM uses (close to Phi within ~1e-3, cheap and smooth).
    return 0.5 * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: jax.Array, mean: jax.Array, log_scale: jax.Array) -> jax.Array:
    """log P(x) per element for 8-bit data scaled to [-1, 1] under N(mean, e^(2 log_scale)).

    Each of the 256 levels owns a bin of width 2/255; the two end bins reach to -inf / +inf.
    """
    centered = x - mean
    inv_std = jnp.exp(-log_scale)
    cdf_upper = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_lower = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_upper = jnp.log(jnp.maximum(cdf_upper, 1e-12))
    log_one_minus_cdf_lower = jnp.log(jnp.maximum(1.0 - cdf_lower, 1e-12))
    log_bin = jnp.log(jnp.maximum(cdf_upper - cdf_lower, 1e-12))
    return jnp.where(x < -0.999, log_cdf_upper, jnp.where(x > 0.999, log_one_minus_cdf_lower, log_bin))


def _mean_per_image(a: jax.Array) -> jax.Array:
    return a.reshape(a.shape[0], -1).mean(axis=1)  # (B,)


def variational_bound_terms(
    tables: DiffusionTables, x0: jax.Array, xt: jax.Array, t: jax.Array, eps_pred: jax.Array, var_values: jax.Array
) -> jax.Array:
    """IDDPM's L_vlb for a learned-range variance, per image in bits: (B,).

    var_values in [-1, 1] interpolate the log variance between the posterior's (-1) and beta_t's (+1).
    The caller freezes eps_pred (stop_gradient) so this term only trains the variance, as DiT does.
    t > 0: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)); t == 0: -log p(x_0 | x_1), discretised.
    """
    min_log = _at(tables.posterior_log_variance_clipped, t)
    max_log = _at(tables.log_betas, t)
    frac = (var_values + 1.0) / 2.0
    model_log_var = frac * max_log + (1.0 - frac) * min_log
    pred_x0 = _at(tables.sqrt_recip_alphas_cumprod, t) * xt - _at(tables.sqrt_recipm1_alphas_cumprod, t) * eps_pred
    coef_x0, coef_xt = _at(tables.posterior_mean_coef_x0, t), _at(tables.posterior_mean_coef_xt, t)
    model_mean = coef_x0 * pred_x0 + coef_xt * xt
    true_mean = coef_x0 * x0 + coef_xt * xt
    kl = _mean_per_image(gaussian_kl(true_mean, min_log, model_mean, model_log_var)) / math.log(2.0)
    nll = -_mean_per_image(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / math.log(2.0)
    return jnp.where(t == 0, nll, kl)


def diffusion_loss(
    model: nnx.Module, tables: DiffusionTables, x0: jax.Array, t: jax.Array, cond: Any, noise: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DiT's training loss on one batch: eps MSE (+ the variance VLB when the model learns sigma).

    x0 (B, H, W, C) in [-1, 1], t (B,) int timesteps, cond: the model's conditioning (a DiT's
    labels (B,), null class included; a PixArt's {"text", "text_mask"}), noise (B, H, W, C).
    Returns (scalar loss, {"mse", "vb"}), all float32.
    """
    xt = _at(tables.sqrt_alphas_cumprod, t) * x0 + _at(tables.sqrt_one_minus_alphas_cumprod, t) * noise
    compute_dtype = model.x_embedder.proj.kernel[...].dtype
    out = model(xt.astype(compute_dtype), t, cond).astype(jnp.float32)  # (B, H, W, C or 2C)
    channels = x0.shape[-1]
    eps_pred = out[..., :channels]
    mse = _mean_per_image(jnp.square(noise - eps_pred)).mean()
    if out.shape[-1] == channels:
        return mse, {"mse": mse, "vb": jnp.zeros_like(mse)}
    vb = variational_bound_terms(tables, x0, xt, t, jax.lax.stop_gradient(eps_pred), out[..., channels:]).mean()
    return mse + vb, {"mse": mse, "vb": vb}
