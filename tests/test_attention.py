"""dit_jax.nn.attention: attention under a merging strategy, proportional attention, the key-attention score."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from device_testing import FakeDevice, client
from flax import nnx

import sdtm
from dit_jax.nn.attention import (
    Attention,
    MultiHeadAttention,
    _attention,
    _implementation,
    attention_implementation,
    chunked_attention,
    cudnn_flash_supported,
    key_attention,
    merged_self_attention,
)
from sdtm import SDTMConfig, SSMMerger, ToMeConfig, ToMeMerger

GRID = (8, 8)
DIM, HEADS = 32, 4


def window_constant_tokens(batch: int = 2, seed: int = 0) -> jax.Array:
    """(B, 64, DIM): every 2x2 window of the 8x8 grid holds four copies of one random token."""
    per_window = jax.random.normal(jax.random.key(seed), (batch, 4, 4, DIM))
    grid = jnp.repeat(jnp.repeat(per_window, 2, axis=1), 2, axis=2)  # (B, 8, 8, DIM)
    return grid.reshape(batch, 64, DIM)


def attention_module(kind: str) -> nnx.Module:
    if kind == "dit":
        return Attention(DIM, HEADS, rngs=nnx.Rngs(0))
    return MultiHeadAttention(DIM, HEADS, rngs=nnx.Rngs(0), dtype=jnp.float32)


def run(attn, h, merger):
    state = sdtm.init_state(h.shape[0], h.shape[1], jax.random.key(3))
    out, plans, _ = merged_self_attention(attn, h, merger, state, GRID)
    return out, plans


@pytest.mark.parametrize("kind", ["dit", "pixart"])
@pytest.mark.parametrize("merger", [SSMMerger(30, proportional_attention=True),
                                    ToMeMerger(40, random=False, proportional_attention=True)])
def test_proportional_attention_is_exact_on_equal_groups(kind, merger):
    """A group of equal keys merged into one, with log(group size) on its logits, draws the
    attention the group drew: the merged attention equals full attention on every token."""
    attn = attention_module(kind)
    h = window_constant_tokens()
    full = attn(h)
    out, (attn_plan, _) = run(attn, h, merger)
    assert attn_plan.merge_count == merger.merge_count
    np.testing.assert_allclose(out, full, rtol=1e-5, atol=1e-5)
    # Without the bias the merged keys are under-weighted, and the output moves.
    plain = run(attn, h, dataclasses.replace(merger, proportional_attention=False))[0]
    assert float(jnp.max(jnp.abs(plain - full))) > 1e-3


def test_bias_is_log_group_size_per_key():
    h = window_constant_tokens(batch=1)
    plan = sdtm.ssm_plan(h, 9, grid=GRID)  # three windows of four tokens
    bias = sdtm.ops.log_group_size(plan)
    sizes = np.round(np.exp(np.asarray(bias))).astype(int)[0]
    assert sorted(sizes.tolist()) == [1] * (64 - 12) + [4] * 3
    np.testing.assert_allclose(np.asarray(bias)[0][sizes == 4], np.log(4.0), rtol=1e-6)


def test_configs_carry_the_option_to_their_mergers():
    phases = sdtm.schedule(SDTMConfig(proportional_attention=True), 10, 64, grid=GRID)
    ssm = [p.merger for p in phases if p.strategy == "ssm"]
    assert ssm and all(m.proportional_attention for m in ssm)
    assert not any(p.merger.proportional_attention for p in sdtm.schedule(SDTMConfig(), 10, 64, grid=GRID)
                   if p.strategy == "ssm")
    (tome,) = sdtm.schedule(ToMeConfig(proportional_attention=True), 10, 64, grid=GRID)
    assert tome.merger.proportional_attention
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    assert sdtm.BatchParallel(tome.merger, mesh).proportional_attention


@pytest.mark.parametrize("config", [SDTMConfig, ToMeConfig])
def test_option_must_be_a_bool(config):
    with pytest.raises(ValueError, match="proportional_attention must be True or False"):
        config(proportional_attention="yes")


def test_key_attention_is_the_mean_probability_each_key_receives():
    q = jax.random.normal(jax.random.key(0), (2, 64, HEADS, 8))
    k = jax.random.normal(jax.random.key(1), (2, 64, HEADS, 8))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(8.0)
    exact = jax.nn.softmax(logits, axis=-1).mean(axis=(1, 2))  # every query
    np.testing.assert_allclose(key_attention(q, k, num_queries=64), exact, rtol=1e-5)
    strided = key_attention(q, k, num_queries=16)  # every 4th query
    np.testing.assert_allclose(strided, jax.nn.softmax(logits[:, :, ::4], axis=-1).mean(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(strided.sum(axis=1), 1.0, rtol=1e-5)


def test_key_attention_of_bfloat16_is_float32_math_on_the_same_values():
    """bfloat16 q and k multiply in bfloat16 with float32 sums: the same score as float32 copies."""
    q = jax.random.normal(jax.random.key(0), (2, 64, HEADS, 8)).astype(jnp.bfloat16)
    k = jax.random.normal(jax.random.key(1), (2, 64, HEADS, 8)).astype(jnp.bfloat16)
    score = key_attention(q, k, num_queries=16)
    assert score.dtype == jnp.float32
    upcast = key_attention(q.astype(jnp.float32), k.astype(jnp.float32), num_queries=16)
    np.testing.assert_allclose(score, upcast, rtol=1e-6)


@pytest.mark.parametrize("n, s, chunk", [(64, 64, 16), (50, 64, 16), (40, 7, 128)])
@pytest.mark.parametrize("bias_shape", [None, "keys", "full"])
def test_chunked_attention_equals_dot_product_attention(n, s, chunk, bias_shape):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (2, n, HEADS, 8))
    k, v = (jax.random.normal(kk, (2, s, HEADS, 8)) for kk in keys[1:3])
    bias = None
    if bias_shape == "keys":
        bias = jax.random.normal(keys[3], (2, 1, 1, s))
    elif bias_shape == "full":
        bias = jax.random.normal(keys[3], (2, HEADS, n, s))
    want = jax.nn.dot_product_attention(q, k, v, bias=bias)
    got = chunked_attention(q, k, v, bias, chunk=chunk)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n, s, chunk, queries", [(64, 64, 16, 16), (50, 64, 16, 16), (40, 7, 128, 64), (300, 40, 16, 2)])
def test_chunked_attention_reads_key_attention_off_its_probabilities(n, s, chunk, queries):
    """The score the chunked attention sums from its own blocks is `key_attention`'s: the same
    strided queries (in blocks that hold none, as at n = 300, stride 150, too), and the same output."""
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (2, n, HEADS, 8))
    k, v = (jax.random.normal(kk, (2, s, HEADS, 8)) for kk in keys[1:])
    out, score = chunked_attention(q, k, v, chunk=chunk, key_attention_queries=queries)
    np.testing.assert_array_equal(out, chunked_attention(q, k, v, chunk=chunk))
    np.testing.assert_allclose(score, key_attention(q, k, num_queries=queries), rtol=1e-5)


@pytest.mark.parametrize("implementation", ["chunked", "xla"])
@pytest.mark.parametrize("kind", ["dit", "pixart"])
def test_attention_returns_key_attention_under_every_implementation(implementation, kind):
    """Both attention modules give `key_attention` of their own q and k beside their output,
    and refuse a bias with it (the score is defined without one)."""
    attn = attention_module(kind)
    x = jax.random.normal(jax.random.key(3), (2, 64, DIM))
    with attention_implementation(implementation):
        out, score = attn(x, with_key_attention=True)
        np.testing.assert_allclose(out, attn(x), rtol=1e-5, atol=1e-6)
        if kind == "dit":
            q, k, _ = jnp.split(attn.qkv(x), 3, axis=-1)
        else:
            q, k = attn.q(x), attn.k(x)
        heads = lambda t: t.reshape(2, 64, HEADS, DIM // HEADS)  # noqa: E731
        np.testing.assert_allclose(score, key_attention(heads(q), heads(k)), rtol=1e-5)
        with pytest.raises(ValueError, match="without a bias"):
            attn(x, bias=jnp.zeros((1, 1, 1, 64)), with_key_attention=True)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the chunked attention is the CPU default")
def test_cpu_uses_chunked_attention_unless_told_otherwise():
    q = jax.random.normal(jax.random.key(0), (1, 300, 2, 8))
    with attention_implementation("xla"):
        xla = jax.jit(lambda q: _attention(q, q, q, None)).lower(q).as_text()
    auto = jax.jit(lambda q: _attention(q, q, q, None)).lower(q).as_text()
    # Three blocks of QUERY_CHUNK (128) queries: three softmaxes, against one.
    assert auto.count("stablehlo.exponential") == 3 and xla.count("stablehlo.exponential") == 1
    with pytest.raises(ValueError, match="must be one of"):
        with attention_implementation("flash"):
            pass


@pytest.mark.parametrize("capability,head_dim,supported", [
    ("7.5", 72, False),  # T4 (Colab's free GPU): cuDNN has no flash attention before Ampere
    ("7.0", 64, False),  # V100
    ("8.0", 72, True),  # A100: DiT-XL/2's and PixArt's heads of 72
    ("8.9", 128, True),
    ("8.0", 256, False),  # heads over 128 need Hopper
    ("9.0", 256, True),
    ("9.0", 60, False),  # not a multiple of 8
])
def test_cudnn_flash_attention_only_where_cudnn_has_it(capability, head_dim, supported):
    assert cudnn_flash_supported(head_dim, FakeDevice(capability)) is supported


def test_no_cudnn_flash_attention_on_rocm_or_cpu():
    rocm = FakeDevice("9.0", client=client("rocm 6.3"))
    assert not cudnn_flash_supported(64, rocm)
    assert not cudnn_flash_supported(64, jax.devices("cpu")[0])


def test_auto_attention_falls_back_to_xla_on_a_gpu_without_cudnn_flash(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *backend: [FakeDevice("7.5")])  # a T4
    assert _implementation(jnp.bfloat16, 72) is None and _implementation(jnp.float16, 72) is None
    monkeypatch.setattr(jax, "devices", lambda *backend: [FakeDevice("9.0")])  # an H100
    assert _implementation(jnp.bfloat16, 72) == "cudnn" and _implementation(jnp.float32, 72) is None
    with attention_implementation("cudnn"):  # forced: the caller's choice, even where it cannot run
        monkeypatch.setattr(jax, "devices", lambda *backend: [FakeDevice("7.5")])
        assert _implementation(jnp.bfloat16, 72) == "cudnn"
