"""DiT: Scalable Diffusion Models with Transformers (Peebles & Xie, 2023), in Flax NNX.

Parameter names follow the official facebookresearch/DiT state dict, so conversion is a rename
plus transposes; the blocks are stored stacked (`blocks/attn/qkv/kernel` is (depth, D, 3D), see
`dit_jax.nn.stack`). Images are NHWC. Blocks accept a token-merging strategy (`sdtm.merger`): a block
builds its plans from its own modulated input and merges attention and MLP inputs as told.

    model = DiT(VARIANTS["DiT-XL/2"].replace(input_size=32), rngs=nnx.Rngs(0))
    out = model(x, t, y)          # x (B, 32, 32, 4) -> (B, 32, 32, 8) with learned sigma
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dit_jax.models.config import PatchGridConfig
from dit_jax.nn.attention import Attention
from dit_jax.nn.branches import attention_branch, mlp_branch
from dit_jax.nn.layers import Mlp, layer_norm, modulate, sincos_pos_embed_2d, timestep_embedding
from dit_jax.nn.stack import layer_of, module_at, stack_modules, unstack_module
from sdtm.merger import BlockMerger, MergeState


class Buffer(nnx.Variable):
    """A fixed array that belongs to the checkpoint but is never trained (DiT's pos_embed)."""


@dataclasses.dataclass(frozen=True)
class DiTConfig(PatchGridConfig):
    family_name = "DiT"

    input_size: int = 32  # latent (or pixel) side: 32 for 256 px, 64 for 512 px
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1  # > 0 adds the null class used by classifier-free guidance
    num_classes: int = 1000
    learn_sigma: bool = True

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def null_class(self) -> int:
        """Label id of the unconditional (null) class."""
        return self.num_classes


    def validate(self) -> None:
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")


# The twelve variants of the paper (depth, hidden size, heads), each at patch 2, 4 and 8.
# Input size is set per checkpoint: 32 latents for 256 px, 64 for 512 px.
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
VARIANTS: dict[str, DiTConfig] = {
    f"DiT-{name}/{patch}": DiTConfig(patch_size=patch, depth=depth, hidden_size=width, num_heads=heads)
    for name, (depth, width, heads) in _SIZES.items()
    for patch in (2, 4, 8)
}


def variant(name: str, **changes: Any) -> DiTConfig:
    """Config of a named variant ("DiT-XL/2"), with optional field changes (e.g. input_size=64)."""
    key = name if name in VARIANTS else "/".join(name.rsplit("-", 1))  # "DiT-XL-2" -> "DiT-XL/2"
    if key not in VARIANTS:
        raise ValueError(f"unknown DiT variant {name!r}; known: {', '.join(VARIANTS)}")
    return VARIANTS[key].replace(**changes)


def _linear(din: int, dout: int, rngs: nnx.Rngs, dtype) -> nnx.Linear:
    return nnx.Linear(din, dout, rngs=rngs, dtype=dtype, param_dtype=dtype)


def guide(out: jax.Array, scale: float | jax.Array, guided_channels: int = 3) -> jax.Array:
    """DiT's classifier-free guidance on the output of a [cond; uncond] batch.

    out (2B, H, W, C_out): the first B rows conditional, the last B unconditional. The first
    `guided_channels` channels (DiT guides 3 of the 4 latent channels) become
    uncond + scale * (cond - uncond) in both halves; the rest (learned variance) pass through.
    """
    eps, rest = out[..., :guided_channels], out[..., guided_channels:]
    cond, uncond = jnp.split(eps, 2, axis=0)
    guided = uncond + scale * (cond - uncond)
    return jnp.concatenate([jnp.concatenate([guided, guided], axis=0), rest], axis=-1)


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs, dtype):
        p = cfg.patch_size
        self.proj = nnx.Conv(
            cfg.in_channels, cfg.hidden_size, (p, p), strides=(p, p), padding="VALID",
            rngs=rngs, dtype=dtype, param_dtype=dtype,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.proj(x)  # (B, H/p, W/p, D)
        return x.reshape(x.shape[0], -1, x.shape[-1])  # (B, T, D), row-major tokens


class TimestepEmbedder(nnx.Module):
    """Sinusoidal timestep features (256) -> MLP (Linear, SiLU, Linear)."""

    frequency_embedding_size = 256

    def __init__(self, hidden: int, *, rngs: nnx.Rngs, dtype):
        self.mlp_0 = _linear(self.frequency_embedding_size, hidden, rngs, dtype)
        self.mlp_2 = _linear(hidden, hidden, rngs, dtype)

    def __call__(self, t: jax.Array) -> jax.Array:
        freq = timestep_embedding(t, self.frequency_embedding_size).astype(self.mlp_0.kernel[...].dtype)
        return self.mlp_2(jax.nn.silu(self.mlp_0(freq)))


class LabelEmbedder(nnx.Module):
    """Class label table with one extra row, the null class, when guidance dropout is on."""

    def __init__(self, num_classes: int, hidden: int, dropout_prob: float, *, rngs: nnx.Rngs, dtype):
        rows = num_classes + int(dropout_prob > 0)
        self.embedding_table = nnx.Embed(rows, hidden, rngs=rngs, dtype=dtype, param_dtype=dtype)

    def __call__(self, y: jax.Array) -> jax.Array:
        return self.embedding_table(y)


class DiTBlock(nnx.Module):
    """adaLN-Zero block: shift/scale/gate for attention and MLP from its table of the
    conditioning (`modulation`, which `DiT` computes for all blocks at once)."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs, dtype):
        d = cfg.hidden_size
        self.attn = Attention(d, cfg.num_heads, rngs=rngs, dtype=dtype, param_dtype=dtype)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio), rngs=rngs, dtype=dtype, param_dtype=dtype)
        self.adaLN_modulation = _linear(d, 6 * d, rngs, dtype)

    def modulation(self, c: jax.Array) -> jax.Array:
        """adaLN: the conditioning c (B, D) -> this block's shift/scale/gate table (B, 6D).

        Called on the stacked blocks (`DiT.blocks`, kernel (depth, D, 6D)) it gives every
        block's table at once, (depth, B, 6D): one matmul before the blocks run instead of a
        small one inside each (in the scanned sampler, each of those also copied its [D, 6D]
        kernel out of the stack: 16 MB per block for DiT-XL/2 in bf16).
        """
        kernel, bias = self.adaLN_modulation.kernel[...], self.adaLN_modulation.bias[...]
        h = jax.nn.silu(c).astype(kernel.dtype)  # (B, D)
        # Stacked: a batched matmul over the blocks (h repeated per block, which is small), so
        # each block's kernel is read in place; contracting (B, D) with (depth, D, 6D) directly
        # made XLA transpose the whole stack first.
        h = jnp.broadcast_to(h, (*kernel.shape[:-2], *h.shape))  # (depth, B, D) or (B, D)
        return jnp.einsum("...bd,...de->...be", h, kernel) + bias[..., None, :]

    def __call__(
        self,
        x: jax.Array,  # (B, N, D)
        modulation: jax.Array,  # (B, 6D): self.modulation(c)
        merger: BlockMerger | None = None,
        state: MergeState | None = None,
        grid: tuple[int, int] | None = None,
        plans: tuple | None = None,
        cache: jax.Array | None = None,
        cache_weight: float = 1.0,
    ) -> tuple[jax.Array, MergeState | None, tuple, jax.Array]:
        """Returns (x, state, (attn_plan, mlp_plan), branches).

        plans: reuse these (built by an earlier block) instead of asking the merger.
        cache (2, B, N, D): this block's gated attention and MLP outputs from the last
          full-resolution step; merged tokens take cache_weight * their output +
          (1 - cache_weight) * the cache (the official release's `mcw` blend).
        branches (2, B, N, D): this call's gated attention and MLP outputs (a new cache).
        """
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(modulation, 6, axis=-1)
        h = modulate(layer_norm(x), shift_msa, scale_msa)  # (B, N, D): the merge metric
        attn_branch, (attn_plan, mlp_plan), state = attention_branch(
            self.attn, h, gate_msa, merger, state, grid, plans, cache, cache_weight)
        x = x + attn_branch
        h = modulate(layer_norm(x), shift_mlp, scale_mlp)
        mlp_out = mlp_branch(self.mlp, h, gate_mlp, mlp_plan, cache, cache_weight)
        x = x + mlp_out
        return x, state, (attn_plan, mlp_plan), jnp.stack([attn_branch, mlp_out])


class FinalLayer(nnx.Module):
    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs, dtype):
        d = cfg.hidden_size
        self.linear = _linear(d, cfg.patch_size**2 * cfg.out_channels, rngs, dtype)
        self.adaLN_modulation = _linear(d, 2 * d, rngs, dtype)

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.adaLN_modulation(jax.nn.silu(c)), 2, axis=-1)
        return self.linear(modulate(layer_norm(x), shift, scale))


class DiT(nnx.Module):
    # Branch outputs per block in SDTM's protected-step cache (`forward_merged`): attention, MLP.
    CACHED_BRANCHES = 2
    # `run_blocks` hands each block its adaLN table, `DiTBlock.modulation(c)` (the scanned
    # blocks: all tables from one matmul before the loop); False: c itself (PixArt's context).
    PER_BLOCK_MODULATION = True

    def __init__(self, config: DiTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        config.validate()
        self.config = config
        d = config.hidden_size
        self.x_embedder = PatchEmbed(config, rngs=rngs, dtype=dtype)
        self.t_embedder = TimestepEmbedder(d, rngs=rngs, dtype=dtype)
        self.y_embedder = LabelEmbedder(config.num_classes, d, config.class_dropout_prob, rngs=rngs, dtype=dtype)
        self.pos_embed = Buffer(jnp.asarray(sincos_pos_embed_2d(d, *config.grid), dtype)[None])
        # Stored stacked (kernels (depth, ...)): the blocks run as a scan straight from them.
        self.blocks = stack_modules([DiTBlock(config, rngs=rngs, dtype=dtype) for _ in range(config.depth)])
        self.final_layer = FinalLayer(config, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array) -> jax.Array:
        """x (B, H, W, C) NHWC, t (B,) timesteps, y (B,) class ids -> (B, H, W, out_channels)."""
        return self.forward_merged(x, t, y)[0]

    def block(self, index: int) -> DiTBlock:
        """Block `index` as a module of its own (its parameters read from the stacked blocks)."""
        return module_at(self.blocks, index)

    def forward_merged(
        self,
        x: jax.Array,
        t: jax.Array,
        y: jax.Array,
        merger: BlockMerger | None = None,
        merge_state: MergeState | None = None,
        scan_blocks: bool = False,
        cache: jax.Array | None = None,
        cache_weight: float = 1.0,
        return_branches: bool = False,
    ):
        """The forward pass with a token-merging strategy -> (output, new merge state), and with
        `return_branches` also every block's gated attention/MLP outputs (depth, 2, B, N, D).

        scan_blocks: run the blocks as a `lax.scan` over their stacked parameters (one compiled
        block, with plan sharing scans over groups: what the sampler does, compiling each phase's
        block once); False (default) runs them one after another, each block compiled on its own
        (what training uses: on this CPU a scanned train step compiled 2x slower and ran slower).
        Same numbers.
        cache (depth, 2, B, N, D), cache_weight: blend merged tokens' outputs with the branches
        of the last full-resolution step (see DiTBlock).
        """
        cfg = self.config
        b, hgt, wid, _ = x.shape
        if (hgt, wid) != (cfg.input_size, cfg.input_size):
            raise ValueError(
                f"this DiT takes {cfg.input_size}x{cfg.input_size} inputs, got {hgt}x{wid}"
            )
        tokens = self.x_embedder(x) + self.pos_embed[...]  # (B, T, D)
        c = self.t_embedder(jnp.broadcast_to(t, (b,))) + self.y_embedder(y)  # (B, D)
        tokens, merge_state, branches = self.run_blocks(
            tokens, c, merger, merge_state, scan_blocks, cache, cache_weight, return_branches
        )
        out = self.unpatchify(self.final_layer(tokens, c))  # (B, H, W, C_out)
        return (out, merge_state, branches) if return_branches else (out, merge_state)

    def run_blocks(self, tokens, c, merger, merge_state, scan, cache, cache_weight, collect):
        """Every block on tokens (B, N, D) with the conditioning `c` (see PER_BLOCK_MODULATION)
        -> (tokens, merge state, branches (depth, CACHED_BRANCHES, B, N, D) when `collect`, else
        None). As scans, or (scan False) one after another, each block computing its own table
        (in a train step this compiles fewer distinct kernels than slicing one matmul's result);
        blocks share plans in groups of the merger's plan_every."""
        every = getattr(merger, "plan_every", 1) if merger is not None else 1
        if scan:
            return self._scan_blocks(tokens, c, merger, merge_state, every, cache, cache_weight, collect)
        plans, branches = None, []
        for i, block in enumerate(unstack_module(self.blocks)):
            reuse = plans if i % every else None
            block_c = block.modulation(c) if self.PER_BLOCK_MODULATION else c
            tokens, merge_state, plans, block_branches = block(
                tokens, block_c, merger, merge_state, self.config.grid, reuse, None if cache is None else cache[i],
                cache_weight,
            )
            branches.append(block_branches)
        return tokens, merge_state, jnp.stack(branches) if collect else None

    def _scan_blocks(self, tokens, c, merger, merge_state, every, cache, cache_weight, collect):
        """The blocks as scans over their stacked parameters (and cache). With plan sharing
        (every > 1), an outer scan over groups of `every` blocks: a group's first block builds
        the plans and an inner scan runs the others with them; a last, shorter group
        (depth % every) likewise. Returns (tokens, merge state, branches (depth, CACHED_BRANCHES, B, N, D) when
        `collect`, else None: the scans then carry no per-block outputs at all)."""
        graphdef, stacked = nnx.split(self.blocks)
        grid = self.config.grid
        tables = self.blocks.modulation(c) if self.PER_BLOCK_MODULATION else None  # (depth, B, 6D)
        layers = (stacked, cache, tables)  # scanned together; None scans as nothing

        def run(layer, tokens, merge_state, plans=None):
            block_state, block_cache, table = layer
            block = nnx.merge(graphdef, block_state)
            block_c = c if table is None else table
            return block(tokens, block_c, merger, merge_state, grid, plans, block_cache, cache_weight)

        if every == 1:
            def one_block(carry, layer):
                tokens, merge_state, _, branches = run(layer, *carry)
                return (tokens, merge_state), branches if collect else None

            (tokens, merge_state), branches = jax.lax.scan(one_block, (tokens, merge_state), layers)
            return tokens, merge_state, branches

        def group(carry, start, size):  # blocks start .. start + size - 1
            tokens, merge_state = carry
            tokens, merge_state, plans, first_branches = run(layer_of(layers, start), tokens, merge_state)

            def reuse(tokens, i):
                tokens, _, _, branches = run(layer_of(layers, i), tokens, None, plans)
                return tokens, branches if collect else None

            tokens, other_branches = jax.lax.scan(reuse, tokens, start + jnp.arange(1, size))
            if not collect:
                return (tokens, merge_state), None
            return (tokens, merge_state), jnp.concatenate([first_branches[None], other_branches])

        depth = self.config.depth
        full = depth // every * every
        carry, branches = (tokens, merge_state), []
        if full:
            carry, group_branches = jax.lax.scan(
                lambda carry, start: group(carry, start, every), carry, jnp.arange(0, full, every))
            if collect:
                branches.append(group_branches.reshape(full, *group_branches.shape[2:]))
        if full < depth:
            carry, tail_branches = group(carry, full, depth - full)
            if collect:
                branches.append(tail_branches)
        return (*carry, jnp.concatenate(branches) if collect else None)

    def unpatchify(self, x: jax.Array) -> jax.Array:
        """(B, T, p*p*C) -> (B, H, W, C); each token's vector is laid out (p, p, C) like DiT's."""
        p, c = self.config.patch_size, self.config.out_channels
        gh, gw = self.config.grid
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        return x.transpose(0, 1, 3, 2, 4, 5).reshape(x.shape[0], gh * p, gw * p, c)
