"""The contract between a transformer block and a merging strategy.

A block never knows which strategy runs. For each sampling phase the schedule yields one
`BlockMerger` (a frozen, hashable dataclass: static under `jit`, so its merge counts are Python
ints). The block hands it its own modulated input (the metric) and the merge state that travels
through the blocks and the steps, and gets back the plan for attention, the plan for the MLP and
the new state:

    attn_plan, mlp_plan, state = merger.build(metric, state, grid=(H, W), key_attention=None)

A strategy that ranks tokens by the attention they receive sets `needs_key_attention`; the block
then runs attention on all tokens first and passes `key_attention` [B, N] (the mean attention
probability each key receives), and such a strategy must return `attn_plan=None`.

The strategies: `NoMerger` (here), `SSMMerger` (sdtm.ssm), `IDMMerger` (sdtm.idm),
`ToMeMerger` (sdtm.tome).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Protocol

import jax
import jax.numpy as jnp

from sdtm.frequency import frequency_priority, update_counter
from sdtm.ops import MergePlan, merged_mask

# The merge state (`init_state` makes it): {"counter": float32 [B, N] frequency-priority
# counters, "key": a PRNG key}, a plain dict so that it is a pytree.
MergeState = dict


def init_state(batch: int, num_tokens: int, key: jax.Array | None = None) -> MergeState:
    """Fresh merge state: all counters zero. `key` seeds strategies that draw random destinations."""
    if key is None:
        key = jax.random.key(0)
    return {"counter": jnp.zeros((batch, num_tokens), jnp.float32), "key": key}


class BlockMerger(Protocol):
    """What a block asks of a merging strategy (the module docstring has the contract)."""

    needs_key_attention: bool

    def build(
        self,
        metric: jax.Array,  # (B, N, C)
        state: MergeState,
        *,
        grid: tuple[int, int],
        key_attention: jax.Array | None = None,  # (B, N)
    ) -> tuple[MergePlan | None, MergePlan | None, MergeState]:
        """One block's (attention plan, MLP plan, new state) from its metric; None: that branch
        sees every token."""
        ...


@dataclasses.dataclass(frozen=True)
class NoMerger:
    """A phase that merges nothing: both plans None, the state untouched (counters included:
    a call that makes no merge decision does not age them, as in the release)."""

    needs_key_attention: ClassVar[bool] = False

    def build(self, metric, state, *, grid, key_attention=None):
        """(None, None, state): see `BlockMerger.build`."""
        return None, None, state


def check_state(state: MergeState, metric: jax.Array) -> None:
    """Trace-time check that the state's counters match the metric's [B, N]."""
    if not isinstance(state, dict) or "counter" not in state or "key" not in state:
        raise ValueError("merge state must be sdtm.init_state(batch, num_tokens, key), a dict with 'counter' and 'key'")
    want = metric.shape[:2]
    if tuple(state["counter"].shape) != tuple(want):
        raise ValueError(
            f"merge state counters have shape {tuple(state['counter'].shape)} but the metric has "
            f"(batch, tokens) = {tuple(want)}; make the state with sdtm.init_state{tuple(want)}"
        )


def state_priority(state: MergeState, frequency: str | None) -> jax.Array | None:
    """P_fre [B, N] from the state's counters, or None when the priority is off."""
    return None if frequency is None else frequency_priority(state["counter"])


def advance_counters(state: MergeState, plan: MergePlan, frequency: str | None) -> MergeState:
    """The state after one merging call: counters updated from who `plan` merged."""
    if frequency is None:
        return state
    batch, num_tokens = state["counter"].shape
    counter = update_counter(state["counter"], merged_mask(plan, batch, num_tokens), frequency)
    return {**state, "counter": counter}


@dataclasses.dataclass(frozen=True)
class BatchParallel:
    """`inner`'s plans built on every device from its own rows of a batch split over `mesh`'s
    `axis` (`jax.shard_map`). Plans, counters and key attention are per row, so this computes
    the same as `inner` alone, without the cross-device gathers XLA's partitioner inserts around
    sorts and row-indexed scatters. A batch whose rows do not split evenly, or whose per-device
    row count has another parity than the whole batch's (ToMe's destinations depend on it), is
    built by `inner` over the whole batch.
    """

    inner: BlockMerger
    mesh: jax.sharding.Mesh
    axis: str = "data"

    @property
    def needs_key_attention(self) -> bool:
        return self.inner.needs_key_attention

    @property
    def plan_every(self) -> int:
        return getattr(self.inner, "plan_every", 1)

    @property
    def proportional_attention(self) -> bool:
        return getattr(self.inner, "proportional_attention", False)

    def build(self, metric, state, *, grid, key_attention=None):
        """`inner.build` per device on its rows: see `BlockMerger.build`."""
        devices = self.mesh.shape[self.axis]
        batch = metric.shape[0]
        if batch % devices or (batch // devices) % 2 != batch % 2:
            return self.inner.build(metric, state, grid=grid, key_attention=key_attention)
        rows, everywhere = jax.sharding.PartitionSpec(self.axis), jax.sharding.PartitionSpec()

        def local(metric, counter, key, key_attention):
            attn_plan, mlp_plan, new = self.inner.build(
                metric, {**state, "counter": counter, "key": key}, grid=grid, key_attention=key_attention
            )
            return attn_plan, mlp_plan, new["counter"], new["key"]

        args = (metric, state["counter"], state["key"], key_attention)
        # Which plans exist (None or a MergePlan) is static: learn it from the shapes alone.
        attn_plan, mlp_plan, _, _ = jax.eval_shape(local, *args)

        def spec(plan):
            return None if plan is None else jax.tree.map(lambda _: rows, plan)

        in_specs = (rows, rows, everywhere, None if key_attention is None else rows)
        out_specs = (spec(attn_plan), spec(mlp_plan), rows, everywhere)
        attn_plan, mlp_plan, counter, key = jax.shard_map(
            local, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs
        )(*args)
        return attn_plan, mlp_plan, {**state, "counter": counter, "key": key}
