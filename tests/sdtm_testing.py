"""Shared helpers for the sdtm tests: plain NumPy readings of a MergePlan and of top-k choices."""

from __future__ import annotations

import numpy as np

# Score gaps below this are treated as ties: the NumPy references rank in float64, the plans
# in float32, so near-ties may legitimately order either way.
TIE_TOLERANCE = 1e-4


def windows_of(grid: tuple[int, int], window: tuple[int, int]) -> list[list[int]]:
    """Token ids of each window, windows row-major, positions row-major (written out plainly)."""
    height, width = grid
    win_h, win_w = window
    out = []
    for wy in range(height // win_h):
        for wx in range(width // win_w):
            out.append([(wy * win_h + dy) * width + wx * win_w + dx for dy in range(win_h) for dx in range(win_w)])
    return out


def unit(metric: np.ndarray) -> np.ndarray:
    metric = np.asarray(metric, np.float64)
    return metric / np.maximum(np.linalg.norm(metric, axis=-1, keepdims=True), 1e-6)


def plan_groups(plan, row: int) -> list[list[int]]:
    """The groups of batch row `row`, one per slot in slot order, each listing its tokens
    (seed first, then its sources ascending), read from token_slot alone."""
    token_slot = np.asarray(plan.token_slot[row])
    keep = np.asarray(plan.keep_index[row])
    groups = [[int(t)] for t in keep]
    for token, slot in enumerate(token_slot.tolist()):
        if token != keep[slot]:
            groups[slot].append(token)
    return groups


def check_partition(plan, batch: int, num_tokens: int, merge_count: int) -> None:
    """Every token in exactly one group; keep/src/token_slot/slot_scale all consistent."""
    num_slots = num_tokens - merge_count
    keep = np.asarray(plan.keep_index)
    src = np.asarray(plan.src_index)
    src_slot = np.asarray(plan.src_slot)
    token_slot = np.asarray(plan.token_slot)
    scale = np.asarray(plan.slot_scale)
    assert keep.shape == (batch, num_slots) and scale.shape == (batch, num_slots)
    assert src.shape == (batch, merge_count) and src_slot.shape == (batch, merge_count)
    assert token_slot.shape == (batch, num_tokens)
    assert plan.merge_count == merge_count
    for b in range(batch):
        assert sorted(np.concatenate([keep[b], src[b]]).tolist()) == list(range(num_tokens))
        np.testing.assert_array_equal(token_slot[b, keep[b]], np.arange(num_slots))
        np.testing.assert_array_equal(token_slot[b, src[b]], src_slot[b])
        sizes = np.bincount(token_slot[b], minlength=num_slots)
        np.testing.assert_allclose(scale[b], 1.0 / sizes, rtol=1e-7)
    if plan.dst_slots is not None:  # the promise merge_matmul relies on
        assert (src_slot >= num_slots - plan.dst_slots).all()


def assert_top_k(chosen, scores: np.ndarray, k: int, tol: float = TIE_TOLERANCE) -> None:
    """`chosen` (k indices) is a top-k of `scores` up to ties within `tol`: nothing left out
    beats anything chosen by more than tol."""
    chosen = np.asarray(chosen)
    assert chosen.size == k and len(set(chosen.tolist())) == k
    if k == 0 or k == scores.size:
        return
    mask = np.zeros(scores.size, bool)
    mask[chosen] = True
    assert scores[mask].min() >= scores[~mask].max() - tol, (scores[mask].min(), scores[~mask].max())


def group_means(x: np.ndarray, groups: list[list[int]]) -> np.ndarray:
    """x [N, C] -> [len(groups), C]: the mean of each group, in float64."""
    x = np.asarray(x, np.float64)
    return np.stack([x[g].mean(axis=0) for g in groups])


def bipartite_reference_check(
    plan, row: int, metric_row: np.ndarray, dst_tokens: list[int], rank: np.ndarray, merge_count: int
) -> None:
    """Check a bipartite plan (IDM/ToMe) against the plain algorithm for one batch row.

    dst_tokens: the destination of each window (reference); rank [N]: the reference ranking
    score of every token as a source (only sources are read). Checks: destinations never merge
    as sources, every merged source joins a destination that is (up to ties) its most similar,
    and the merged sources are a top-merge_count of the rank among all sources.
    """
    u = unit(metric_row)
    dst = np.asarray(dst_tokens)
    sources = np.setdiff1d(np.arange(u.shape[0]), dst)
    keep = np.asarray(plan.keep_index[row])
    merged = np.asarray(plan.src_index[row])
    joined = keep[np.asarray(plan.src_slot[row])]  # the seed (destination) each source joins
    assert set(dst.tolist()) <= set(keep.tolist()), "a window's destination was merged away"
    assert set(joined.tolist()) <= set(dst.tolist()), "a source joined a token that is not a destination"
    similarity = u[merged] @ u[dst].T  # (R, W)
    chosen_sim = np.einsum("rc,rc->r", u[merged], u[joined])
    np.testing.assert_array_less(similarity.max(axis=1) - TIE_TOLERANCE, chosen_sim + 1e-12)
    position = {int(t): i for i, t in enumerate(sources)}
    assert_top_k([position[int(t)] for t in merged], rank[sources], merge_count)
