"""The T5 text encoder (T5 v1.1, as PixArt-alpha/Sigma use it: the encoder of google/t5-v1_1-xxl), in Flax NNX.

Computes what transformers' `T5EncoderModel(...).last_hidden_state` computes: token embedding
(no scaling), `num_layers` pre-norm blocks (self-attention with a learned relative position bias
and no 1/sqrt(d) scaling, then a gated-GELU feed-forward), a final RMS norm. Inference only: no
dropout.

    encoder = T5Encoder(T5_V1_1_XXL, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    hidden = encoder(input_ids, attention_mask)   # (B, L) int ids, (B, L) 0/1 -> (B, L, 4096)

Parameter tree (`nnx.to_pure_dict(nnx.state(encoder))`), with the transformers key each comes from
(kernels are the transposed `weight`s, (in, out); A = encoder.block.{i}.layer.0, F = encoder.block.{i}.layer.1):

    shared/embedding                      (vocab, d_model)         shared.weight
    relative_attention_bias/embedding     (buckets, heads)         A.SelfAttention.relative_attention_bias.weight, i = 0
    blocks/{i}/attention_norm/scale       (d_model,)               A.layer_norm.weight
    blocks/{i}/attention/{q,k,v}/kernel   (d_model, heads * d_kv)  A.SelfAttention.{q,k,v}.weight
    blocks/{i}/attention/o/kernel         (heads * d_kv, d_model)  A.SelfAttention.o.weight
    blocks/{i}/ff_norm/scale              (d_model,)               F.layer_norm.weight
    blocks/{i}/ff/{wi_0,wi_1}/kernel      (d_model, d_ff)          F.DenseReluDense.{wi_0,wi_1}.weight
    blocks/{i}/ff/wo/kernel               (d_ff, d_model)          F.DenseReluDense.wo.weight
    final_norm/scale                      (d_model,)               encoder.final_layer_norm.weight

(a non-gated feed-forward, original T5's "relu", has `ff/wi` instead of `ff/wi_0` and `ff/wi_1`).
transformers keeps the relative position bias in block 0 and shares it with every block; here it
sits beside the blocks, so that all blocks have the same parameters (stackable for a scan).

Precision: parameters in the dtype given (float32 or bfloat16) and matmuls in it; norms, the
attention softmax and the residual stream in float32. The float32 residual stream follows what
transformers does in half precision: T5 keeps its feed-forward output projections (`wo`) in float32
(`_keep_in_fp32_modules`), which makes every residual sum from the first feed-forward on float32.
transformers' float16 overflow clamps are not needed: bfloat16 has float32's range.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.models.config import ModelConfig

# Activations the feed-forward can use, by transformers' names (`dense_act_fn`).
_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),  # tanh approximation, T5 v1.1's
    "silu": jax.nn.silu,
}

# Fields of a transformers config.json that set the encoder, with transformers' defaults where a
# saved config may leave them out (its T5Config defaults: feed_forward_proj "relu" included).
_HF_REQUIRED = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
_HF_DEFAULTS = {
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "relu",
}


@dataclasses.dataclass(frozen=True)
class T5Config(ModelConfig):
    family_name = "T5"

    """The encoder's hyper-parameters (transformers' T5Config names). Defaults: T5 v1.1 XXL."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64  # per-head width; heads * d_kv need not equal d_model
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"  # T5 v1.1; original T5: "relu"

    @property
    def inner_dim(self) -> int:
        """Width of the concatenated attention heads."""
        return self.num_heads * self.d_kv

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """transformers' `dense_act_fn`: "gated-gelu" means the tanh approximation, "gelu_new"."""
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.removeprefix("gated-")


    @classmethod
    def from_hf_config(cls, d: dict) -> T5Config:
        """The encoder's config from a transformers T5 config.json dict (decoder fields ignored)."""
        model_type = d.get("model_type", "t5")
        if model_type not in ("t5", "mt5"):
            raise ValueError(
                f"model_type {model_type!r} is not supported: only T5 encoders (model_type 't5' or 'mt5')"
                + (" (UMT5 has a position bias in every block)" if model_type == "umt5" else "")
            )
        missing = [k for k in _HF_REQUIRED if k not in d]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}: not a T5 config")
        cfg = cls(**{k: d[k] for k in _HF_REQUIRED}, **{k: d.get(k, v) for k, v in _HF_DEFAULTS.items()})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        ffp = self.feed_forward_proj
        if self.activation not in _ACTIVATIONS or ffp.count("-") > 1 or ("-" in ffp and not self.is_gated):
            raise ValueError(
                f"feed_forward_proj {ffp!r} is not supported; use 'gated-gelu' (T5 v1.1), 'relu' (T5), "
                f"or [gated-]{{{', '.join(a for a in _ACTIVATIONS if a != 'gelu_new')}}}"
            )
        if self.relative_attention_num_buckets < 4 or self.relative_attention_num_buckets % 2:
            raise ValueError(
                f"relative_attention_num_buckets must be even and >= 4, got {self.relative_attention_num_buckets}"
            )
        sizes = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
        bad = [f"{n}={getattr(self, n)}" for n in sizes if getattr(self, n) < 1]
        if bad:
            raise ValueError(f"T5 sizes must be positive: {', '.join(bad)}")


