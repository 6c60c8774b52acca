"""A block's gated branches under merge plans, shared by the DiT and PixArt blocks.

A branch is gate (B, D) * unmerge(plan, f(merge(plan, h))) for h (B, N, D): f is the
self-attention (`attention_branch`, which also asks the merger for the block's plans), the MLP
(`mlp_branch`) or PixArt's ungated cross-attention to the caption (`cross_attention_branch`).
With SDTM's protected-step cache (the official release's extras), merged tokens blend their
output with the branch's output at the last full-resolution step (`sdtm.ops.blend_merged`;
cache[0] self-attention, cache[1] MLP, cache[2] cross-attention). When they take the cache whole
(cache_weight 0) and the plan merges whole windows (SSM), the merged windows' outputs would be
thrown away, so they are never computed: the MLP and the cross-attention run on the lone slots
only, and only the lone slots query in the self-attention (the merged windows stay its keys and
values).
"""

from __future__ import annotations

import jax
from flax import nnx

from dit_jax.nn.attention import build_plans, merged_key_bias, merged_self_attention
from sdtm.merger import BlockMerger, MergeState
from sdtm.ops import MergePlan, apply_to_lone_tokens, blend_merged, merge, unmerge, unmerge_lone


def gated_branch(gate, out, plan, cache, index: int, cache_weight: float) -> jax.Array:
    """gate (B, D) * a block's branch output (B, N, D); with a protected-step cache (2, B, N, D),
    merged tokens blended with cache[index] (the release's `mcw`, see `sdtm.ops.blend_merged`)."""
    branch = gate[:, None] * out
    return branch if cache is None else blend_merged(plan, branch, cache[index], cache_weight)


def lone_slots_only(plan: MergePlan | None, cache: jax.Array | None, cache_weight: float) -> bool:
    """Whether a branch needs its lone slots only: merged tokens take the cache whole
    (cache_weight 0) and the plan's merged windows lead its slots (SSM, `MergePlan.windows`)."""
    return (cache is not None and cache_weight == 0.0 and plan is not None and plan.windows is not None
            and plan.merge_count > 0)


def attention_branch(
    attn: nnx.Module,
    h: jax.Array,  # (B, N, D) the block's modulated input, also the merge metric
    gate: jax.Array,  # (B, D)
    merger: BlockMerger | None,
    state: MergeState | None,
    grid: tuple[int, int] | None,
    plans: tuple | None = None,
    cache: jax.Array | None = None,
    cache_weight: float = 1.0,
) -> tuple[jax.Array, tuple, MergeState | None]:
    """A block's gated self-attention branch -> (branch (B, N, D), (attn_plan, mlp_plan), state).

    gate * `merged_self_attention(...)`, merged tokens blended with cache[0] as `gated_branch`
    does. When `lone_slots_only`, the merged windows' queries are skipped: only the lone slots
    query all merged slots, and the windows' tokens read cache[0] (the same result).
    """
    if plans is None and merger is not None and not merger.needs_key_attention:
        plans, state = build_plans(merger, h, state, grid)  # the plan first: it may spare queries
    if plans is not None and lone_slots_only(plans[0], cache, cache_weight):
        attn_plan = plans[0]
        out = attn(merge(attn_plan, h), bias=merged_key_bias(merger, attn_plan), query_start=attn_plan.merged_windows)
        return unmerge_lone(attn_plan, gate[:, None] * out, cache[0]), plans, state
    out, plans, state = merged_self_attention(attn, h, merger, state, grid, plans)
    return gated_branch(gate, out, plans[0], cache, 0, cache_weight), plans, state


def mlp_branch(
    mlp: nnx.Module,
    h: jax.Array,  # (B, N, D)
    gate: jax.Array,  # (B, D)
    plan: MergePlan | None,
    cache: jax.Array | None,  # (branches, B, N, D)
    cache_weight: float,
) -> jax.Array:
    """A block's gated MLP branch under a merge plan: gate (B, D) * unmerge(mlp(merge(h (B, N, D)))),
    merged tokens blended with the protected-step cache (cache[1]) as `gated_branch` does; when
    `lone_slots_only`, the MLP runs on the lone slots only (`sdtm.ops.apply_to_lone_tokens`)."""
    if lone_slots_only(plan, cache, cache_weight):
        return apply_to_lone_tokens(plan, lambda tokens: gate[:, None] * mlp(tokens), h, cache[1])
    return gated_branch(gate, unmerge(plan, mlp(merge(plan, h))), plan, cache, 1, cache_weight)


def cross_attention_branch(
    cross_attn: nnx.Module,
    x: jax.Array,  # (B, N, D) queries
    text: jax.Array,  # (B, L, D) keys and values
    text_bias: jax.Array,  # broadcastable to (B, heads, N, L)
    plan: MergePlan | None,
    cache: jax.Array | None,  # (3, B, N, D)
    cache_weight: float,
) -> jax.Array:
    """PixArt's cross-attention branch (B, N, D): x's tokens (B, N, D) query the caption text
    (B, L, D) under `plan` (the self-attention's; the caption is never merged), merged tokens
    blended with the protected-step cache (cache[2]) as `gated_branch` does, without a gate.
    When `lone_slots_only`, only the lone slots query (each query reads the same caption, so
    this is `sdtm.ops.apply_to_lone_tokens`)."""
    if lone_slots_only(plan, cache, cache_weight):
        return apply_to_lone_tokens(plan, lambda tokens: cross_attn(tokens, text, text_bias), x, cache[2])
    out = unmerge(plan, cross_attn(merge(plan, x), text, text_bias))
    return out if cache is None else blend_merged(plan, out, cache[2], cache_weight)
