"""Static-shape token merging primitives on [B, N, C] arrays.

A `MergePlan` says, for every batch element, how N tokens collapse into M = N - merge_count
slots. Each slot is seeded by one token (`keep_index`); `merge_count` further tokens
(`src_index`) are added into the slot they join (`src_slot`); the slot is then scaled by one
over its group size. `unmerge` is a single gather through `token_slot`: every token reads
back the output of the slot it went into. All index arrays have shapes fixed by
(B, N, merge_count), so a plan is a valid `jit`/`scan` value and merge_count is static.

Besides merge/unmerge this module holds what every strategy shares: the window layout of a
token grid, cosine normalisation, bipartite matching of sources to per-window destinations,
`plan_for_sources`, which turns one ranked order of the tokens into a bipartite plan (IDM,
ToMe), and `plan_from_parents`, which turns any "token n joins token parent[n]" into a plan.
"""

from __future__ import annotations

import dataclasses
import functools
import operator

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MergePlan:
    """How N tokens become N - merge_count slots, per batch element.

    Fields (B batch, N tokens, M = N - R slots, R = merge_count):
      keep_index: int32 [B, M]   token that seeds each slot
      src_index:  int32 [B, R]   tokens folded into another slot
      src_slot:   int32 [B, R]   slot each of those tokens joins
      slot_scale: float32 [B, M] 1 / (tokens in the slot)
      token_slot: int32 [B, N]   slot of every token (the inverse index unmerge gathers through)
    Slots may come in any order (blocks are token-wise or attention, which ignores order): the
    strategies' plans order them as their one sort left them, `plan_from_parents` by token.
    windows: static ((H, W), (win_h, win_w)) when every group is a whole window of that grid
      and the merged windows hold the first R / (K - 1) slots, `src_index` listing each one's
      other K - 1 tokens in slot order (SSM, K tokens a window): `merge` then gathers and
      averages them (`merge_windows`) instead of scatter-adding; else None.
    merge_sum: static, how `merge` sums the sources of a plan without `windows` (IDM, ToMe):
      "scatter" (a scatter-add, `merge_scatter`) or "matmul" (a 0/1 matrix times the sources,
      `merge_matmul`: no scatter, so no atomics on a GPU).
    dst_slots: static D or None: every source joins one of the last D slots (bipartite plans:
      the W destinations, which `rank_sources` orders last), so `merge_matmul` multiplies by a
      [B, D, R] matrix instead of [B, M, R]. None: sources may join any slot.
    """

    keep_index: jax.Array
    src_index: jax.Array
    src_slot: jax.Array
    slot_scale: jax.Array
    token_slot: jax.Array
    windows: tuple[tuple[int, int], tuple[int, int]] | None = dataclasses.field(default=None, metadata={"static": True})
    merge_sum: str = dataclasses.field(default="scatter", metadata={"static": True})
    dst_slots: int | None = dataclasses.field(default=None, metadata={"static": True})

    @property
    def merge_count(self) -> int:
        return self.src_index.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.token_slot.shape[1]

    @property
    def merged_windows(self) -> int:
        """Window plans only: how many merged windows lead the slots (the rest hold one token).
        Other plans' merged slots vary per row: a ValueError."""
        if self.windows is None:
            raise ValueError("this needs a window plan (SSM): other plans' merged slots vary per row")
        (_, (win_h, win_w)) = self.windows
        return self.merge_count // (win_h * win_w - 1)


MERGE_SUMS = ("scatter", "matmul")


def check_merge_sum(merge_sum) -> str:
    """Return `merge_sum` if it names a way to sum sources (MERGE_SUMS), else raise a ValueError."""
    if merge_sum not in MERGE_SUMS:
        raise ValueError(
            f"merge_sum must be one of {MERGE_SUMS} (how IDM and ToMe merges sum their sources), got {merge_sum!r}"
        )
    return merge_sum


def take_along(values: jax.Array, index: jax.Array, axis: int = 1) -> jax.Array:
    """`jnp.take_along_axis` for the index arrays this package builds, which are in range by
    construction: no bounds check, no negative-index wrap (a quarter fewer HLO instructions in
    a plan, so less to compile)."""
    return jnp.take_along_axis(values, index, axis=axis, mode="promise_in_bounds")