# google/t5-v1_1-xxl's encoder (PixArt-alpha and PixArt-Sigma): 4,762,310,656 parameters.
T5_V1_1_XXL = T5Config(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
    feed_forward_proj="gated-gelu",
)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 bucket of every (query, key) pair: (length, length) int32, in [0, num_buckets).

    Half of the buckets are for keys after the query, half for keys before (or at) it; in each
    half, distances below a quarter of num_buckets get a bucket each, longer ones share
    logarithmically wider buckets up to max_distance (further ones all fall in the last).
    Computed with float32 arithmetic, as transformers does, so that the truncation at the bucket
    edges lands on the same side.
    """
    positions = np.arange(length)
    relative = positions[None, :] - positions[:, None]  # key - query
    half = num_buckets // 2
    exact = half // 2
    distance = np.abs(relative)
    with np.errstate(divide="ignore"):  # log(0) on the exact side of the `where`
        log_ratio = np.log(distance.astype(np.float32) / np.float32(exact))
    scaled = log_ratio / np.float32(math.log(max_distance / exact)) * np.float32(half - exact)
    large = exact + np.where(distance < exact, 0, scaled).astype(np.int64)
    large = np.minimum(large, half - 1)
    buckets = (relative > 0) * half + np.where(distance < exact, distance, large)
    return buckets.astype(np.int32)


class RMSNorm(nnx.Module):
    """T5's layer norm: x / rms(x) * scale, no mean subtraction and no bias; statistics in float32."""

    def __init__(self, dim: int, eps: float, *, dtype):
        self.scale = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...]
        return scale * normed.astype(scale.dtype)  # in the parameters' dtype


def _linear(din: int, dout: int, rngs: nnx.Rngs, dtype) -> nnx.Linear:
    """A bias-free projection that sums in float32 and returns float32 (the caller rounds to the
    parameters' dtype where it wants). Asking for float32 sums also keeps XLA's CPU backend from
    converting each bfloat16 weight matrix to float32 before multiplying, which for T5-XXL held
    12 GiB of converted weights at once."""
    return nnx.Linear(
        din, dout, use_bias=False, rngs=rngs, dtype=dtype, param_dtype=dtype, preferred_element_type=jnp.float32
    )


