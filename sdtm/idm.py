"""IDM, the detail stage of SDTM: merge inattentive tokens into similar attentive ones (MLP only).

Each window keeps one destination: the token that receives the most attention in it (the
paper) or, without attention, the token with the highest frequency priority (the official
release's "fake IDM"; ties to the first position). Every other token is a source matched to
its most cosine-similar destination anywhere on the grid. Sources are ranked and the top
merge_count join their destinations (mean including the destination):

  with attention:    rank = inattentiveness + a_d * P_fre,  inattentiveness = 1 - a / mean(a)
  without attention: rank = best similarity + a_d * P_fre   (the release ranks by similarity
                     alone; a_d = 0 reproduces that)
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
    best_destinations,
    check_merge_count,
    check_merge_sum,
    checked_windows,
    identity_plan,
    merge_top_sources,
    plan_for_sources,
    rank_sources,
    to_windows,
    window_destinations,
)

IDM_SCORES = ("attention", "frequency")


def inattentiveness(key_attention: jax.Array) -> jax.Array:
    """[B, N] attention received -> 1 - a / mean(a) per sample (0 at average attention,
    up to 1 for a token nobody attends to). An all-zero row gives 1 everywhere."""
    a = key_attention.astype(jnp.float32)
    mean = jnp.mean(a, axis=1, keepdims=True)
    return 1.0 - a / jnp.where(mean > 0, mean, 1.0)


def idm_plan(
    metric: jax.Array,
    merge_count: int,
    *,
    grid: tuple[int, int],
    window: tuple[int, int] = (2, 2),
    priority: jax.Array | None = None,
    attention: jax.Array | None = None,
    a_d: float = 0.05,
    merge_sum: str = "scatter",
) -> MergePlan:
    """Detail-stage plan. metric [B, N, C]; priority, attention [B, N] or None.

    merge_count (a Python int) is at most N - num_windows, the number of sources. With
    `attention` the destinations are each window's most attended token and sources rank by
    inattentiveness; without it the destinations follow `priority` (top-left when that is None
    too) and sources rank by similarity to their destination. Ties go to the lower index.
    merge_sum: how `merge` sums the plan's sources, "scatter" or "matmul" (see MergePlan).
    """
    check_merge_sum(merge_sum)
    batch, num_tokens, _ = metric.shape
    windows = checked_windows(num_tokens, grid, window)  # (W, K) NumPy
    num_windows, k = windows.shape
    merge_count = check_merge_count(
        merge_count, num_tokens - num_windows, f"one destination per window leaves {num_tokens - num_windows} sources"
    )
    if merge_count == 0:
        return identity_plan(batch, num_tokens)
    if attention is not None:
        dst_score = attention.astype(jnp.float32)
    elif priority is not None:
        dst_score = priority.astype(jnp.float32)
    else:
        dst_score = jnp.zeros((batch, num_tokens), jnp.float32)
    grid, window = as_pair(grid), as_pair(window)
    dst_pos = jnp.argmax(to_windows(dst_score, grid, window), axis=-1)  # (B, W), first position on ties
    is_dst, dst_token = window_destinations(dst_pos, grid, window)
    bonus = 0.0 if priority is None else a_d * priority.astype(jnp.float32)
    if attention is None:  # sources rank by their similarity: every token needs its best match
        best_similarity, best_dst = best_destinations(metric, dst_token)  # (B, N)
        return merge_top_sources(is_dst, best_dst, best_similarity + bonus, merge_count, num_windows, merge_sum)
    # Ranked by attention, the sources are chosen before any similarity: only the merge_count
    # merging ones need a destination (a [R, W] similarity per row instead of [N, W]).
    order = rank_sources(is_dst, inattentiveness(attention) + bonus)  # (B, N), the merging first
    _, dst_of_merging = best_destinations(metric, dst_token, among=order[:, :merge_count])
    return plan_for_sources(order, dst_of_merging, merge_sum, num_windows)


@dataclasses.dataclass(frozen=True)
class IDMMerger:
    """Block merger of the detail stage: no attention plan, an IDM plan for the MLP.

    score: "attention" (the paper; the block must pass key_attention) or "frequency" (the
    release). frequency: "independent", "merged" or None.
    """

    merge_count: int
    window: tuple[int, int] = (2, 2)
    a_d: float = 0.05
    frequency: str | None = "independent"
    score: str = "attention"
    plan_every: int = 1  # blocks sharing one plan (see SDTMConfig.plan_every)
    merge_sum: str = "scatter"  # see MergePlan

    def __post_init__(self):
        object.__setattr__(self, "window", as_pair(self.window))  # hashable, for jit
        check_merge_sum(self.merge_sum)
        if self.frequency is not None and self.frequency not in FREQUENCY_MODES:
            raise ValueError(f"frequency must be one of {FREQUENCY_MODES} or None, got {self.frequency!r}")
        if self.score not in IDM_SCORES:
            raise ValueError(f"idm score must be one of {IDM_SCORES}, got {self.score!r}")

    @property
    def needs_key_attention(self) -> bool:
        return self.score == "attention" and self.merge_count > 0

    def build(
        self,
        metric: jax.Array,
        state: MergeState,
        *,
        grid: tuple[int, int],
        key_attention: jax.Array | None = None,
    ) -> tuple[None, MergePlan | None, MergeState]:
        """No attention plan, the MLP plan from `idm_plan` (ranked by `key_attention` when
        score="attention"): see `BlockMerger.build`."""
        check_state(state, metric)
        if self.merge_count == 0:
            return None, None, state
        attention = None
        if self.score == "attention":
            if key_attention is None:
                raise ValueError("IDMMerger(score='attention') needs key_attention [B, N] from the block")
            attention = key_attention
        plan = idm_plan(
            metric, self.merge_count, grid=grid, window=self.window,
            priority=state_priority(state, self.frequency), attention=attention, a_d=self.a_d,
            merge_sum=self.merge_sum,
        )
        return None, plan, advance_counters(state, plan, self.frequency)
