"""ToMe for SD: destinations, matching and ranking against a plain NumPy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sdtm_testing import bipartite_reference_check, unit, windows_of

import sdtm

SETTINGS = settings(max_examples=20, deadline=None)
LAYOUTS = [((4, 6), (2, 2)), ((6, 6), (3, 2))]
_tome = jax.jit(sdtm.tome_plan, static_argnums=1, static_argnames=("grid", "window"))


def reference_destinations(grid, window, positions) -> list[int]:
    """Token id of each window's destination, given its in-window position."""
    return [w[p] for w, p in zip(windows_of(grid, window), positions)]


@SETTINGS
@given(st.integers(0, 2**16), st.sampled_from(LAYOUTS), st.booleans())
def test_tome_matches_the_reference(seed, layout, random):
    grid, window = layout
    num_tokens, k = grid[0] * grid[1], window[0] * window[1]
    num_windows = num_tokens // k
    count = int(0.4 * (num_tokens - num_windows))
    rng = np.random.default_rng(seed)
    metric = rng.normal(size=(2, num_tokens, 3)).astype(np.float32)
    key = jax.random.key(seed) if random else None
    plan = _tome(jnp.asarray(metric), count, grid=grid, window=window, key=key)
    # The random positions are the documented draw: one randint per window, shared by the batch.
    positions = np.asarray(jax.random.randint(key, (num_windows,), 0, k)) if random else np.zeros(num_windows, int)
    dst = reference_destinations(grid, window, positions)
    for b in range(2):
        best_similarity = (unit(metric[b]) @ unit(metric[b])[dst].T).max(axis=1)
        bipartite_reference_check(plan, b, metric[b], dst, best_similarity, count)


def test_top_left_destinations_without_a_key():
    rng = np.random.default_rng(0)
    metric = jnp.asarray(rng.normal(size=(1, 16, 3)), jnp.float32)
    plan = _tome(metric, 12, grid=(4, 4))  # everything merges: only destinations stay
    assert np.asarray(plan.keep_index[0]).tolist() == [0, 2, 8, 10]


def test_random_destinations_are_shared_by_the_batch_and_change_with_the_key():
    rng = np.random.default_rng(1)
    metric = jnp.asarray(rng.normal(size=(2, 64, 3)), jnp.float32)
    first = _tome(metric, 48, grid=(8, 8), key=jax.random.key(1))  # all sources merge
    second = _tome(metric, 48, grid=(8, 8), key=jax.random.key(2))
    np.testing.assert_array_equal(first.keep_index[0], first.keep_index[1])
    assert not np.array_equal(first.keep_index[0], second.keep_index[0])
    # One destination per window.
    windows = windows_of((8, 8), (2, 2))
    kept = set(np.asarray(first.keep_index[0]).tolist())
    assert all(len(kept & set(w)) == 1 for w in windows)


@pytest.mark.parametrize(
    "count, grid, tokens, message",
    [
        (13, (4, 4), 16, r"outside \[0, 12\]"),
        (3, (4, 3), 12, "window 2x2 does not tile the 4x3 token grid"),
    ],
)
def test_tome_errors(count, grid, tokens, message):
    with pytest.raises(ValueError, match=message):
        sdtm.tome_plan(jnp.ones((1, tokens, 2)), count, grid=grid)
