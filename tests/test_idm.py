"""IDM (detail stage): destinations, matching and ranking against a plain NumPy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sdtm_testing import bipartite_reference_check, plan_groups, unit, windows_of

import sdtm
from sdtm.idm import inattentiveness

SETTINGS = settings(max_examples=20, deadline=None)
LAYOUTS = [((4, 6), (2, 2)), ((6, 6), (3, 2))]
_idm = jax.jit(sdtm.idm_plan, static_argnums=1, static_argnames=("grid", "window"))


def reference_idm(metric, grid, window, priority, attention, a_d):
    """Per batch row: (destination of each window, rank score of every token as a source)."""
    out = []
    for b in range(metric.shape[0]):
        num_tokens = metric.shape[1]
        if attention is not None:
            dst_score = attention[b]
        elif priority is not None:
            dst_score = priority[b]
        else:
            dst_score = np.zeros(num_tokens)
        # np.argmax takes the first maximum: ties go to the earliest window position.
        dst = [w[int(np.argmax(dst_score[w]))] for w in windows_of(grid, window)]
        u = unit(metric[b])
        best_similarity = (u @ u[dst].T).max(axis=1)
        if attention is not None:
            a = np.asarray(attention[b], np.float64)
            rank = 1.0 - a / a.mean()
        else:
            rank = best_similarity
        if priority is not None:
            rank = rank + a_d * np.asarray(priority[b], np.float64)
        out.append((dst, rank))
    return out


@SETTINGS
@given(
    st.integers(0, 2**16),
    st.sampled_from(LAYOUTS),
    st.sampled_from(["attention", "frequency", "plain"]),
    st.sampled_from([0.05, 0.5]),
)
def test_idm_matches_the_reference(seed, layout, variant, a_d):
    grid, window = layout
    num_tokens = grid[0] * grid[1]
    num_sources = num_tokens - num_tokens // (window[0] * window[1])
    count = int(0.4 * num_sources)  # a proper subset, so the ranking matters
    rng = np.random.default_rng(seed)
    metric = rng.normal(size=(2, num_tokens, 3)).astype(np.float32)
    # Small integer counters: ties inside windows are common, so the tie rule is exercised.
    priority = None if variant == "plain" else rng.integers(0, 3, size=(2, num_tokens)).astype(np.float32)
    attention = rng.dirichlet(np.ones(num_tokens), size=2).astype(np.float32) if variant == "attention" else None
    plan = _idm(
        jnp.asarray(metric), count, grid=grid, window=window, a_d=a_d,
        priority=None if priority is None else jnp.asarray(priority),
        attention=None if attention is None else jnp.asarray(attention),
    )
    for b, (dst, rank) in enumerate(reference_idm(metric, grid, window, priority, attention, a_d)):
        bipartite_reference_check(plan, b, metric[b], dst, rank, count)


def test_attention_destinations_and_inattentive_sources():
    # 4x4 grid, one window per 2x2 block; the most attended token of each window is the destination.
    rng = np.random.default_rng(0)
    metric = jnp.asarray(rng.normal(size=(1, 16, 4)), jnp.float32)
    attention = np.full((1, 16), 0.05, np.float32)
    attention[0, [5, 2, 13, 15]] = 0.2  # destinations: one per window
    attention[0, [0, 3]] = 0.0  # the least attended sources merge first
    plan = _idm(metric, 2, grid=(4, 4), attention=jnp.asarray(attention))
    assert sorted(np.asarray(plan.src_index[0]).tolist()) == [0, 3]
    joined = set(np.asarray(plan.keep_index[0])[np.asarray(plan.src_slot[0])].tolist())
    assert joined <= {5, 2, 13, 15}


def test_source_joins_most_similar_destination_anywhere():
    # Token 1 (window of 0, 1, 4, 5) nearly copies token 15, the destination of another window:
    # it is the best-matched source and must join 15, not its own window's destination 0.
    rng = np.random.default_rng(3)
    metric = rng.normal(size=(1, 16, 32)).astype(np.float32)
    metric[0, 1] = metric[0, 15] + 0.01 * rng.normal(size=32)
    priority = np.zeros((1, 16), np.float32)
    priority[0, 15] = 1.0  # 15 is its window's destination; elsewhere the top-left token
    plan = _idm(jnp.asarray(metric), 1, grid=(4, 4), priority=jnp.asarray(priority), a_d=0.0)
    groups = [sorted(g) for g in plan_groups(plan, 0) if len(g) > 1]
    assert groups == [[1, 15]]


def test_without_attention_or_priority_destinations_are_top_left():
    rng = np.random.default_rng(2)
    metric = rng.normal(size=(1, 16, 3)).astype(np.float32)
    plan = _idm(jnp.asarray(metric), 12, grid=(4, 4))  # every source merges
    assert sorted(np.asarray(plan.keep_index[0]).tolist()) == [0, 2, 8, 10]
    u = unit(metric[0])
    for group in plan_groups(plan, 0):
        for token in group[1:]:
            assert np.argmax(u[token] @ u[[0, 2, 8, 10]].T) == [0, 2, 8, 10].index(group[0])


def test_inattentiveness_is_one_minus_attention_over_its_mean():
    a = jnp.array([[0.1, 0.3, 0.0, 0.4], [0.0, 0.0, 0.0, 0.0]])
    np.testing.assert_allclose(inattentiveness(a), [[0.5, -0.5, 1.0, -1.0], [1.0, 1.0, 1.0, 1.0]], rtol=1e-6)


@pytest.mark.parametrize(
    "count, grid, tokens, message",
    [
        (13, (4, 4), 16, r"outside \[0, 12\]: one destination per window leaves 12 sources"),
        (3, (3, 4), 12, "window 2x2 does not tile the 3x4 token grid"),
        (-1, (4, 4), 16, "outside"),
    ],
)
def test_idm_errors(count, grid, tokens, message):
    with pytest.raises(ValueError, match=message):
        sdtm.idm_plan(jnp.ones((1, tokens, 2)), count, grid=grid)


def test_attention_ranked_plans_match_only_the_merging_sources():
    """Ranked by attention, only the merge_count chosen sources get a similarity row ([R, W] per
    row); ranked by similarity, every token needs one ([N, W])."""
    metric, attention = jnp.ones((2, 24, 3)), jnp.ones((2, 24))

    def similarity_shapes(text):
        return [line.split("->")[-1].strip() for line in text.splitlines() if "dot_general" in line]

    by_attention = jax.jit(lambda m, a: sdtm.idm_plan(m, 5, grid=(4, 6), attention=a)).lower(metric, attention)
    by_similarity = jax.jit(lambda m: sdtm.idm_plan(m, 5, grid=(4, 6))).lower(metric)
    assert similarity_shapes(by_attention.as_text()) == ["tensor<2x5x6xf32>"]
    assert similarity_shapes(by_similarity.as_text()) == ["tensor<2x24x6xf32>"]
