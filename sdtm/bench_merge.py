"""Micro-benchmark of the merge op's implementations and of plan building.

    python -m sdtm.bench_merge                      # CPU, B=2, C=1152, N in 256/1024/4096
    python -m sdtm.bench_merge --tokens 1024 --dtype bfloat16

Each row starts with what building the plan runs ("plan ops": the ops of the plan compiled for
this device, each a kernel launch on a GPU, and how many of them sort or scatter), then times
the build and the merge variants. Every variant computes `sdtm.merge` up to round-off
(tests/test_ops.py checks that they agree):
  offsets      sdtm.merge: seeds + (token - seed) / group size summed per group, exact when a
               group's tokens are equal; for SSM's window plans the merged windows' tokens
               gathered and averaged (sdtm.ops.merge_windows), for the others as `scatter`
  grid_means   SSM plans only: every window of the grid averaged in place, the merged ones
               gathered (what merge_windows did before)
  scatter      sdtm.ops.merge_scatter: the scatter-added (source - seed) / group size, one
               more gather of R rows than sum_scatter; the scatter vmapped over rows (so XLA
               can split it over devices with the batch). On SSM plans: what merge_windows saves.
               Below float32 only the W destination slots of IDM and ToMe plans go to float32
  all_slots    the same with every slot copied to float32 (merge_scatter's float32 path; what
               it did at every dtype before)
  matmul       sdtm.ops.merge_matmul: the same offsets summed by a 0/1 [B, D, R] matrix product
               (merge_sum="matmul" in SDTMConfig / ToMeConfig): no scatter, 2*D*R*C FLOPs, D the
               W destinations of IDM and ToMe plans, all M slots of SSM's
  row_indexed  the same with one scatter indexed by [row, slot] pairs (what sdtm.merge did
               before: XLA gathers it across devices when the batch is sharded)
  sum_scatter  seeds + scatter-added sources, times 1/group size (one gather of R rows fewer)
  segment_sum  one segment_sum of all N tokens by token_slot (no gathers, a scatter of N rows)
  sorted_sum   gather tokens in slot order, then a sorted segment_sum (the order would have to
               be a new plan field; here it is precomputed outside the timed function)
  one_hot      one-hot [B, N, M] matrix times x: a matmul of N*M*C (not exact on equal tokens)
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time

import jax
import jax.numpy as jnp

from dit_jax.profiling import entry_ops
from sdtm.idm import idm_plan
from sdtm.ops import MergePlan, merge, merge_matmul, merge_scatter, unmerge
from sdtm.ssm import ssm_plan
from sdtm.tome import tome_plan


def merge_offsets(plan: MergePlan, x: jax.Array) -> jax.Array:
    return merge(plan, x)


def merge_grid_means(plan: MergePlan, x: jax.Array) -> jax.Array:
    """A window plan's merge as the mean of every window of the grid (a reshape and a reduction
    over all N tokens), the merged windows' means gathered, then the other slots' tokens."""
    (height, width), (win_h, win_w) = plan.windows
    batch, _, channels = x.shape
    merged = plan.merged_windows
    blocks = x.astype(jnp.float32).reshape(batch, height // win_h, win_h, width // win_w, win_w, channels)
    seed = blocks[:, :, :1, :, :1]  # each window's top-left token, the seed of its slot
    mean = (seed + jnp.sum(blocks - seed, axis=(2, 4), keepdims=True) * (1.0 / (win_h * win_w))).reshape(batch, -1, channels)
    seeds = plan.keep_index[:, :merged]
    slot_window = (seeds // width // win_h) * (width // win_w) + seeds % width // win_w  # (B, merged)
    means = jnp.take_along_axis(mean, slot_window[..., None], axis=1).astype(x.dtype)
    return jnp.concatenate([means, jnp.take_along_axis(x, plan.keep_index[:, merged:, None], axis=1)], axis=1)


def merge_all_slots(plan: MergePlan, x: jax.Array) -> jax.Array:
    """`merge_scatter` as if any slot could be joined: every slot to float32 and back."""
    return merge_scatter(dataclasses.replace(plan, dst_slots=None), x)


def merge_row_indexed(plan: MergePlan, x: jax.Array) -> jax.Array:
    """sdtm.merge's arithmetic with one [row, slot]-indexed scatter instead of a vmapped one."""
    kept = jnp.take_along_axis(x, plan.keep_index[..., None], axis=1).astype(jnp.float32)  # (B, M, C)
    seed_of_src = jnp.take_along_axis(plan.keep_index, plan.src_slot, axis=1)  # (B, R)
    scale_of_src = jnp.take_along_axis(plan.slot_scale, plan.src_slot, axis=1)  # (B, R)
    offsets = (jnp.take_along_axis(x, plan.src_index[..., None], axis=1).astype(jnp.float32)
               - jnp.take_along_axis(x, seed_of_src[..., None], axis=1).astype(jnp.float32))
    batch = jnp.arange(x.shape[0])[:, None]
    return kept.at[batch, plan.src_slot].add(offsets * scale_of_src[..., None]).astype(x.dtype)


def merge_sum_scatter(plan: MergePlan, x: jax.Array) -> jax.Array:
    """Seeds plus the scatter-added sources, times 1/group size (not exact for equal tokens)."""
    kept = jnp.take_along_axis(x, plan.keep_index[..., None], axis=1).astype(jnp.float32)  # (B, M, C)
    sources = jnp.take_along_axis(x, plan.src_index[..., None], axis=1).astype(jnp.float32)  # (B, R, C)
    batch = jnp.arange(x.shape[0])[:, None]
    summed = kept.at[batch, plan.src_slot].add(sources)
    return (summed * plan.slot_scale[..., None]).astype(x.dtype)


