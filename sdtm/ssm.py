"""SSM, the structure stage of SDTM: merge whole windows of mutually similar tokens.

The grid is cut into s x s windows. A window's score is the mean cosine similarity between
its distinct tokens (self-pairs excluded; the release divides by K^2 with the diagonal in,
which ranks the same but weights a_s differently) plus a_s times the window's mean frequency
priority. The top merge_count // (K-1) windows each collapse to one token, their mean;
unmerge copies the result back to all K positions. Used for attention and MLP inputs alike.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sdtm.frequency import FREQUENCY_MODES
from sdtm.merger import MergeState, advance_counters, check_state, state_priority
from sdtm.ops import (
    MergePlan,
    as_pair,
    check_merge_count,
    checked_windows,
    identity_plan,
    invert_order,
    token_window_position,
    unit_tokens,
    window_sum,
    window_tokens,
)


def window_similarity(metric: jax.Array, grid: tuple[int, int], window: tuple[int, int]) -> jax.Array:
    """Mean pairwise cosine similarity of distinct tokens in each window: [B, N, C] -> [B, W].

    Uses sum_{i != j} <u_i, u_j> = |sum_i u_i|^2 - sum_i |u_i|^2, which costs K*C per window
    instead of K^2*C, and needs only window sums (a reshape, no gather).
    """
    k = window[0] * window[1]
    unit = unit_tokens(metric)  # (B, N, C)
    total = window_sum(unit, grid, window)  # (B, W, C)
    all_pairs = jnp.sum(total * total, axis=-1)  # (B, W)
    self_pairs = window_sum(jnp.sum(unit * unit, axis=-1), grid, window)  # (B, W): K, less zero tokens
    return (all_pairs - self_pairs) / (k * (k - 1))


def ssm_plan(
    metric: jax.Array,
    merge_count: int,
    *,
    grid: tuple[int, int],
    window: tuple[int, int] = (2, 2),
    priority: jax.Array | None = None,
    a_s: float = 0.05,
) -> MergePlan:
    """Structure-stage plan: merge the best merge_count // (K-1) windows into their means.

    metric [B, N, C] (N = H*W, row-major); merge_count a Python int, a multiple of K-1 (each
    window removes K-1 tokens) and at most num_windows * (K-1); priority [B, N] the frequency
    priority (None: similarity only). Each selected window's slot is seeded by its top-left
    token. Windows are chosen per batch element (ties: lower window index first).
    """
    batch, num_tokens, _ = metric.shape
    windows = checked_windows(num_tokens, grid, window)  # (W, K) NumPy
    grid, window = as_pair(grid), as_pair(window)
    num_windows, k = windows.shape
    merge_count = check_merge_count(
        merge_count, num_windows * (k - 1), f"{num_windows} windows of {k} tokens remove at most that many"
    )
    if merge_count % (k - 1):
        raise ValueError(
            f"SSM merge_count {merge_count} is not a multiple of {k - 1}: each {window[0]}x{window[1]} "
            f"window removes {k - 1} tokens; use {merge_count // (k - 1) * (k - 1)}"
        )
    if merge_count == 0:
        return identity_plan(batch, num_tokens)
    score = window_similarity(metric, grid, window)  # (B, W)
    if priority is not None:
        score = score + (a_s / k) * window_sum(priority.astype(jnp.float32), grid, window)
    return window_plan(score, merge_count // (k - 1), grid, window)


def window_plan(score: jax.Array, merged: int, grid: tuple[int, int], window: tuple[int, int]) -> MergePlan:
    """The plan that merges the `merged` best-scoring windows (score f32 [B, W]; ties: the lower
    window index first) into one slot each, seeded by the window's top-left token.

    Slots come in window rank order: first the merged windows, then every token of the other
    windows, window by window (the layout `sdtm.ops.merge_windows` relies on). One sort of the
    W window scores and one scatter to invert it; the rest is arithmetic on static tables.
    """
    batch, num_windows = score.shape
    table = window_tokens(grid, window)  # (W, K) NumPy
    k = table.shape[1]
    order = jnp.argsort(-score, axis=1, stable=True).astype(jnp.int32)  # (B, W) windows, best first
    rank = invert_order(order)  # (B, W): where each window landed in `order`
    tokens_of = jnp.asarray(table)[order]  # (B, W, K): each ranked window's tokens
    token_window, token_pos = token_window_position(grid, window)  # (N,) each, NumPy
    token_rank = rank[:, token_window]  # (B, N)
    slots = num_windows * k - merged * (k - 1)
    return MergePlan(
        keep_index=jnp.concatenate([tokens_of[:, :merged, 0], tokens_of[:, merged:].reshape(batch, -1)], axis=1),
        src_index=tokens_of[:, :merged, 1:].reshape(batch, -1),
        src_slot=jnp.broadcast_to(jnp.repeat(jnp.arange(merged, dtype=jnp.int32), k - 1), (batch, merged * (k - 1))),
        slot_scale=jnp.broadcast_to(jnp.where(jnp.arange(slots) < merged, 1.0 / k, 1.0), (batch, slots)),
        token_slot=jnp.where(token_rank < merged, token_rank, merged + (token_rank - merged) * k + token_pos),
        windows=(grid, window),
    )


@dataclasses.dataclass(frozen=True)
class SSMMerger:
    """Block merger of the structure stage: one SSM plan for attention and MLP.

    frequency: "independent", "merged" or None (see sdtm.frequency); the counters are updated
    on every call that merges.
    """

    merge_count: int
    window: tuple[int, int] = (2, 2)
    a_s: float = 0.05
    frequency: str | None = "independent"

    plan_every: int = 1  # blocks sharing one plan (see SDTMConfig.plan_every)
    proportional_attention: bool = False  # merged keys' logits + log(group size)

    needs_key_attention = False

    def __post_init__(self):
        object.__setattr__(self, "window", as_pair(self.window))  # hashable, for jit
        if self.frequency is not None and self.frequency not in FREQUENCY_MODES:
            raise ValueError(f"frequency must be one of {FREQUENCY_MODES} or None, got {self.frequency!r}")

    def build(
        self, metric: jax.Array, state: MergeState, *, grid: tuple[int, int], key_attention=None
    ) -> tuple[MergePlan | None, MergePlan | None, MergeState]:
        """One window plan for both attention and MLP (`ssm_plan`): see `BlockMerger.build`."""
        check_state(state, metric)
        if self.merge_count == 0:
            return None, None, state
        plan = ssm_plan(
            metric, self.merge_count, grid=grid, window=self.window,
            priority=state_priority(state, self.frequency), a_s=self.a_s,
        )
        return plan, plan, advance_counters(state, plan, self.frequency)