def _take_tokens(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B, N, C], index int [B, K] -> [B, K, C]."""
    return take_along(x, index[..., None])


@jax.named_scope("merge")  # scope names mark regions for dit_jax.profiling
def merge(plan: MergePlan | None, x: jax.Array) -> jax.Array:
    """Mean of every merged group: [B, N, C] -> [B, N - merge_count, C]. `None` is the identity.

    Computed as seed + sum over the group of (token - seed) / group size, in float32: the
    offsets vanish when a group's tokens are equal, so merging equal tokens returns them bit
    for bit (a plain sum times 1/size can be 1 ulp off for size 3). Window plans (SSM) gather
    each merged window's tokens and average them (`merge_windows`: no scatter); other plans sum
    their sources as `plan.merge_sum` says (`merge_scatter` or `merge_matmul`).
    sdtm/bench_merge.py measures the alternatives.
    """
    if plan is None:
        return x
    if plan.merge_count == 0:
        return _take_tokens(x, plan.keep_index)
    if plan.windows is not None:
        return merge_windows(plan, x)
    if plan.merge_sum == "matmul":
        return merge_matmul(plan, x)
    return merge_scatter(plan, x)


def _seeds_and_offsets(plan: MergePlan, x: jax.Array, first: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The parts of `merge`'s sum: (the first slots, up to `first`, as they are in x's dtype
    [B, F, C]; float32 seeds of the other slots [B, M - F, C]; float32 (source - its slot's
    seed) / group size [B, R, C]). No source may join a slot before `first`
    (`_first_joined_slot`)."""
    alone = _take_tokens(x, plan.keep_index[:, :first])  # (B, F, C)
    seeds = _take_tokens(x, plan.keep_index[:, first:]).astype(jnp.float32)  # (B, M - F, C)
    seed_of_src = take_along(plan.keep_index, plan.src_slot)  # (B, R)
    scale_of_src = take_along(plan.slot_scale, plan.src_slot)  # (B, R)
    offsets = _take_tokens(x, plan.src_index).astype(jnp.float32) - _take_tokens(x, seed_of_src).astype(
        jnp.float32
    )  # (B, R, C)
    return alone, seeds, offsets * scale_of_src[..., None]


def _first_joined_slot(plan: MergePlan) -> int:
    """The first slot a source may join: M - `plan.dst_slots` for bipartite plans (their W
    destinations come last), or 0 when any slot may be joined."""
    return 0 if plan.dst_slots is None else plan.keep_index.shape[1] - plan.dst_slots


def merge_scatter(plan: MergePlan, x: jax.Array) -> jax.Array:
    """`merge` for any plan: gathers plus one scatter-add of the merge_count sources.

    float32 x: into all M slots in place. Narrower x (bfloat16): into the slots sources may
    join only (bipartite plans: the last `plan.dst_slots`), the others gathered as they are, so
    the float32 copy covers the destinations alone. On this project's CPU (1024 tokens, 409
    merged, batch 8, C 1152; `python -m sdtm.bench_merge --tokens 1024 --batch 8 --dtype
    bfloat16`, scatter against all_slots) that split takes 3.5 against 10.4-10.6 ms for IDM and
    ToMe plans. In float32 it ran 0.82-1.02x as fast in three A/B runs (its concatenation costs
    about what the copy saves), so float32 keeps the in-place sum.
    """
    first = _first_joined_slot(plan) if jnp.dtype(x.dtype).itemsize < 4 else 0
    alone, seeds, offsets = _seeds_and_offsets(plan, x, first)
    # One scatter-add per row, vmapped: a batched scatter, which XLA splits over devices with the
    # batch (a scatter indexed by [row, slot] pairs would be gathered across them).
    add_rows = jax.vmap(lambda seeds, slot, value: seeds.at[slot].add(value))
    summed = add_rows(seeds, plan.src_slot - first, offsets).astype(x.dtype)
    return summed if first == 0 else jnp.concatenate([alone, summed], axis=1)