def merge_segment_sum(plan: MergePlan, x: jax.Array) -> jax.Array:
    num_slots = plan.keep_index.shape[1]
    summed = jax.vmap(lambda xb, sb: jax.ops.segment_sum(xb, sb, num_segments=num_slots))(
        x.astype(jnp.float32), plan.token_slot
    )
    return (summed * plan.slot_scale[..., None]).astype(x.dtype)


def slot_order(plan: MergePlan) -> tuple[jax.Array, jax.Array]:
    """Tokens sorted by slot, and their slots (what `merge_sorted_sum` needs precomputed)."""
    order = jnp.argsort(plan.token_slot, axis=1, stable=True)
    return order, jnp.take_along_axis(plan.token_slot, order, axis=1)


def merge_sorted_sum(plan: MergePlan, x: jax.Array, order: jax.Array, sorted_slot: jax.Array) -> jax.Array:
    num_slots = plan.keep_index.shape[1]
    ordered = jnp.take_along_axis(x, order[..., None], axis=1).astype(jnp.float32)
    summed = jax.vmap(
        lambda xb, sb: jax.ops.segment_sum(xb, sb, num_segments=num_slots, indices_are_sorted=True)
    )(ordered, sorted_slot)
    return (summed * plan.slot_scale[..., None]).astype(x.dtype)


def merge_one_hot(plan: MergePlan, x: jax.Array) -> jax.Array:
    num_slots = plan.keep_index.shape[1]
    assign = jax.nn.one_hot(plan.token_slot, num_slots, dtype=x.dtype)  # (B, N, M)
    summed = jnp.einsum("bnm,bnc->bmc", assign, x, preferred_element_type=jnp.float32)
    return (summed * plan.slot_scale[..., None]).astype(x.dtype)


def _time_all(calls: dict, reps: int) -> dict[str, float]:
    """Best wall time in ms of each (fn, *args) in `calls`, after a warm-up call each. The
    variants take turns, so a busy machine slows them alike, in a new random order every
    round: in a fixed order the variant right after `build` ran up to 1.7x slower here than the
    same function later in the round (a cold cache, we think)."""
    for fn, *args in calls.values():
        jax.block_until_ready(fn(*args))
    best = dict.fromkeys(calls, float("inf"))
    rng = random.Random(0)
    for _ in range(reps):
        for name in rng.sample(list(calls), len(calls)):
            fn, *args = calls[name]
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: t * 1e3 for name, t in best.items()}


def run(tokens: list[int], batch: int, channels: int, dtype: str, reps: int, one_hot_max: int) -> None:
    print(f"device {jax.devices()[0].device_kind}, B={batch}, C={channels}, {dtype}; best of {reps}, ms")
    for num_tokens in tokens:
        side = int(num_tokens**0.5)
        grid = (side, side)
        key_m, key_x = jax.random.split(jax.random.key(num_tokens))
        metric = jax.random.normal(key_m, (batch, num_tokens, channels), jnp.float32)
        x = jax.random.normal(key_x, (batch, num_tokens, channels), jnp.float32).astype(dtype)
        count_ssm = int(num_tokens * 0.5) // 3 * 3
        count_idm = int(num_tokens * 0.4)
        builders = {
            "ssm": jax.jit(lambda m: ssm_plan(m, count_ssm, grid=grid)),
            "idm": jax.jit(lambda m: idm_plan(m, count_idm, grid=grid, attention=jnp.abs(m[..., 0]))),
            "tome": jax.jit(lambda m: tome_plan(m, count_idm, grid=grid, key=jax.random.key(0))),
        }
        for name, builder in builders.items():
            build = builder.lower(metric).compile()  # compiled once: timed, and its ops counted
            plan = build(metric)
            order, sorted_slot = jax.jit(slot_order)(plan)
            calls = {
                "build": (build, metric),
                "offsets": (jax.jit(merge_offsets), plan, x),
                "scatter": (jax.jit(merge_scatter), plan, x),
                "all_slots": (jax.jit(merge_all_slots), plan, x),
                "matmul": (jax.jit(merge_matmul), plan, x),
                "row_indexed": (jax.jit(merge_row_indexed), plan, x),
                "sum_scatter": (jax.jit(merge_sum_scatter), plan, x),
                "segment_sum": (jax.jit(merge_segment_sum), plan, x),
                "sorted_sum": (jax.jit(merge_sorted_sum), plan, x, order, sorted_slot),
            }
            if plan.windows is not None:
                calls["grid_means"] = (jax.jit(merge_grid_means), plan, x)
            if num_tokens <= one_hot_max:
                calls["one_hot"] = (jax.jit(merge_one_hot), plan, x)
            calls["unmerge"] = (jax.jit(unmerge), plan, merge(plan, x))
            row = _time_all(calls, reps)
            cells = "  ".join(f"{k} {v:8.3f}" for k, v in row.items())
            ops = entry_ops(build.as_text())
            launched = f"plan ops {ops['ops']:3d} (sorts {ops['sort']}, scatters {ops['scatter']})"
            print(f"N={num_tokens:5d} {name:4s} R={plan.merge_count:5d}  {launched}  {cells}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=1152)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--one-hot-max", type=int, default=1024, help="skip one_hot above this many tokens")
    args = parser.parse_args(argv)
    run(args.tokens, args.batch, args.channels, args.dtype, args.reps, args.one_hot_max)


if __name__ == "__main__":
    main()
