"""The block mergers: jit/scan compatibility, which plans they return, and the merge state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sdtm_testing import check_partition

import sdtm
from sdtm import IDMMerger, NoMerger, SSMMerger, ToMeMerger

GRID = (4, 4)
BATCH, TOKENS, CHANNELS = 2, 16, 8


def build(merger, metric, state, key_attention=None):
    """merger.build under jit (eager JAX would compile every primitive separately: slow)."""
    return jax.jit(lambda m, s, a: merger.build(m, s, grid=GRID, key_attention=a))(metric, state, key_attention)


def same_state(a, b) -> bool:
    return np.array_equal(a["counter"], b["counter"]) and np.array_equal(
        jax.random.key_data(a["key"]), jax.random.key_data(b["key"])
    )


def random_metric(seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.key(seed), (BATCH, TOKENS, CHANNELS))


def key_attention(seed: int = 1) -> jax.Array:
    return jax.nn.softmax(jax.random.normal(jax.random.key(seed), (BATCH, TOKENS)), axis=-1)


MERGERS = [
    (SSMMerger(6), "both"),
    (SSMMerger(6, frequency=None), "both"),
    (IDMMerger(5, score="attention"), "mlp"),
    (IDMMerger(5, score="frequency", frequency="merged"), "mlp"),
    (ToMeMerger(7), "attn"),
    (ToMeMerger(7, merge_mlp=True), "both"),
    (NoMerger(), "none"),
]


@pytest.mark.parametrize("merger, merges", MERGERS, ids=lambda m: type(m).__name__ if not isinstance(m, str) else m)
def test_build_jit_compiles_and_returns_the_right_plans(merger, merges):
    state = sdtm.init_state(BATCH, TOKENS, jax.random.key(3))

    @jax.jit
    def build(metric, state, attention):
        return merger.build(metric, state, grid=GRID, key_attention=attention if merger.needs_key_attention else None)

    attn_plan, mlp_plan, new_state = build(random_metric(), state, key_attention())
    assert (attn_plan is not None) == (merges in ("attn", "both"))
    assert (mlp_plan is not None) == (merges in ("mlp", "both"))
    for plan in (attn_plan, mlp_plan):
        if plan is not None:
            check_partition(plan, BATCH, TOKENS, merger.merge_count)
    if merges == "both":
        np.testing.assert_array_equal(attn_plan.token_slot, mlp_plan.token_slot)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert new_state["counter"].shape == (BATCH, TOKENS) and new_state["counter"].dtype == jnp.float32


def test_counter_modes_after_one_ssm_call():
    metric = jnp.ones((BATCH, TOKENS, CHANNELS))  # all windows tie: the first two windows merge
    merged = np.zeros((BATCH, TOKENS), bool)
    merged[:, [0, 1, 4, 5, 2, 3, 6, 7]] = True
    counter = jnp.full((BATCH, TOKENS), 2.0)
    state = {"counter": counter, "key": jax.random.key(0)}
    _, _, after = build(SSMMerger(6, frequency="independent"), metric, state)
    np.testing.assert_array_equal(after["counter"], np.where(merged, 0.0, 3.0))
    _, _, after = build(SSMMerger(6, frequency="merged"), metric, state)
    np.testing.assert_array_equal(after["counter"], np.where(merged, 3.0, 0.0))
    _, _, after = build(SSMMerger(6, frequency=None), metric, state)
    assert same_state(after, state)


def test_idle_idm_destination_counts_as_independent():
    # Every source is identical to the top-left destination of the first window: with one merge
    # only that destination's group grows; the other destinations stay alone.
    metric = jnp.asarray(np.random.default_rng(0).normal(size=(1, TOKENS, CHANNELS)), jnp.float32)
    metric = metric.at[0, 1].set(metric[0, 0])
    state = sdtm.init_state(1, TOKENS)
    _, plan, after = build(IDMMerger(1, score="frequency", frequency="merged"), metric, state)
    assert np.asarray(plan.src_index).tolist() == [[1]]
    want = np.zeros(TOKENS)
    want[[0, 1]] = 1.0
    np.testing.assert_array_equal(after["counter"][0], want)


def test_frequency_priority_is_counter_over_its_mean():
    counter = jnp.array([[0.0, 2.0, 4.0, 2.0], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(sdtm.frequency_priority(counter), [[0, 1, 2, 1], [0, 0, 0, 0]])


def test_priority_steers_the_ssm_merger():
    metric = jnp.ones((BATCH, TOKENS, CHANNELS))
    counter = jnp.zeros((BATCH, TOKENS)).at[:, 15].set(5.0)  # last window: highest priority
    state = {"counter": counter, "key": jax.random.key(0)}
    plan, _, _ = build(SSMMerger(3), metric, state)
    np.testing.assert_array_equal(plan.src_index, [[11, 14, 15]] * BATCH)


def test_idm_attention_needs_key_attention():
    merger = IDMMerger(5)
    assert merger.needs_key_attention
    assert not IDMMerger(5, score="frequency").needs_key_attention
    with pytest.raises(ValueError, match="needs key_attention"):
        merger.build(random_metric(), sdtm.init_state(BATCH, TOKENS), grid=GRID)


def test_tome_key_advances_on_even_batches_only():
    state = sdtm.init_state(BATCH, TOKENS, jax.random.key(9))
    _, _, after = build(ToMeMerger(7), random_metric(), state)
    assert not np.array_equal(jax.random.key_data(after["key"]), jax.random.key_data(state["key"]))
    odd = sdtm.init_state(1, TOKENS, jax.random.key(9))
    attn_plan, _, after_odd = build(ToMeMerger(12), random_metric()[:1], odd)
    assert same_state(after_odd, odd)
    assert np.asarray(attn_plan.keep_index).tolist() == [[0, 2, 8, 10]]  # top-left destinations


@pytest.mark.parametrize("merger", [SSMMerger(0), IDMMerger(0), ToMeMerger(0), NoMerger()])
def test_merge_count_zero_returns_no_plans_and_the_same_state(merger):
    state = sdtm.init_state(BATCH, TOKENS)
    assert not merger.needs_key_attention
    attn_plan, mlp_plan, after = merger.build(random_metric(), state, grid=GRID)
    assert attn_plan is None and mlp_plan is None and after is state


def test_state_shape_is_checked():
    with pytest.raises(ValueError, match=r"counters have shape \(2, 9\) but the metric has"):
        SSMMerger(3).build(random_metric(), sdtm.init_state(2, 9), grid=GRID)


def test_state_threads_through_a_scan_over_blocks():
    # As in the sampler: the state is the carry of a lax.scan; its types must not change.
    merger = SSMMerger(6)
    metrics = jax.random.normal(jax.random.key(5), (3, BATCH, TOKENS, CHANNELS))

    def block(state, metric):
        _, plan, state = merger.build(metric, state, grid=GRID)
        return state, plan.token_slot

    final, slots = jax.lax.scan(block, sdtm.init_state(BATCH, TOKENS), metrics)
    assert slots.shape == (3, BATCH, TOKENS)
    assert float(final["counter"].max()) <= 3.0