def merge_matmul(plan: MergePlan, x: jax.Array) -> jax.Array:
    """`merge` for any plan with the sources summed by a matmul: the 0/1 matrix [B, D, R] of
    which slot each source joins, times the scaled offsets [B, R, C], added to the last D slots
    (D = `plan.dst_slots`, the destinations of a bipartite plan; else every slot, D = M). No
    scatter (XLA:GPU lowers a float scatter-add to atomics: in jaxlib 0.10.2 a compare-and-swap
    loop for a T4 or an A100, Hopper's native vector add for an H100/H200; docs/device_compile.py),
    at 2 * D * R * C FLOPs per row: 0.3 GFLOP for DiT-XL/2's 1024 tokens
    merging half into 256 destinations, dense work for a matrix unit, dearer than the scatter
    on a CPU.

    float32 inputs multiply at full precision (`Precision.HIGHEST`, not a GPU's TF32), so this
    agrees with `merge_scatter` up to summation order. Narrower inputs (bfloat16) multiply in
    their own dtype with float32 accumulation: the 0/1 matrix is exact, the offsets round to
    bfloat16 before they are summed, below the rounding of the bfloat16 result they enter.
    """
    first = _first_joined_slot(plan)
    alone, seeds, offsets = _seeds_and_offsets(plan, x, first)
    joins = plan.src_slot[:, None, :] == jnp.arange(first, first + seeds.shape[1], dtype=jnp.int32)[:, None]  # (B, D, R)
    dtype = jnp.float32 if jnp.dtype(x.dtype).itemsize >= 4 else x.dtype
    summed = jnp.einsum(
        "bdr,brc->bdc", joins.astype(dtype), offsets.astype(dtype), preferred_element_type=jnp.float32,
        precision=jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None,
    )
    return jnp.concatenate([alone, (seeds + summed).astype(x.dtype)], axis=1)


def merge_windows(plan: MergePlan, x: jax.Array) -> jax.Array:
    """`merge` for a plan whose groups are whole windows (`plan.windows` set): each merged
    window's tokens gathered (its seed from `keep_index`, its K - 1 others from `src_index`,
    which lists them window by window in slot order) and averaged, then the other slots' tokens
    gathered after them. Every token is read once; no scatter, so no atomic adds on a GPU.

    It replaced averaging every window of the grid in place and gathering the merged ones
    (`python -m sdtm.bench_merge --tokens 1024 --batch B --dtype D`, offsets against grid_means;
    this project's CPU, 510 merged): 0.84x the time in float32 at batch 2, 0.89x at batch 8;
    0.51x and 0.24x in bfloat16.
    """
    (_, (win_h, win_w)) = plan.windows
    k = win_h * win_w
    merged = plan.merged_windows  # the first `merged` slots are windows
    batch, _, channels = x.shape
    seed = _take_tokens(x, plan.keep_index[:, :merged]).astype(jnp.float32)  # (B, merged, C)
    others = _take_tokens(x, plan.src_index).astype(jnp.float32).reshape(batch, merged, k - 1, channels)
    mean = seed + jnp.sum(others - seed[:, :, None], axis=2) * (1.0 / k)
    return jnp.concatenate([mean.astype(x.dtype), _take_tokens(x, plan.keep_index[:, merged:])], axis=1)


@jax.named_scope("unmerge")
def unmerge(plan: MergePlan | None, y: jax.Array) -> jax.Array:
    """Copy each slot's output back to all of its tokens: [B, M, C] -> [B, N, C]."""
    if plan is None:
        return y
    return _take_tokens(y, plan.token_slot)


def apply_to_lone_tokens(plan: MergePlan, fn, x: jax.Array, merged_value: jax.Array) -> jax.Array:
    """A token-wise `fn` on the tokens a window plan leaves alone; merged tokens read `merged_value`.

    x [B, N, C]; fn maps [B, A, C] -> [B, A, C'] token by token; merged_value [B, N, C'].
    Returns [B, N, C']: fn(x[n]) where token n is alone in its slot, merged_value[n] where it is
    in a merged window. Equal to `jnp.where(merged_mask, merged_value, unmerge(plan, fn(merge(plan,
    x))))` without computing fn on the merged windows, whose outputs that would throw away: what a
    block's MLP needs when merged tokens take their whole output from a protected step's cache
    (`SDTMConfig(cache_weight=0)`). Window plans (SSM) only (see `unmerge_lone`).
    """
    return unmerge_lone(plan, fn(_take_tokens(x, plan.keep_index[:, plan.merged_windows:])), merged_value)


