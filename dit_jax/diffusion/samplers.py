"""Samplers as pure JAX step functions: DDPM (DiT's learned variance), DDIM, DPM-Solver++ 2M.

A sampler is a frozen, hashable dataclass built on the host once; it holds small per-step tables
(Python float tuples, so equal samplers hash equal and `jit` with the sampler as a static argument
never retraces). The sampling loop (a `lax.scan` over step indices) drives it like this:

    sampler = make_sampler("ddim", steps=50, betas=linear_betas())
    carry = sampler.init(x_T)                                # (B, H, W, C)
    for i in range(sampler.num_steps):                       # a lax.scan in the pipeline
        out = model(sampler.sample(carry), sampler.timestep(i))   # (B, H, W, C or 2C)
        carry = sampler.step(carry, out, i, key_i)
    x_0 = sampler.sample(carry)

Step i moves the sample from model timestep `model_timesteps[i]` to the next one (and from the
last one to the clean sample). The model always sees the ORIGINAL training timesteps (0..N-1),
while the update uses the alphas_cumprod of the chain actually walked (DiT's respacing).

Noise contract (tests rely on it): a stochastic step draws
`jax.random.normal(key, x.shape, jnp.float32)` from the key it is given, once per step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from dit_jax.diffusion.schedule import (
    DIFFUSERS_SPACINGS,
    alphas_cumprod_from_betas,
    diffusers_timesteps,
    space_timesteps,
)

SAMPLER_NAMES = ("ddpm", "ddim", "dpm++")
TIMESTEP_SPACINGS = ("dit",) + DIFFUSERS_SPACINGS
# diffusers clamps the posterior variance before taking its log; the last DDPM step has a
# posterior variance of exactly 0 and must not produce -inf (it is masked or negligible anyway).
_MIN_VARIANCE = 1e-20


class SamplerCarry(NamedTuple):
    """What a sampler carries from one step to the next (a pytree, stable across steps)."""

    x: jax.Array  # (B, H, W, C) the current sample x_t
    prev_denoised: jax.Array | None = None  # (B, H, W, C) previous x_0 estimate (multistep only)


def _row(table: tuple[float, ...], i: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """table[i] for a traced step index, as a scalar of the compute dtype."""
    return jnp.asarray(table, dtype=dtype)[i]


def _floats(values: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in np.asarray(values, dtype=np.float64))


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Base class: the timesteps the model is fed, and the carry bookkeeping shared by all."""

    model_timesteps: tuple[int, ...]  # original training timesteps, descending, one per step

    name = "sampler"

    @property
    def num_steps(self) -> int:
        """Number of network evaluations (steps) in a full sampling run."""
        return len(self.model_timesteps)

    def timestep(self, i: jax.Array | int) -> jax.Array:
        """The int32 timestep the model is fed at step `i` (works with a traced `i`)."""
        return jnp.asarray(self.model_timesteps, dtype=jnp.int32)[i]

    def init(self, x_T: jax.Array) -> SamplerCarry:
        """Carry for the start of sampling from pure noise `x_T` (B, H, W, C)."""
        return SamplerCarry(x=x_T)

    def sample(self, carry: SamplerCarry) -> jax.Array:
        """The current sample x_t (after the last step: the generated x_0)."""
        return carry.x

    def step(
        self, carry: SamplerCarry, model_output: jax.Array, i: jax.Array, key: jax.Array | None
    ) -> SamplerCarry:
        """Advance one step given the network output at `model_timesteps[i]`."""
        raise NotImplementedError

    # Shared helpers -------------------------------------------------------------------------

    @staticmethod
    def _split_output(model_output: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """(epsilon, learned-variance values or None) from a C- or 2C-channel output."""
        channels = x.shape[-1]
        if model_output.shape[:-1] != x.shape[:-1] or model_output.shape[-1] not in (
            channels,
            2 * channels,
        ):
            raise ValueError(
                f"model_output shape {model_output.shape} does not fit the sample {x.shape}: "
                f"expected the same leading dims and {channels} (epsilon) or {2 * channels} "
                "(epsilon + learned variance) channels."
            )
        if model_output.shape[-1] == channels:
            return model_output, None
        return model_output[..., :channels], model_output[..., channels:]

    @staticmethod
    def _compute_dtype(x: jax.Array) -> jnp.dtype:
        # Low-precision samples (bf16) are updated in float32, like diffusers' upcast.
        return jnp.promote_types(x.dtype, jnp.float32)

    @staticmethod
    def _noise(key: jax.Array | None, x: jax.Array, who: str) -> jax.Array:
        if key is None:
            raise ValueError(f"{who} is stochastic: step() needs a PRNG key, got None.")
        return jax.random.normal(key, x.shape, jnp.float32)


@dataclasses.dataclass(frozen=True)
class DDPMSampler(Sampler):
    """Ancestral DDPM on the (respaced) chain; DiT's learned-range variance when given 2C channels.

    Per step, from alpha_bar a (current) and a_prev (next; 1 after the last step):
    beta = 1 - a / a_prev, x_0 = (x - sqrt(1 - a) eps) / sqrt(a),
    mean = sqrt(a_prev) beta / (1 - a) x_0 + sqrt(1 - beta) (1 - a_prev) / (1 - a) x,
    log var = frac log(beta) + (1 - frac) log(posterior var), frac = (v + 1) / 2 ("learned_range"),
    or log(posterior var) ("fixed_small"). Noise is added where the model timestep is > 0.
    """

    sqrt_recip_alphas_cumprod: tuple[float, ...] = ()  # 1 / sqrt(a)
    sqrt_recipm1_alphas_cumprod: tuple[float, ...] = ()  # sqrt(1 / a - 1)
    posterior_mean_coef_x0: tuple[float, ...] = ()
    posterior_mean_coef_xt: tuple[float, ...] = ()
    log_posterior_variance: tuple[float, ...] = ()  # "fixed_small", lower end of learned_range
    log_betas: tuple[float, ...] = ()  # upper end of learned_range
    noise_mask: tuple[float, ...] = ()  # 0 where the model timestep is 0 (no noise into x_0)
    learned_variance: bool | None = None  # None: learned iff the output has 2C channels
    clip_denoised: bool = False

    name = "ddpm"

    def step(
        self, carry: SamplerCarry, model_output: jax.Array, i: jax.Array, key: jax.Array | None
    ) -> SamplerCarry:
        """x_t -> x_{t_next} ~ N(posterior mean, variance); `key` is required."""
        x = carry.x
        eps, variance_values = self._split_output(model_output, x)
        if self.learned_variance and variance_values is None:
            raise ValueError(
                "learned_variance=True but model_output has as many channels as the sample; "
                "a learned-sigma model returns 2C channels (epsilon + variance values)."
            )
        use_learned = variance_values is not None and self.learned_variance is not False
        dtype = self._compute_dtype(x)
        xf, eps = x.astype(dtype), eps.astype(dtype)

        x0 = _row(self.sqrt_recip_alphas_cumprod, i, dtype) * xf - _row(
            self.sqrt_recipm1_alphas_cumprod, i, dtype
        ) * eps
        if self.clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
        mean = _row(self.posterior_mean_coef_x0, i, dtype) * x0 + _row(
            self.posterior_mean_coef_xt, i, dtype
        ) * xf

        min_log = _row(self.log_posterior_variance, i, dtype)
        if use_learned:
            # DiT / IDDPM "learned_range": the network picks a point between the two bounds in log space.
            frac = (variance_values.astype(dtype) + 1.0) / 2.0
            log_variance = frac * _row(self.log_betas, i, dtype) + (1.0 - frac) * min_log
        else:
            log_variance = min_log
        noise = self._noise(key, x, "the ddpm sampler").astype(dtype)
        std = _row(self.noise_mask, i, dtype) * jnp.exp(0.5 * log_variance)
        return carry._replace(x=(mean + std * noise).astype(x.dtype))


@dataclasses.dataclass(frozen=True)
class DDIMSampler(Sampler):
    """DDIM (eta = 0: deterministic; eta > 0: sigma_t = eta * the DDPM posterior std).

    x_prev = sqrt(a_prev) x_0 + sqrt(1 - a_prev - sigma^2) eps + sigma z.
    """

    sqrt_recip_alphas_cumprod: tuple[float, ...] = ()
    sqrt_recipm1_alphas_cumprod: tuple[float, ...] = ()
    sqrt_alphas_cumprod: tuple[float, ...] = ()  # sqrt(a), to re-derive eps after clipping
    sqrt_one_minus_alphas_cumprod: tuple[float, ...] = ()
    sqrt_alphas_cumprod_prev: tuple[float, ...] = ()
    direction_coef: tuple[float, ...] = ()  # sqrt(1 - a_prev - sigma^2)
    sigmas: tuple[float, ...] = ()  # eta-scaled std of the injected noise
    eta: float = 0.0
    clip_denoised: bool = False

    name = "ddim"

    def step(
        self, carry: SamplerCarry, model_output: jax.Array, i: jax.Array, key: jax.Array | None
    ) -> SamplerCarry:
        """x_t -> x_{t_prev}; `key` is required only when eta > 0."""
        x = carry.x
        eps, _ = self._split_output(model_output, x)
        dtype = self._compute_dtype(x)
        xf, eps = x.astype(dtype), eps.astype(dtype)

        x0 = _row(self.sqrt_recip_alphas_cumprod, i, dtype) * xf - _row(
            self.sqrt_recipm1_alphas_cumprod, i, dtype
        ) * eps
        if self.clip_denoised:
            x0 = jnp.clip(x0, -1.0, 1.0)
            # The direction term must point from the clipped x_0 back to x_t (IDDPM, and diffusers
            # with use_clipped_model_output=True).
            eps = (xf - _row(self.sqrt_alphas_cumprod, i, dtype) * x0) / _row(
                self.sqrt_one_minus_alphas_cumprod, i, dtype
            )
        x_prev = _row(self.sqrt_alphas_cumprod_prev, i, dtype) * x0 + _row(
            self.direction_coef, i, dtype
        ) * eps
        if self.eta > 0:
            noise = self._noise(key, x, "ddim with eta > 0").astype(dtype)
            x_prev = x_prev + _row(self.sigmas, i, dtype) * noise
        return carry._replace(x=x_prev.astype(x.dtype))


@dataclasses.dataclass(frozen=True)
class DPMSolverPP2MSampler(Sampler):
    """DPM-Solver++ 2M (data prediction, midpoint), first order on the first and last steps.

    With lambda = log(alpha / sigma), h = lambda_next - lambda_cur, r = h_prev / h:
    x_next = (sigma_next / sigma) x + alpha_next (1 - e^{-h}) (D0 + (D0 - D_prev) / (2 r)),
    D = x_0 estimates. The last step goes to sigma = 0, where it returns x_0 (diffusers'
    final_sigmas_type="zero", which forces that step to first order).
    """

    sqrt_recip_alphas_cumprod: tuple[float, ...] = ()
    sqrt_recipm1_alphas_cumprod: tuple[float, ...] = ()
    sample_coef: tuple[float, ...] = ()  # sigma_next / sigma
    denoised_coef: tuple[float, ...] = ()  # alpha_next (1 - e^{-h})
    correction_coef: tuple[float, ...] = ()  # denoised_coef / (2 r); 0 on first-order steps

    name = "dpm++"

    def init(self, x_T: jax.Array) -> SamplerCarry:
        """Carry with an (unused at step 0) zero history so the scan carry keeps one structure."""
        return SamplerCarry(x=x_T, prev_denoised=jnp.zeros(x_T.shape, self._compute_dtype(x_T)))

    def step(
        self, carry: SamplerCarry, model_output: jax.Array, i: jax.Array, key: jax.Array | None
    ) -> SamplerCarry:
        """x_t -> x_{t_next}; deterministic, `key` is ignored."""
        del key
        x = carry.x
        eps, _ = self._split_output(model_output, x)
        dtype = self._compute_dtype(x)
        xf, eps = x.astype(dtype), eps.astype(dtype)

        denoised = _row(self.sqrt_recip_alphas_cumprod, i, dtype) * xf - _row(
            self.sqrt_recipm1_alphas_cumprod, i, dtype
        ) * eps
        prev_denoised = carry.prev_denoised.astype(dtype)
        x_next = (
            _row(self.sample_coef, i, dtype) * xf
            + _row(self.denoised_coef, i, dtype) * denoised
            + _row(self.correction_coef, i, dtype) * (denoised - prev_denoised)
        )
        return SamplerCarry(x=x_next.astype(x.dtype), prev_denoised=denoised)


# Factory ----------------------------------------------------------------------------------------


def _kept_timesteps(
    name: str, steps: int, num_train: int, spacing: str, steps_offset: int
) -> np.ndarray:
    """Model timesteps, descending."""
    if spacing == "dit":
        # DiT samples DDPM on space_timesteps(N, "250") and DDIM on IDDPM's "ddim<steps>" grid.
        section = str(steps) if name == "ddpm" else f"ddim{steps}"
        return space_timesteps(num_train, section)[::-1].copy()
    return diffusers_timesteps(num_train, steps, spacing, steps_offset, sampler=name)


def _ddpm_tables(alphas_cumprod: np.ndarray, timesteps: np.ndarray) -> dict[str, tuple[float, ...]]:
    current = alphas_cumprod[timesteps]
    following = np.concatenate([current[1:], [1.0]])  # alpha_bar after each step
    betas = 1.0 - current / following
    posterior_variance = (1.0 - following) / (1.0 - current) * betas
    return dict(
        sqrt_recip_alphas_cumprod=_floats(1.0 / np.sqrt(current)),
        sqrt_recipm1_alphas_cumprod=_floats(np.sqrt(1.0 / current - 1.0)),
        posterior_mean_coef_x0=_floats(np.sqrt(following) * betas / (1.0 - current)),
        posterior_mean_coef_xt=_floats(np.sqrt(1.0 - betas) * (1.0 - following) / (1.0 - current)),
        log_posterior_variance=_floats(np.log(np.maximum(posterior_variance, _MIN_VARIANCE))),
        log_betas=_floats(np.log(betas)),
        noise_mask=_floats((timesteps > 0).astype(np.float64)),
    )


def _ddim_tables(
    alphas_cumprod: np.ndarray, timesteps: np.ndarray, previous: np.ndarray, eta: float
) -> dict[str, tuple[float, ...]]:
    current = alphas_cumprod[timesteps]
    following = np.where(previous >= 0, alphas_cumprod[np.maximum(previous, 0)], 1.0)
    sigmas = eta * np.sqrt((1.0 - following) / (1.0 - current) * (1.0 - current / following))
    return dict(
        sqrt_recip_alphas_cumprod=_floats(1.0 / np.sqrt(current)),
        sqrt_recipm1_alphas_cumprod=_floats(np.sqrt(1.0 / current - 1.0)),
        sqrt_alphas_cumprod=_floats(np.sqrt(current)),
        sqrt_one_minus_alphas_cumprod=_floats(np.sqrt(1.0 - current)),
        sqrt_alphas_cumprod_prev=_floats(np.sqrt(following)),
        direction_coef=_floats(np.sqrt(np.maximum(1.0 - following - sigmas**2, 0.0))),
        sigmas=_floats(sigmas),
    )


def _dpm_tables(alphas_cumprod: np.ndarray, timesteps: np.ndarray) -> dict[str, tuple[float, ...]]:
    current = alphas_cumprod[timesteps]
    alphas, sigmas = np.sqrt(current), np.sqrt(1.0 - current)
    lambdas = np.log(alphas) - np.log(sigmas)
    steps = len(timesteps)
    sample_coef = np.empty(steps)
    denoised_coef = np.empty(steps)
    correction_coef = np.zeros(steps)
    for k in range(steps):
        if k == steps - 1:
            # sigma_next = 0, lambda_next = +inf: the update collapses to x_next = x_0 estimate.
            sample_coef[k], denoised_coef[k] = 0.0, 1.0
            continue
        h = lambdas[k + 1] - lambdas[k]
        sample_coef[k] = sigmas[k + 1] / sigmas[k]
        denoised_coef[k] = -alphas[k + 1] * math.expm1(-h)
        if k > 0:  # second order needs one earlier x_0 estimate
            ratio = (lambdas[k] - lambdas[k - 1]) / h
            correction_coef[k] = 0.5 * denoised_coef[k] / ratio
    return dict(
        sqrt_recip_alphas_cumprod=_floats(1.0 / alphas),
        sqrt_recipm1_alphas_cumprod=_floats(sigmas / alphas),
        sample_coef=_floats(sample_coef),
        denoised_coef=_floats(denoised_coef),
        correction_coef=_floats(correction_coef),
    )


def make_sampler(
    name: str,
    *,
    steps: int,
    betas: np.ndarray,
    timestep_spacing: str = "dit",
    eta: float = 0.0,
    learned_variance: bool | None = None,
    clip_denoised: bool = False,
    steps_offset: int = 0,
) -> Sampler:
    """Build a sampler for `steps` network evaluations on the training schedule `betas`.

    Args:
        name: "ddpm", "ddim" or "dpm++" (DPM-Solver++ 2M).
        steps: number of sampling steps (network evaluations), >= 1.
        betas: (N,) training betas (e.g. `linear_betas()`).
        timestep_spacing: "dit" (IDDPM/DiT respacing: `space_timesteps(N, str(steps))` for ddpm,
            `"ddim{steps}"` for ddim and dpm++), or diffusers' "leading", "trailing", "linspace"
            (the grid the matching diffusers scheduler's `set_timesteps` builds).
        eta: DDIM stochasticity (0 = deterministic); ddim only.
        learned_variance: ddpm only. None: use DiT's learned-range variance whenever the model
            output has 2C channels, else the fixed posterior variance; True: require 2C channels;
            False: always the fixed posterior variance ("fixed_small").
        clip_denoised: clip the x_0 estimate to [-1, 1] (ddpm, ddim; DiT samples latents with False).
        steps_offset: added to the "leading" grid (diffusers' `steps_offset`, 1 for SD-style configs).

    Returns:
        A frozen, hashable `Sampler` (DDPMSampler, DDIMSampler or DPMSolverPP2MSampler).

    Note: for ddim with a diffusers spacing the update targets t - N // steps (what diffusers'
    DDIMScheduler does) rather than the next grid point; for "dit" and "leading" these coincide.
    """
    if name not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLER_NAMES)}.")
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(
            f"unknown timestep_spacing {timestep_spacing!r}; choose one of "
            f"{', '.join(TIMESTEP_SPACINGS)}."
        )
    alphas_cumprod = alphas_cumprod_from_betas(betas)
    num_train = alphas_cumprod.size
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= num_train:
        raise ValueError(
            f"steps must be an int between 1 and {num_train} (the training timesteps), got {steps!r}."
        )
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}.")
    if eta != 0 and name != "ddim":
        raise ValueError(f"eta={eta} only applies to the ddim sampler, not {name!r}; leave it at 0.")
    if learned_variance is not None and name != "ddpm":
        raise ValueError(
            f"learned_variance only applies to the ddpm sampler; {name!r} ignores the variance "
            "channels, leave it as None."
        )
    if clip_denoised and name == "dpm++":
        raise ValueError("clip_denoised is supported by ddpm and ddim only, not 'dpm++'.")

    timesteps = _kept_timesteps(name, int(steps), num_train, timestep_spacing, steps_offset)
    if timesteps.size != steps or np.any(np.diff(timesteps) >= 0):
        raise ValueError(
            f"timestep_spacing {timestep_spacing!r} with {steps} steps gives {timesteps.size} "
            "timesteps that are not strictly decreasing; use fewer steps or another spacing."
        )
    if timesteps[0] >= num_train or timesteps[-1] < 0:
        raise ValueError(
            f"timesteps {timesteps[0]}..{timesteps[-1]} fall outside [0, {num_train}); "
            f"lower steps_offset ({steps_offset})."
        )
    model_timesteps = tuple(int(t) for t in timesteps)

    if name == "ddpm":
        return DDPMSampler(
            model_timesteps=model_timesteps,
            learned_variance=learned_variance,
            clip_denoised=bool(clip_denoised),
            **_ddpm_tables(alphas_cumprod, timesteps),
        )
    if name == "ddim":
        if timestep_spacing == "dit":
            previous = np.concatenate([timesteps[1:], [-1]])
        else:
            previous = timesteps - num_train // steps
        return DDIMSampler(
            model_timesteps=model_timesteps,
            eta=float(eta),
            clip_denoised=bool(clip_denoised),
            **_ddim_tables(alphas_cumprod, timesteps, previous, float(eta)),
        )
    return DPMSolverPP2MSampler(model_timesteps=model_timesteps, **_dpm_tables(alphas_cumprod, timesteps))