class T5Attention(nnx.Module):
    """Multi-head self-attention without query scaling (T5 folds it into the initialisation)."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, dtype):
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.q = _linear(cfg.d_model, cfg.inner_dim, rngs, dtype)
        self.k = _linear(cfg.d_model, cfg.inner_dim, rngs, dtype)
        self.v = _linear(cfg.d_model, cfg.inner_dim, rngs, dtype)
        self.o = _linear(cfg.inner_dim, cfg.d_model, rngs, dtype)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        """x (B, L, D), bias (B or 1, heads, L, L) float32 (position bias + padding mask) -> (B, L, D) float32."""
        b, length, _ = x.shape
        heads = (b, length, self.num_heads, self.d_kv)
        q, k, v = (proj(x).astype(x.dtype).reshape(heads) for proj in (self.q, self.k, self.v))  # (B, L, h, d_kv)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias  # (B, h, L, L)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)  # (B, L, h, d_kv)
        return self.o(out.reshape(b, length, self.num_heads * self.d_kv))


class T5FeedForward(nnx.Module):
    """Gated: wo(act(wi_0 x) * wi_1 x) (T5 v1.1); plain: wo(act(wi x)) (original T5)."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, dtype):
        self.activation, self.is_gated = cfg.activation, cfg.is_gated
        if cfg.is_gated:
            self.wi_0 = _linear(cfg.d_model, cfg.d_ff, rngs, dtype)
            self.wi_1 = _linear(cfg.d_model, cfg.d_ff, rngs, dtype)
        else:
            self.wi = _linear(cfg.d_model, cfg.d_ff, rngs, dtype)
        self.wo = _linear(cfg.d_ff, cfg.d_model, rngs, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x (B, L, D) -> (B, L, D) float32."""
        act = _ACTIVATIONS[self.activation]
        if self.is_gated:
            hidden = act(self.wi_0(x).astype(x.dtype)) * self.wi_1(x).astype(x.dtype)  # (B, L, d_ff)
        else:
            hidden = act(self.wi(x).astype(x.dtype))
        return self.wo(hidden)


class T5Block(nnx.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + ff(norm(x))."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, dtype):
        self.attention_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype)
        self.attention = T5Attention(cfg, rngs=rngs, dtype=dtype)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon, dtype=dtype)
        self.ff = T5FeedForward(cfg, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        """x (B, L, D) float32 residual stream, bias (B or 1, heads, L, L) -> (B, L, D) float32."""
        x = x + self.attention(self.attention_norm(x), bias)
        return x + self.ff(self.ff_norm(x))


class T5Encoder(nnx.Module):
    """T5's encoder stack: transformers' `T5EncoderModel` up to `last_hidden_state`."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs, dtype=jnp.float32):
        config.validate()
        self.config = config
        self.shared = nnx.Embed(config.vocab_size, config.d_model, rngs=rngs, dtype=dtype, param_dtype=dtype)
        self.relative_attention_bias = nnx.Embed(
            config.relative_attention_num_buckets, config.num_heads, rngs=rngs, dtype=dtype, param_dtype=dtype
        )
        self.blocks = nnx.List([T5Block(config, rngs=rngs, dtype=dtype) for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.d_model, config.layer_norm_epsilon, dtype=dtype)

    def position_bias(self, length: int) -> jax.Array:
        """The learned relative position bias shared by every block: (1, heads, L, L) float32."""
        cfg = self.config
        buckets = relative_position_buckets(
            length, cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        )  # (L, L)
        table = self.relative_attention_bias.embedding[...].astype(jnp.float32)  # (buckets, heads)
        return jnp.transpose(table[buckets], (2, 0, 1))[None]  # (1, heads, L, L)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """input_ids (B, L) int, attention_mask (B, L) int/bool, 1 for real tokens (None: all real)
        -> (B, L, d_model) in the parameters' dtype.

        Padding is masked as keys only: padded positions still get an output (attending to the
        real tokens), as in transformers; consumers mask them again (PixArt's cross-attention does).
        """
        _, length = input_ids.shape
        bias = self.position_bias(length)  # (1, h, L, L)
        if attention_mask is not None:
            # Added, as transformers adds its mask: a fully padded row attends uniformly, never NaN.
            keep = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]  # (B, 1, 1, L)
            bias = bias + jnp.where(keep, 0.0, jnp.finfo(jnp.float32).min)  # (B, h, L, L)
        x = self.shared(input_ids).astype(jnp.float32)  # (B, L, D): the residual stream
        for block in self.blocks:
            x = block(x, bias)
        return self.final_norm(x)
