"""Merge/unmerge and MergePlan properties, for plans made by every strategy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sdtm_testing import check_partition, group_means, plan_groups

import sdtm
from sdtm import bench_merge
from sdtm.ops import check_grid, plan_for_sources, plan_from_parents, window_tokens

SETTINGS = settings(max_examples=20, deadline=None)
BATCH, CHANNELS = 2, 6
# (grid, window) pairs and merge fractions: few shapes, so compiled functions are reused
# across examples (each new shape costs a compile).
LAYOUTS = [((4, 6), (2, 2)), ((6, 4), (3, 1))]
FRACTIONS = [0.5]  # merging everything is checked per strategy in test_ssm/test_idm/test_tome

_ssm = jax.jit(sdtm.ssm_plan, static_argnums=1, static_argnames=("grid", "window"))
_idm = jax.jit(sdtm.idm_plan, static_argnums=1, static_argnames=("grid", "window", "merge_sum"))
_tome = jax.jit(sdtm.tome_plan, static_argnums=1, static_argnames=("grid", "window", "merge_sum"))


def make_plan(kind: str, seed: int, layout, fraction: float):
    """A plan of strategy `kind` on random inputs, removing about `fraction` of what it can.
    A kind ending in "+matmul" makes a plan whose merge sums its sources by a matmul."""
    kind, _, merge_sum = kind.partition("+")
    merge_sum = merge_sum or "scatter"
    grid, window = layout
    num_tokens, k = grid[0] * grid[1], window[0] * window[1]
    num_windows = num_tokens // k
    rng = np.random.default_rng(seed)
    metric = jnp.asarray(rng.normal(size=(BATCH, num_tokens, CHANNELS)), jnp.float32)
    priority = jnp.asarray(rng.integers(0, 4, size=(BATCH, num_tokens)), jnp.float32)
    if kind == "ssm":
        count = int(fraction * num_windows) * (k - 1)
        return _ssm(metric, count, grid=grid, window=window, priority=priority), count
    count = int(fraction * (num_tokens - num_windows))
    if kind == "idm_attention":
        attention = jnp.asarray(rng.dirichlet(np.ones(num_tokens), size=BATCH), jnp.float32)
        plan = _idm(metric, count, grid=grid, window=window, priority=priority, attention=attention, merge_sum=merge_sum)
        return plan, count
    if kind == "idm_frequency":
        return _idm(metric, count, grid=grid, window=window, priority=priority, merge_sum=merge_sum), count
    return _tome(metric, count, grid=grid, window=window, key=jax.random.key(seed), merge_sum=merge_sum), count


KINDS = st.sampled_from(["ssm", "idm_attention", "idm_frequency", "tome", "idm_attention+matmul", "tome+matmul"])
PLANS = st.tuples(KINDS, st.integers(0, 2**16), st.sampled_from(LAYOUTS), st.sampled_from(FRACTIONS))
merge = jax.jit(sdtm.merge)
unmerge = jax.jit(sdtm.unmerge)


def random_tokens(seed: int, num_tokens: int, dtype=jnp.float32) -> jax.Array:
    rng = np.random.default_rng(seed + 1)
    return jnp.asarray(rng.normal(size=(BATCH, num_tokens, CHANNELS)), dtype)


def test_identity_plan_and_none_return_the_input():
    x = random_tokens(0, 16)
    plan = sdtm.identity_plan(BATCH, 16)
    np.testing.assert_array_equal(sdtm.merge(plan, x), x)
    np.testing.assert_array_equal(sdtm.unmerge(plan, x), x)
    assert sdtm.merge(None, x) is x and sdtm.unmerge(None, x) is x


@SETTINGS
@given(KINDS, st.integers(0, 2**16), st.sampled_from(LAYOUTS))
def test_merge_count_zero_is_the_identity(kind, seed, layout):
    plan, count = make_plan(kind, seed, layout, 0.0)
    assert count == 0
    x = random_tokens(seed, plan.num_tokens)
    np.testing.assert_array_equal(sdtm.merge(plan, x), x)
    np.testing.assert_array_equal(sdtm.unmerge(plan, x), x)


@SETTINGS
@given(PLANS)
def test_every_plan_partitions_the_tokens(args):
    plan, count = make_plan(*args)
    num_tokens = args[2][0][0] * args[2][0][1]
    check_partition(plan, BATCH, num_tokens, count)


@SETTINGS
@given(PLANS)
def test_merge_is_the_group_mean_and_unmerge_copies_back(args):
    plan, count = make_plan(*args)
    x = random_tokens(args[1], plan.num_tokens)
    merged = np.asarray(merge(plan, x))
    assert merged.shape == (BATCH, plan.num_tokens - count, CHANNELS)
    back = np.asarray(unmerge(plan, jnp.asarray(merged)))
    for b in range(BATCH):
        groups = plan_groups(plan, b)
        np.testing.assert_allclose(merged[b], group_means(np.asarray(x[b]), groups), rtol=1e-5, atol=1e-6)
        for slot, group in enumerate(groups):
            np.testing.assert_array_equal(back[b, group], np.broadcast_to(merged[b, slot], (len(group), CHANNELS)))


@SETTINGS
@given(PLANS)
def test_tokenwise_function_commutes_with_merging_equal_tokens(args):
    plan, _ = make_plan(*args)
    x = random_tokens(args[1], plan.num_tokens)
    # Make every group hold equal tokens: each token takes its slot seed's value.
    seeds = np.take_along_axis(np.asarray(plan.keep_index), np.asarray(plan.token_slot), axis=1)
    x = jnp.asarray(np.take_along_axis(np.asarray(x), seeds[..., None], axis=1))

    np.testing.assert_array_equal(unmerge(plan, _tokenwise(merge(plan, x))), _tokenwise(x))


@jax.jit
def _tokenwise(t: jax.Array) -> jax.Array:
    return jnp.sin(3.0 * t) + t * t


def test_plan_from_parents_small_example():
    # 6 tokens: 1 and 4 join 0, 5 joins 3; 2 stays alone.
    parent = jnp.array([[0, 0, 2, 3, 0, 3]])
    is_src = jnp.array([[False, True, False, False, True, True]])
    plan = plan_from_parents(parent, is_src, 3)
    np.testing.assert_array_equal(plan.keep_index, [[0, 2, 3]])
    np.testing.assert_array_equal(plan.src_index, [[1, 4, 5]])
    np.testing.assert_array_equal(plan.src_slot, [[0, 0, 2]])
    np.testing.assert_array_equal(plan.token_slot, [[0, 0, 1, 2, 0, 2]])
    np.testing.assert_allclose(plan.slot_scale, [[1 / 3, 1.0, 0.5]])
    x = jnp.arange(6.0)[None, :, None]
    np.testing.assert_allclose(sdtm.merge(plan, x)[0, :, 0], [(0 + 1 + 4) / 3, 2, (3 + 5) / 2], rtol=1e-6)


def test_plan_for_sources_small_example():
    # The same groups as above from a ranked order: 1, 4 and 5 merge (into 0, 0 and 3), and the
    # slots follow the order's tail.
    order = jnp.array([[4, 1, 5, 3, 0, 2]], jnp.int32)
    plan = plan_for_sources(order, jnp.array([[0, 0, 3]], jnp.int32))
    np.testing.assert_array_equal(plan.keep_index, [[3, 0, 2]])
    np.testing.assert_array_equal(plan.src_index, [[4, 1, 5]])
    np.testing.assert_array_equal(plan.src_slot, [[1, 1, 0]])
    np.testing.assert_array_equal(plan.token_slot, [[1, 1, 2, 0, 1, 0]])
    np.testing.assert_allclose(plan.slot_scale, [[0.5, 1 / 3, 1.0]])
    x = jnp.arange(6.0)[None, :, None]
    np.testing.assert_allclose(sdtm.merge(plan, x)[0, :, 0], [(3 + 5) / 2, (0 + 1 + 4) / 3, 2], rtol=1e-6)


@pytest.mark.parametrize("kind", ["ssm", "idm_attention", "idm_frequency", "tome"])
def test_plans_sort_once(kind):
    """Each strategy's plan costs one sort (no top_k besides) and at most two scatters: on a GPU
    every op of a plan is a kernel launch in every block."""
    grid, window, count = (4, 6), (2, 2), 9
    metric, priority = random_tokens(1, 24), jnp.ones((BATCH, 24))
    build = {
        "ssm": lambda m: sdtm.ssm_plan(m, count, grid=grid, window=window, priority=priority),
        "idm_attention": lambda m: sdtm.idm_plan(m, count, grid=grid, window=window, attention=priority),
        "idm_frequency": lambda m: sdtm.idm_plan(m, count, grid=grid, window=window, priority=priority),
        "tome": lambda m: sdtm.tome_plan(m, count, grid=grid, window=window, key=jax.random.key(0)),
    }[kind]
    text = jax.jit(build).lower(metric).as_text()
    assert text.count('"stablehlo.sort"(') == 1 and "top_k" not in text
    assert text.count('"stablehlo.scatter"(') == (1 if kind == "ssm" else 2)


@pytest.mark.parametrize("kind", ["idm_frequency", "idm_frequency+matmul"])
def test_merge_in_bfloat16_keeps_dtype_and_accuracy(kind):
    plan, count = make_plan(kind, 3, ((4, 4), (2, 2)), 1.0)
    x = random_tokens(3, 16)
    merged = sdtm.merge(plan, x.astype(jnp.bfloat16))
    assert merged.dtype == jnp.bfloat16 and merged.shape == (BATCH, 16 - count, CHANNELS)
    np.testing.assert_allclose(np.asarray(merged, np.float32), sdtm.merge(plan, x), atol=0.02, rtol=0.02)


@pytest.mark.parametrize("kind", ["idm_attention", "tome"])
def test_merge_sum_matmul_matches_the_scatter(kind):
    """The two ways of summing sources: the same plan apart from `merge_sum`, the same means up to
    summation order, and only the scatter path lowers to a scatter."""
    by_scatter, _ = make_plan(kind, 11, ((4, 6), (2, 2)), 0.7)
    by_matmul, _ = make_plan(kind + "+matmul", 11, ((4, 6), (2, 2)), 0.7)
    assert (by_scatter.merge_sum, by_matmul.merge_sum) == ("scatter", "matmul")
    assert by_matmul.dst_slots == 6  # the 4x6 grid's six 2x2 windows: the matmul sums into those slots only
    for a, b in zip(jax.tree.leaves(by_scatter), jax.tree.leaves(by_matmul)):
        np.testing.assert_array_equal(a, b)
    x = random_tokens(11, 24)
    np.testing.assert_allclose(merge(by_matmul, x), merge(by_scatter, x), rtol=1e-6, atol=1e-6)
    assert "scatter" in merge.lower(by_scatter, x).as_text()
    assert "scatter" not in merge.lower(by_matmul, x).as_text()


def test_merge_and_unmerge_jit_with_the_plan_as_an_argument():
    plan, count = make_plan("ssm", 5, ((4, 4), (2, 2)), 0.5)
    x = random_tokens(5, 16)
    y = jax.jit(sdtm.merge)(plan, x)
    # Eager and jitted merges may sum a window in another order: an ulp apart.
    np.testing.assert_allclose(y, sdtm.merge(plan, x), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(jax.jit(sdtm.unmerge)(plan, y), sdtm.unmerge(plan, y))


@pytest.mark.parametrize("kind", ["ssm", "idm_attention", "tome"])
def test_benchmarked_merge_variants_agree_with_merge(kind):
    plan, _ = make_plan(kind, 7, ((4, 6), (2, 2)), 0.7)
    x = random_tokens(7, 24)
    want = np.asarray(sdtm.merge(plan, x))
    order, sorted_slot = bench_merge.slot_order(plan)
    for got in (
        bench_merge.merge_scatter(plan, x),
        bench_merge.merge_all_slots(plan, x),
        bench_merge.merge_row_indexed(plan, x),
        bench_merge.merge_sum_scatter(plan, x),
        bench_merge.merge_segment_sum(plan, x),
        bench_merge.merge_sorted_sum(plan, x, order, sorted_slot),
        bench_merge.merge_one_hot(plan, x),
        sdtm.ops.merge_matmul(plan, x),
        *([bench_merge.merge_grid_means(plan, x)] if plan.windows else []),
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["idm_attention", "tome"])
def test_bfloat16_merge_of_a_bipartite_plan_sums_its_destinations_only(kind):
    """Below float32 only the destination slots go through float32: the same bits as copying
    every slot, and the slots no source joins are the tokens themselves."""
    plan, _ = make_plan(kind, 7, ((4, 6), (2, 2)), 0.7)
    assert plan.dst_slots is not None
    x = random_tokens(7, 24).astype(jnp.bfloat16)
    got = jax.jit(sdtm.ops.merge_scatter)(plan, x)
    np.testing.assert_array_equal(got.astype(jnp.float32), bench_merge.merge_all_slots(plan, x).astype(jnp.float32))
    first = plan.keep_index.shape[1] - plan.dst_slots
    np.testing.assert_array_equal(
        got[:, :first].astype(jnp.float32), jnp.take_along_axis(x, plan.keep_index[:, :first, None], axis=1).astype(jnp.float32)
    )


def test_window_tokens_layout():
    np.testing.assert_array_equal(
        window_tokens((4, 4), (2, 2)), [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    )
    np.testing.assert_array_equal(window_tokens((2, 6), (1, 3)), [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]])


@pytest.mark.parametrize(
    "tokens, grid, window, message",
    [
        (25, (5, 5), (2, 2), "window 2x2 does not tile the 5x5 token grid"),
        (16, (4, 5), (2, 2), "grid 4x5 holds 20 tokens but the metric has 16"),
        (16, (4, 4), (1, 1), "at least 2 tokens"),
    ],
)
def test_check_grid_errors(tokens, grid, window, message):
    with pytest.raises(ValueError, match=message):
        check_grid(tokens, grid, window)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_apply_to_lone_tokens_skips_the_merged_windows(layout):
    """fn runs on the tokens alone in their slot only; merged tokens read the fill: the same as
    merging, applying fn, unmerging and overwriting the merged tokens."""
    from sdtm.ops import apply_to_lone_tokens, merged_mask

    plan, count = make_plan("ssm", 3, layout, 0.5)
    (height, width), window = layout
    num_tokens, k = height * width, window[0] * window[1]
    x, fill = random_tokens(3, num_tokens), random_tokens(4, num_tokens)[..., :3]
    weight = jnp.asarray(np.random.default_rng(5).normal(size=(CHANNELS, 3)), jnp.float32)
    rows = []

    def fn(tokens):
        rows.append(tokens.shape)
        return jnp.tanh(tokens @ weight)

    got = apply_to_lone_tokens(plan, fn, x, fill)
    assert rows == [(BATCH, num_tokens - count - count // (k - 1), CHANNELS)]
    mask = merged_mask(plan, BATCH, num_tokens)[..., None]
    expected = jnp.where(mask, fill, unmerge(plan, jnp.tanh(merge(plan, x) @ weight)))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(jnp.where(mask, got, 0), jnp.where(mask, fill, 0))
    with pytest.raises(ValueError, match="needs a window plan"):
        apply_to_lone_tokens(make_plan("tome", 3, layout, 0.5)[0], fn, x, fill)