def unmerge_lone(plan: MergePlan, out: jax.Array, merged_value: jax.Array) -> jax.Array:
    """`unmerge` of the lone slots' outputs only, merged tokens reading `merged_value`.

    out [B, A, C']: outputs of a window plan's slots after its merged windows, i.e. of
    `merge(plan, x)[:, plan.merged_windows:]`, which hold one token each (A = N - merge_count -
    merged_windows: window plans, SSM, know A statically; other plans' merged slots vary per row
    and raise a ValueError). merged_value [B, N, C']. Returns [B, N, C']: each lone token's output,
    merged_value at the tokens of merged windows.
    """
    slot = plan.token_slot - plan.merged_windows  # (B, N): negative inside a merged window
    with jax.named_scope("unmerge"):
        alone = _take_tokens(out, jnp.maximum(slot, 0))
        return jnp.where((slot < 0)[..., None], merged_value.astype(out.dtype), alone)


def log_group_size(plan: MergePlan) -> jax.Array:
    """float32 [B, M]: log of the number of tokens in every slot (0 for a token alone), the
    bias ToMe's proportional attention adds to a merged key's logits."""
    return -jnp.log(plan.slot_scale)


def identity_plan(batch: int, num_tokens: int) -> MergePlan:
    """The plan with merge_count 0: merge and unmerge return their input."""
    tokens = jnp.broadcast_to(jnp.arange(num_tokens, dtype=jnp.int32), (batch, num_tokens))
    empty = jnp.zeros((batch, 0), jnp.int32)
    return MergePlan(
        keep_index=tokens,
        src_index=empty,
        src_slot=empty,
        slot_scale=jnp.ones((batch, num_tokens), jnp.float32),
        token_slot=tokens,
    )


def invert_order(order: jax.Array) -> jax.Array:
    """int32 [B, L]: where each element landed in `order` (int [B, L], a permutation per row),
    by one scatter of unique indices."""
    batch, length = order.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    rows = jnp.arange(batch)[:, None]
    return jnp.zeros((batch, length), jnp.int32).at[rows, order].set(positions, unique_indices=True)


def plan_from_parents(
    parent: jax.Array, is_src: jax.Array, merge_count: int, group_size: jax.Array | None = None
) -> MergePlan:
    """Build the plan in which every source token n joins the group seeded by token parent[n].

    parent: int [B, N], parent[n] = n for every token that seeds its own slot; a source's
      parent must itself be a seed (groups are stars, never chains).
    is_src: bool [B, N] with exactly `merge_count` True per row (the caller guarantees it;
      a static shape cannot be checked against data without a host sync).
    group_size: optional [B, N], the size of the group each seed token leads (read at the
      seeds only), when the caller knows it (SSM: K or 1); None counts the sources per slot.
    Slots are ordered by their seed's token index, sources by their own index.
    """
    batch, num_tokens = parent.shape
    num_slots = num_tokens - merge_count
    rows = jnp.arange(batch)[:, None]
    # Compaction by one stable sort: seeds in token order, then sources in token order. A row
    # that breaks the is_src contract gets a wrong plan, not an error.
    order = jnp.argsort(is_src, axis=1, stable=True).astype(jnp.int32)  # (B, N)
    keep_index, src_index = order[:, :num_slots], order[:, num_slots:]
    # The inverse permutation: where each token landed in `order`; for a seed, its slot.
    place = invert_order(order)
    token_slot = take_along(place, parent.astype(jnp.int32))  # (B, N): the slot of each token's seed
    src_slot = take_along(token_slot, src_index)  # (B, R)
    if group_size is None:  # counted in int32: integer atomics are native on a GPU, float ones may not be
        slot_size = jnp.ones((batch, num_slots), jnp.int32).at[rows, src_slot].add(1).astype(jnp.float32)
    else:
        slot_size = take_along(group_size.astype(jnp.float32), keep_index)
    return MergePlan(
        keep_index=keep_index,
        src_index=src_index,
        src_slot=src_slot,
        slot_scale=1.0 / slot_size,
        token_slot=token_slot,
    )


