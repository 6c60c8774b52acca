"""SSM (structure stage): window selection against a plain NumPy reference, and its errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sdtm_testing import assert_top_k, plan_groups, unit, windows_of

import sdtm
from sdtm.ssm import window_similarity

SETTINGS = settings(max_examples=20, deadline=None)
LAYOUTS = [((4, 6), (2, 2)), ((6, 6), (3, 2))]
_ssm = jax.jit(sdtm.ssm_plan, static_argnums=1, static_argnames=("grid", "window"))


def reference_window_scores(metric, priority, grid, window, a_s) -> np.ndarray:
    """[B, W]: mean cosine similarity over distinct pairs + a_s * mean priority, per window."""
    out = []
    for b in range(metric.shape[0]):
        u = unit(metric[b])
        row = []
        for tokens in windows_of(grid, window):
            sims = u[tokens] @ u[tokens].T
            k = len(tokens)
            score = (sims.sum() - np.trace(sims)) / (k * (k - 1))
            if priority is not None:
                score += a_s * np.mean(np.asarray(priority[b], np.float64)[tokens])
            row.append(score)
        out.append(row)
    return np.array(out)


@SETTINGS
@given(
    st.integers(0, 2**16),
    st.sampled_from(LAYOUTS),
    st.just(2),
    st.booleans(),
    st.sampled_from([0.05, 1.0]),
)
def test_ssm_selects_the_reference_windows(seed, layout, num_selected, use_priority, a_s):
    grid, window = layout
    k = window[0] * window[1]
    num_tokens = grid[0] * grid[1]
    rng = np.random.default_rng(seed)
    # Low-dimensional tokens make window similarities spread widely.
    metric = rng.normal(size=(2, num_tokens, 3)).astype(np.float32)
    priority = rng.integers(0, 5, size=(2, num_tokens)).astype(np.float32) if use_priority else None
    count = num_selected * (k - 1)
    plan = _ssm(
        jnp.asarray(metric), count, grid=grid, window=window,
        priority=None if priority is None else jnp.asarray(priority), a_s=a_s,
    )
    scores = reference_window_scores(metric, priority, grid, window, a_s)
    windows = windows_of(grid, window)
    for b in range(2):
        merged_groups = [sorted(g) for g in plan_groups(plan, b) if len(g) > 1]
        # Each merged group is one whole window, and the merged windows are a top-k by score.
        assert all(len(g) == k for g in merged_groups)
        chosen = [windows.index(g) for g in merged_groups]
        assert_top_k(chosen, scores[b], num_selected)


def test_window_similarity_matches_reference():
    rng = np.random.default_rng(0)
    metric = rng.normal(size=(2, 24, 5)).astype(np.float32)
    got = window_similarity(jnp.asarray(metric), (4, 6), (2, 2))
    np.testing.assert_allclose(got, reference_window_scores(metric, None, (4, 6), (2, 2), 0.0), atol=1e-5)


def test_identical_window_is_merged_into_its_mean():
    rng = np.random.default_rng(1)
    metric = rng.normal(size=(1, 16, 8)).astype(np.float32)
    metric[0, [10, 11, 14, 15]] = metric[0, 10] * np.array([[1.0], [2.0], [0.5], [3.0]])  # same direction
    plan = _ssm(jnp.asarray(metric), 3, grid=(4, 4))
    assert sorted(max(plan_groups(plan, 0), key=len)) == [10, 11, 14, 15]
    x = jnp.asarray(rng.normal(size=(1, 16, 4)), jnp.float32)
    merged = np.asarray(jax.jit(sdtm.merge)(plan, x))
    slot = int(plan.token_slot[0, 10])
    np.testing.assert_allclose(merged[0, slot], np.asarray(x)[0, [10, 11, 14, 15]].mean(0), rtol=1e-6)
    back = np.asarray(jax.jit(sdtm.unmerge)(plan, jnp.asarray(merged)))
    np.testing.assert_array_equal(back[0, [10, 11, 14, 15]], np.tile(merged[0, slot], (4, 1)))


def test_merging_every_window_is_average_pooling():
    rng = np.random.default_rng(4)
    metric = jnp.asarray(rng.normal(size=(2, 24, 3)), jnp.float32)
    plan = _ssm(metric, 18, grid=(4, 6))  # all 6 windows
    x = rng.normal(size=(2, 24, 5)).astype(np.float32)
    pooled = x.reshape(2, 2, 2, 3, 2, 5).mean(axis=(2, 4)).reshape(2, 6, 5)  # 2x2 average pooling
    merged = np.asarray(jax.jit(sdtm.merge)(plan, jnp.asarray(x)))
    # Slots come in window rank order: put them back in window order by their seeds.
    by_window = np.take_along_axis(merged, np.argsort(np.asarray(plan.keep_index), axis=1)[..., None], axis=1)
    np.testing.assert_allclose(by_window, pooled, rtol=1e-5, atol=1e-6)


def test_priority_decides_between_equally_similar_windows():
    metric = jnp.ones((2, 16, 4))  # every window scores similarity 1
    priority = jnp.zeros((2, 16)).at[0, 2].set(4.0).at[1, 13].set(4.0)
    plan = _ssm(metric, 3, grid=(4, 4), priority=priority)
    assert sorted(max(plan_groups(plan, 0), key=len)) == [2, 3, 6, 7]  # window of token 2
    assert sorted(max(plan_groups(plan, 1), key=len)) == [8, 9, 12, 13]  # window of token 13
    tie = _ssm(metric, 3, grid=(4, 4))  # no priority: ties go to the first window
    assert sorted(max(plan_groups(tie, 0), key=len)) == [0, 1, 4, 5]


@pytest.mark.parametrize(
    "count, grid, tokens, message",
    [
        (4, (4, 4), 16, "not a multiple of 3"),
        (15, (4, 4), 16, r"outside \[0, 12\]"),
        (3, (5, 5), 25, "window 2x2 does not tile the 5x5 token grid"),
        (3, (4, 4), 20, "holds 16 tokens but the metric has 20"),
        (3.0, (4, 4), 16, "must be a Python int"),
    ],
)
def test_ssm_errors(count, grid, tokens, message):
    with pytest.raises(ValueError, match=message):
        sdtm.ssm_plan(jnp.ones((1, tokens, 2)), count, grid=grid)
