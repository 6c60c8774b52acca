"""Small building blocks: the DiT MLP, adaLN modulation, sinusoidal embeddings."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class Mlp(nnx.Module):
    """fc1 -> tanh-approximate GELU -> fc2 (timm's Mlp as DiT configures it)."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        self.fc1 = nnx.Linear(dim, hidden, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc2 = nnx.Linear(hidden, dim, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    @jax.named_scope("mlp")  # a region of dit_jax.profiling
    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters, computed in float32."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN: x (B, N, D), shift/scale (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """DiT's sinusoidal embedding: [cos(t f_i), sin(t f_i)], f_i = max_period^(-i/half), i < half.

    t (B,) int or float -> (B, dim) float32. (diffusers' DiT divides by half-1 instead of half:
    a small departure from the original that this project does not follow.)
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding (MAE/DiT): (grid_h * grid_w, dim), row-major tokens.

    The first half of the channels encodes the column, the second half the row, each as
    [sin(p w_i), cos(p w_i)] with w_i = 10000^(-i / (dim/4)).
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a hidden size divisible by 4, got {dim}")

    def one_axis(pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
        angles = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")
    return np.concatenate([one_axis(cols), one_axis(rows)], axis=1).astype(np.float32)