def blend_merged(plan: MergePlan | None, out: jax.Array, cached: jax.Array, weight: float) -> jax.Array:
    """weight * out + (1 - weight) * cached for tokens that were merged, `out` for the others.

    out, cached [B, N, C]: a block branch's unmerged output and the same branch's output at the
    last full-resolution step (the official release's merge/cache fusion, its `mcw`).
    """
    if plan is None or plan.merge_count == 0 or weight == 1.0:
        return out
    mask = merged_mask(plan, out.shape[0], out.shape[1])[..., None]
    return jnp.where(mask, weight * out + (1.0 - weight) * cached.astype(out.dtype), out)


def merged_mask(plan: MergePlan | None, batch: int, num_tokens: int) -> jax.Array:
    """bool [B, N]: True for tokens that share their slot with another token."""
    if plan is None or plan.merge_count == 0:
        return jnp.zeros((batch, num_tokens), bool)
    return take_along(plan.slot_scale, plan.token_slot) < 1.0


# ---------------------------------------------------------------------------------------------
# Token grids and windows


def check_grid(num_tokens: int, grid: tuple[int, int], window: tuple[int, int]) -> None:
    """Raise a ValueError unless `grid` holds `num_tokens` tokens and `window` tiles it exactly."""
    height, width = (int(v) for v in grid)
    win_h, win_w = (int(v) for v in window)
    if height * width != num_tokens:
        raise ValueError(
            f"grid {height}x{width} holds {height * width} tokens but the metric has {num_tokens}; "
            "pass the (height, width) of the token grid"
        )
    if win_h < 1 or win_w < 1 or win_h * win_w < 2:
        raise ValueError(f"window {win_h}x{win_w} must hold at least 2 tokens")
    if height % win_h or width % win_w:
        raise ValueError(
            f"window {win_h}x{win_w} does not tile the {height}x{width} token grid; "
            "choose a window whose sides divide the grid's sides"
        )


