"""dit_jax.nn.branches: a block's gated branches under merge plans; with the whole protected-step
cache (cache_weight 0) and a window plan they compute the lone slots only, with the same result."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sdtm
from dit_jax.nn.attention import Attention, MultiHeadAttention, merged_self_attention, project
from dit_jax.nn.branches import attention_branch, cross_attention_branch, gated_branch, mlp_branch
from dit_jax.nn.layers import Mlp
from sdtm import IDMMerger, SSMMerger
from sdtm.ops import blend_merged, merge, unmerge

BATCH, GRID, DIM, HEADS = 2, (4, 4), 8, 2
TOKENS = GRID[0] * GRID[1]


def inputs(seed: int = 0):
    """h (B, N, D), gate (B, D), cache (2, B, N, D)."""
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (BATCH, TOKENS, DIM)), jax.random.normal(keys[1], (BATCH, DIM)),
            jax.random.normal(keys[2], (2, BATCH, TOKENS, DIM)))


def attention(kind: str) -> nnx.Module:
    if kind == "dit":
        return Attention(DIM, HEADS, rngs=nnx.Rngs(1))
    return MultiHeadAttention(DIM, HEADS, rngs=nnx.Rngs(1), dtype=jnp.float32)


def counting(module, calls: list):
    """module, recording the number of query rows of every call."""
    def call(x, *args, query_start: int = 0, **kwargs):
        calls.append(x.shape[1] - query_start)
        return module(x, *args, query_start=query_start, **kwargs)
    return call


def general_attention_branch(attn, h, gate, merger, cache, cache_weight):
    """The path without skipping: merge, attention on every slot, unmerge, gate, blend."""
    state = sdtm.init_state(BATCH, TOKENS)
    out, plans, _ = merged_self_attention(attn, h, merger, state, GRID)
    return gated_branch(gate, out, plans[0], cache, 0, cache_weight), plans


@pytest.mark.parametrize("kind", ["dit", "pixart"])
@pytest.mark.parametrize("proportional", [False, True])
def test_attention_branch_with_the_whole_cache_skips_merged_queries(kind, proportional):
    """cache_weight 0 with an SSM plan: only the lone slots query, with the general path's result."""
    attn, (h, gate, cache) = attention(kind), inputs()
    merger = SSMMerger(6, proportional_attention=proportional)  # 2 windows of 4: 10 slots, 8 alone
    calls = []
    state = sdtm.init_state(BATCH, TOKENS)
    got, plans, new_state = attention_branch(counting(attn, calls), h, gate, merger, state, GRID, cache=cache,
                                             cache_weight=0.0)
    want, want_plans = general_attention_branch(attn, h, gate, merger, cache, 0.0)
    assert calls == [8]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(plans[0].token_slot, want_plans[0].token_slot)
    assert new_state["counter"].shape == (BATCH, TOKENS)
    # shared plans (plan_every) take the same path
    calls.clear()
    reused, _, _ = attention_branch(counting(attn, calls), h, gate, merger, state, GRID, plans, cache, 0.0)
    assert calls == [8]
    np.testing.assert_array_equal(reused, got)


@pytest.mark.parametrize(
    "merger, cache_weight, queries",
    [(SSMMerger(6), 0.5, 10),  # a partial blend needs every slot
     (SSMMerger(6), 1.0, 10),
     (IDMMerger(6), 0.0, 16),  # IDM merges no attention input
     (None, 0.0, 16)],
)
def test_attention_branch_takes_the_general_path_otherwise(merger, cache_weight, queries):
    attn, (h, gate, cache) = attention("dit"), inputs(1)
    calls = []
    state = sdtm.init_state(BATCH, TOKENS)
    got, _, _ = attention_branch(counting(attn, calls), h, gate, merger, state, GRID, cache=cache,
                                 cache_weight=cache_weight)
    assert calls == [queries]
    want, _ = general_attention_branch(attn, h, gate, merger, cache, cache_weight)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", ["dit", "pixart"])
def test_query_start_gives_the_last_rows(kind):
    attn = attention(kind)
    x = jax.random.normal(jax.random.key(2), (BATCH, TOKENS, DIM))
    bias = jax.random.normal(jax.random.key(3), (BATCH, 1, 1, TOKENS))
    np.testing.assert_allclose(attn(x, bias=bias, query_start=5), attn(x, bias=bias)[:, 5:], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("use_bias", [True, False])
def test_project_is_a_slice_of_the_linear_layer(use_bias):
    linear = nnx.Linear(DIM, 3 * DIM, use_bias=use_bias, rngs=nnx.Rngs(4))
    x = jax.random.normal(jax.random.key(5), (BATCH, TOKENS, DIM))
    np.testing.assert_allclose(project(linear, x, DIM, 3 * DIM), linear(x)[..., DIM:], rtol=1e-6, atol=1e-6)


def test_mlp_branch_with_the_whole_cache_skips_merged_windows():
    """cache_weight 0 with an SSM plan: the MLP runs on the lone tokens only, with the result of
    the general path (merge, MLP, unmerge, gate, blend)."""
    h, gate, cache = inputs(6)
    mlp = Mlp(DIM, 2 * DIM, rngs=nnx.Rngs(1))
    rows = []

    def counting_mlp(tokens):
        rows.append(tokens.shape[1])
        return mlp(tokens)

    plan = sdtm.ssm_plan(h, 6, grid=GRID)  # 2 windows of 4 merged: 10 slots, 8 of them one token
    general = gated_branch(gate, unmerge(plan, mlp(merge(plan, h))), plan, cache, 1, 0.0)
    np.testing.assert_allclose(mlp_branch(counting_mlp, h, gate, plan, cache, 0.0), general, rtol=1e-6, atol=1e-6)
    assert rows == [8]
    blended = mlp_branch(counting_mlp, h, gate, plan, cache, 0.5)  # a partial blend needs every slot
    np.testing.assert_array_equal(blended, gated_branch(gate, unmerge(plan, mlp(merge(plan, h))), plan, cache, 1, 0.5))
    assert rows == [8, 10]


def test_cross_attention_branch_with_the_whole_cache_skips_merged_windows():
    """PixArt's cross-attention: with cache_weight 0 and an SSM plan only the lone slots query
    the caption, with the general path's result (merge, cross-attention, unmerge, blend with
    cache[2]); a partial blend and no cache take the general path."""
    x, _, _ = inputs(7)
    keys = jax.random.split(jax.random.key(8), 2)
    text, cache = jax.random.normal(keys[0], (BATCH, 5, DIM)), jax.random.normal(keys[1], (3, BATCH, TOKENS, DIM))
    text_bias = jnp.where(jnp.arange(5) < 3, 0.0, -10000.0)[None, None, None]  # two padded text tokens
    cross = MultiHeadAttention(DIM, HEADS, rngs=nnx.Rngs(2), dtype=jnp.float32)
    calls = []
    plan = sdtm.ssm_plan(x, 6, grid=GRID)  # 2 windows of 4 merged: 10 slots, 8 of them one token
    unmerged = unmerge(plan, cross(merge(plan, x), text, text_bias))
    for weight, rows in ((0.0, 8), (0.5, 10)):
        got = cross_attention_branch(counting(cross, calls), x, text, text_bias, plan, cache, weight)
        np.testing.assert_allclose(got, blend_merged(plan, unmerged, cache[2], weight), rtol=1e-6, atol=1e-6)
        assert calls[-1] == rows
    np.testing.assert_array_equal(cross_attention_branch(cross, x, text, text_bias, plan, None, 1.0), unmerged)
