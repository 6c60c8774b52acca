"""ToMe for Stable Diffusion (Bolya & Hoffman, 2023) as a static-shape plan: the baseline.

One destination per window, at a random position shared by the whole batch (so the CFG halves
merge alike) or the top-left one; every other token is a source matched to its most
cosine-similar destination; the merge_count most similar sources join their destinations
(mean including the destination). Merges attention inputs by default.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from sdtm.merger import MergeState, check_state
from sdtm.ops import (
    MergePlan,
    as_pair,
    check_merge_count,
    check_merge_sum,
    checked_windows,
    best_destinations,
    identity_plan,
    merge_top_sources,
    window_destinations,
)


def tome_plan(
    metric: jax.Array,
    merge_count: int,
    *,
    grid: tuple[int, int],
    window: tuple[int, int] = (2, 2),
    key: jax.Array | None = None,
    merge_sum: str = "scatter",
) -> MergePlan:
    """ToMe-for-SD plan. metric [B, N, C]; merge_count (a Python int) at most N - num_windows.

    key: PRNG key drawing each window's destination position (one draw for the whole batch);
    None puts every destination at the window's top-left token.
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
    if key is None:
        dst_pos = jnp.zeros((num_windows,), jnp.int32)
    else:
        dst_pos = jax.random.randint(key, (num_windows,), 0, k, dtype=jnp.int32)
    grid, window = as_pair(grid), as_pair(window)
    is_dst, dst_token = window_destinations(jnp.broadcast_to(dst_pos, (batch, num_windows)), grid, window)
    best_similarity, best_dst = best_destinations(metric, dst_token)  # (B, N)
    return merge_top_sources(is_dst, best_dst, best_similarity, merge_count, num_windows, merge_sum)


@dataclasses.dataclass(frozen=True)
class ToMeMerger:
    """Block merger for ToMe-for-SD: the same plan for attention and/or MLP.

    random: draw destinations from the state's key, which is split on every call (so each
    block and step draws anew, reproducibly). An odd batch always uses top-left destinations,
    as ToMeSD does: then the CFG halves run in separate calls, and ToMeSD found that different
    random destinations for the two halves make artifacts.
    """

    merge_count: int
    window: tuple[int, int] = (2, 2)
    random: bool = True
    merge_attn: bool = True
    merge_mlp: bool = False

    plan_every: int = 1  # blocks sharing one plan (see SDTMConfig.plan_every)
    proportional_attention: bool = False  # merged keys' logits + log(group size)
    merge_sum: str = "scatter"  # see MergePlan

    needs_key_attention = False

    def __post_init__(self):
        object.__setattr__(self, "window", as_pair(self.window))  # hashable, for jit
        check_merge_sum(self.merge_sum)

    def build(
        self, metric: jax.Array, state: MergeState, *, grid: tuple[int, int], key_attention=None
    ) -> tuple[MergePlan | None, MergePlan | None, MergeState]:
        """The `tome_plan` for attention and / or MLP (merge_attn, merge_mlp), destinations drawn
        from the state's key when random: see `BlockMerger.build`."""
        check_state(state, metric)
        if self.merge_count == 0 or not (self.merge_attn or self.merge_mlp):
            return None, None, state
        draw = None
        if self.random and metric.shape[0] % 2 == 0:
            next_key, draw = jax.random.split(state["key"])
            state = {**state, "key": next_key}
        plan = tome_plan(metric, self.merge_count, grid=grid, window=self.window, key=draw, merge_sum=self.merge_sum)
        return (plan if self.merge_attn else None), (plan if self.merge_mlp else None), state