@functools.lru_cache(maxsize=64)
def window_tokens(grid: tuple[int, int], window: tuple[int, int]) -> np.ndarray:
    """int32 [num_windows, K]: token indices of each window (windows and in-window positions
    both row-major; column 0 is the window's top-left token). Static, so NumPy."""
    height, width = grid
    win_h, win_w = window
    index = np.arange(height * width, dtype=np.int32).reshape(height // win_h, win_h, width // win_w, win_w)
    return np.ascontiguousarray(index.transpose(0, 2, 1, 3).reshape(-1, win_h * win_w))


@functools.lru_cache(maxsize=64)
def token_window_position(grid: tuple[int, int], window: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(window id int32 [N], in-window position int32 [N]) of every token; the inverse of
    `window_tokens`."""
    windows = window_tokens(grid, window)
    num_windows, k = windows.shape
    token_window = np.empty(num_windows * k, np.int32)
    token_pos = np.empty(num_windows * k, np.int32)
    token_window[windows.reshape(-1)] = np.repeat(np.arange(num_windows, dtype=np.int32), k)
    token_pos[windows.reshape(-1)] = np.tile(np.arange(k, dtype=np.int32), num_windows)
    return token_window, token_pos


def to_windows(values: jax.Array, grid: tuple[int, int], window: tuple[int, int]) -> jax.Array:
    """Every window's tokens: [B, N, ...] -> [B, num_windows, K, ...], laid out as
    `window_tokens` (windows and in-window positions row-major). Reshapes and a transpose, no
    gather (on this project's CPU a transposed [B, N, C] reads slowly: `window_sum` avoids it)."""
    height, width = grid
    win_h, win_w = window
    batch, rest = values.shape[0], values.shape[2:]
    blocks = values.reshape(batch, height // win_h, win_h, width // win_w, win_w, *rest)
    blocks = jnp.moveaxis(blocks, 3, 2)  # (B, H / win_h, W / win_w, win_h, win_w, ...)
    return blocks.reshape(batch, (height // win_h) * (width // win_w), win_h * win_w, *rest)


def from_windows(values: jax.Array, grid: tuple[int, int], window: tuple[int, int]) -> jax.Array:
    """The inverse of `to_windows`: [B, num_windows, K, ...] -> [B, N, ...]."""
    height, width = grid
    win_h, win_w = window
    batch, rest = values.shape[0], values.shape[3:]
    blocks = values.reshape(batch, height // win_h, width // win_w, win_h, win_w, *rest)
    blocks = jnp.moveaxis(blocks, 2, 3)  # (B, H / win_h, win_h, W / win_w, win_w, ...)
    return blocks.reshape(batch, height * width, *rest)


def window_sum(values: jax.Array, grid: tuple[int, int], window: tuple[int, int]) -> jax.Array:
    """Sum over each window: [B, N, ...] -> [B, num_windows, ...] (windows row-major, as in
    `window_tokens`). A reshape and a reduction, no transpose."""
    height, width = grid
    win_h, win_w = window
    batch, rest = values.shape[0], values.shape[2:]
    blocks = values.reshape(batch, height // win_h, win_h, width // win_w, win_w, *rest)
    return blocks.sum(axis=(2, 4)).reshape(batch, (height // win_h) * (width // win_w), *rest)


def as_pair(value) -> tuple[int, int]:
    """(a, b) of Python ints from any pair of integers (hashable, for the static caches)."""
    try:
        first, second = value
        return operator.index(first), operator.index(second)
    except (TypeError, ValueError):
        raise ValueError(f"expected a pair of ints such as (2, 2), got {value!r}") from None


def checked_windows(num_tokens: int, grid, window) -> np.ndarray:
    """`window_tokens` after `check_grid`; grid and window may be any int pairs."""
    grid, window = as_pair(grid), as_pair(window)
    check_grid(num_tokens, grid, window)
    return window_tokens(grid, window)


def check_merge_count(merge_count, limit: int, what: str) -> int:
    """merge_count as a Python int in [0, limit], else a ValueError naming `what` limits it."""
    if isinstance(merge_count, bool) or not isinstance(merge_count, (int, np.integer)):
        raise ValueError(f"merge_count must be a Python int (it fixes shapes), got {merge_count!r}")
    merge_count = int(merge_count)
    if merge_count < 0 or merge_count > limit:
        raise ValueError(f"merge_count {merge_count} is outside [0, {limit}]: {what}")
    return merge_count


# ---------------------------------------------------------------------------------------------
# Similarity and bipartite matching


UNIT_EPS = 1e-6  # lengths below this count as this (a zero token stays zero)


def unit_tokens(metric: jax.Array) -> jax.Array:
    """Tokens scaled to unit length in float32, so dot products are cosine similarities.
    A zero token stays zero (similarity 0 to everything)."""
    return metric.astype(jnp.float32) / _length(metric)[..., None]


def _length(tokens: jax.Array) -> jax.Array:
    """[..., C] -> float32 [...]: each token's length, at least UNIT_EPS."""
    return jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(tokens.astype(jnp.float32)), axis=-1)), UNIT_EPS)


def window_destinations(
    dst_pos: jax.Array, grid: tuple[int, int], window: tuple[int, int]
) -> tuple[jax.Array, jax.Array]:
    """One destination per window at in-window position dst_pos int [B, num_windows] ->
    (is_dst bool [B, N], dst_token int32 [B, num_windows]). Arithmetic on the window layout,
    no gather."""
    win_h, win_w = window
    dst_pos = dst_pos.astype(jnp.int32)
    is_dst = from_windows(dst_pos[..., None] == jnp.arange(win_h * win_w), grid, window)
    top_left = jnp.asarray(window_tokens(grid, window)[:, 0])  # (W,)
    return is_dst, top_left + (dst_pos // win_w) * grid[1] + dst_pos % win_w


def best_destinations(
    metric: jax.Array, dst_token: jax.Array, among: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """The most cosine-similar destination (anywhere on the grid) of every token, or of the
    tokens `among` only.

    metric [B, N, C] (not normalised), dst_token int [B, W] from `window_destinations`, among
    int [B, K] or None (all N tokens); returns (best cosine similarity f32 [B, K], best_dst_token
    int32 [B, K]) in the order of `among` (K = N when None: the caller reads them at its
    sources). Ties go to the first destination in window order.

    Only the W destinations are normalised: a token's own length scales its row of dot
    products and does not move its argmax, so the tokens enter the matmul as they are, and
    their best dot product is divided by their length afterwards (XLA drops that when the
    caller ignores the similarity). The matmul (K x W per row) runs in the metric's dtype (bf16
    on accelerators: only the ranking matters, and an fp32-exact product costs several times the
    merge savings on a GPU) with float32 accumulation.
    """
    dst = _take_tokens(metric, dst_token)  # (B, W, C)
    tokens = metric if among is None else _take_tokens(metric, among)  # (B, K, C)
    dots = jnp.einsum("bkc,bwc->bkw", tokens, dst, preferred_element_type=jnp.float32)
    scaled = dots / _length(dst)[:, None, :]  # (B, K, W): cosine times the token's length
    best_window = jnp.argmax(scaled, axis=-1)  # (B, K)
    return jnp.max(scaled, axis=-1) / _length(tokens), take_along(dst_token, best_window)


def rank_sources(is_dst: jax.Array, rank: jax.Array) -> jax.Array:
    """int32 [B, N]: every row's tokens, best-ranked source first, destinations last.

    is_dst bool [B, N]; rank f32 [B, N] (ties: the lower token index first, as `lax.top_k`).
    Its first R entries are the R sources that merge, the rest the tokens that keep a slot:
    `plan_for_sources` needs no other sort.
    """
    return jnp.argsort(jnp.where(is_dst, jnp.inf, -rank), axis=1, stable=True).astype(jnp.int32)


def plan_for_sources(
    order: jax.Array, dst_of_merging: jax.Array, merge_sum: str = "scatter", num_destinations: int | None = None
) -> MergePlan:
    """Plan in which the first R tokens of `order` (int [B, N], a permutation of each row's
    tokens, from `rank_sources`) join the tokens `dst_of_merging` int [B, R], none of which is
    among those R; the other N - R tokens keep a slot each, in `order`'s order. One scatter
    inverts `order` and one counts the groups; `merge_sum` goes to the plan (see MergePlan).
    num_destinations: W when every token of `dst_of_merging` is among the last W of `order`
    (`rank_sources` puts the destinations there): the plan's `dst_slots`."""
    batch, num_tokens = order.shape
    merge_count = dst_of_merging.shape[1]
    rows = jnp.arange(batch)[:, None]
    place = invert_order(order)  # (B, N): where each token landed in `order`
    src_slot = take_along(place, dst_of_merging.astype(jnp.int32)) - merge_count  # (B, R)
    is_src = place < merge_count
    joined = take_along(src_slot, jnp.where(is_src, place, 0))  # (B, N): read at the sources only
    # Group sizes counted in int32: integer atomics are native on a GPU, float ones may not be.
    size = jnp.ones((batch, num_tokens - merge_count), jnp.int32).at[rows, src_slot].add(1)
    return MergePlan(
        keep_index=order[:, merge_count:],
        src_index=order[:, :merge_count],
        src_slot=src_slot,
        slot_scale=1.0 / size.astype(jnp.float32),
        token_slot=jnp.where(is_src, joined, place - merge_count),
        merge_sum=merge_sum,
        dst_slots=num_destinations,
    )


def merge_top_sources(
    is_dst: jax.Array, best_dst: jax.Array, rank: jax.Array, merge_count: int, num_destinations: int,
    merge_sum: str = "scatter",
) -> MergePlan:
    """Plan that merges the `merge_count` highest-ranked sources (`rank_sources`) into their
    best destinations, best_dst int [B, N] (read at the sources); is_dst marks
    `num_destinations` tokens per row."""
    order = rank_sources(is_dst, rank)
    return plan_for_sources(order, take_along(best_dst, order[:, :merge_count]), merge_sum, num_destinations)
