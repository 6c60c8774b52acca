"""PixArt-alpha / PixArt-Sigma (Chen et al., 2023 / 2024): the text-to-image DiT with adaLN-single,
in Flax NNX, merge-aware like `dit_jax.models.dit`.

The network diffusers' `PixArtTransformer2DModel` computes (norm_type "ada_norm_single"): a patch
embedding plus a 2-D sin-cos position embedding with PixArt's interpolation scale; one timestep
MLP (plus resolution / aspect-ratio embeddings for the 1024 px alpha model) whose output `t_block`
turns into the 6-way modulation every block shares (each block adds its own `scale_shift_table`);
blocks of gated self-attention, cross-attention to the projected T5 caption (on the hidden states
as they are: PixArt puts no norm before it, and no gate on it) and a gated MLP. Images are NHWC.

The conditioning is one pytree, so the sampler treats DiT and PixArt alike:

    cond = {"text": (B, L, caption_channels) T5 embeddings, "text_mask": (B, L) 1 = token, 0 = pad,
            # micro-conditions (use_additional_conditions) only:
            "resolution": (B, 2) (height, width) in pixels, "aspect_ratio": (B, 1) height / width}
    model = PixArt(variant("PixArt-Sigma-XL/2-1024"), rngs=nnx.Rngs(0))
    out = model(x, t, cond)       # x (B, 128, 128, 4) -> (B, 128, 128, 8): eps and the learned variance

Token merging (`forward_merged`): a block builds its plans from its modulated self-attention input;
the self-attention input is merged with the attention plan, the cross-attention *queries* follow
the same plan (the caption's keys and values are never merged), the MLP input takes the MLP plan.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.models.config import PatchGridConfig

from dit_jax.models.dit import DiT, PatchEmbed, TimestepEmbedder, _linear
from dit_jax.nn.attention import MultiHeadAttention
from dit_jax.nn.branches import attention_branch, cross_attention_branch, mlp_branch
from dit_jax.nn.layers import Mlp, layer_norm, modulate
from dit_jax.nn.stack import stack_modules
from sdtm.merger import BlockMerger, MergeState

# diffusers turns a text mask into this additive bias (keep: 0, pad: -10000) in the hidden dtype;
# the same bias here gives the same numbers (a padded key's weight underflows to exactly 0).
MASK_BIAS = -10000.0
# The final layer's LayerNorm: diffusers fixes its eps whatever norm_eps says.
FINAL_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class PixArtConfig(PatchGridConfig):
    family_name = "PixArt"

    input_size: int = 128  # latent side (diffusers' sample_size): 128 for 1024 px, 64 for 512 px
    patch_size: int = 2
    in_channels: int = 4
    out_channels: int = 8  # 2 * in_channels: eps and the learned variance
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0  # FF inner width 4 * 1152 = 4608
    caption_channels: int = 4096  # T5-XXL's width
    # Positions are arange(side) / interpolation_scale (at the trained size). None: diffusers'
    # rule for configs without the field, max(input_size // 64, 1).
    interpolation_scale: float | None = None
    use_additional_conditions: bool = False  # resolution / aspect-ratio micro-conditions
    max_text_length: int = 300  # T5 tokens the pipeline pads to: alpha 120, Sigma 300
    norm_eps: float = 1e-6

    def __post_init__(self):
        scale = self.interpolation_scale
        if scale is None:
            scale = max(int(self.input_size) // 64, 1)
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
            raise ValueError(f"interpolation_scale must be a number, got {scale!r}")
        object.__setattr__(self, "interpolation_scale", float(scale))

    @property
    def learn_sigma(self) -> bool:
        return self.out_channels == 2 * self.in_channels

    @property
    def base_size(self) -> int:
        """The token-grid side the position embedding is laid out for (diffusers' base_size)."""
        return self.input_size // self.patch_size


    def validate(self) -> None:
        for name in ("input_size", "patch_size", "in_channels", "out_channels", "hidden_size", "depth",
                     "num_heads", "caption_channels", "max_text_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.input_size % self.patch_size:
            raise ValueError(f"input_size {self.input_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"the sin-cos position embedding needs hidden_size divisible by 4, got {self.hidden_size}")
        if self.use_additional_conditions and self.hidden_size % 3:
            raise ValueError(
                f"micro-conditions split hidden_size into three equal parts (resolution height, width, "
                f"aspect ratio): {self.hidden_size} is not divisible by 3"
            )
        if not self.interpolation_scale > 0:
            raise ValueError(f"interpolation_scale must be > 0, got {self.interpolation_scale}")
        if int(self.hidden_size * self.mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio {self.mlp_ratio} leaves the MLP no hidden units")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be > 0, got {self.norm_eps}")


# The official checkpoints (PixArt-XL/2: depth 28, width 1152, 16 heads, T5-XXL captions). Sizes,
# scales and micro-conditions as their diffusers transformer configs load them:
# - alpha: converted without an interpolation_scale, so diffusers' rule max(sample_size // 64, 1)
#   applies (1024 px: 2, 512 and 256 px: 1, as PixArt-alpha trained them: its 256 px config keeps
#   lewei_scale 1.0); the 1024 px model (PixArtMS) has the micro-conditions (sample_size 128
#   switches them on in diffusers).
# - Sigma: scales written into the configs (256: 0.5, 512: 1, 1024: 2, 2K: 4), no micro-conditions.
# Text lengths: alpha 120 T5 tokens, Sigma 300.
_XL2 = {"patch_size": 2, "hidden_size": 1152, "depth": 28, "num_heads": 16}
VARIANTS: dict[str, PixArtConfig] = {
    "PixArt-alpha-XL/2-1024": PixArtConfig(
        input_size=128, interpolation_scale=2.0, use_additional_conditions=True, max_text_length=120, **_XL2),
    "PixArt-alpha-XL/2-512": PixArtConfig(input_size=64, interpolation_scale=1.0, max_text_length=120, **_XL2),
    "PixArt-alpha-XL/2-256": PixArtConfig(input_size=32, interpolation_scale=1.0, max_text_length=120, **_XL2),
    "PixArt-Sigma-XL/2-2K": PixArtConfig(input_size=256, interpolation_scale=4.0, max_text_length=300, **_XL2),
    "PixArt-Sigma-XL/2-1024": PixArtConfig(input_size=128, interpolation_scale=2.0, max_text_length=300, **_XL2),
    "PixArt-Sigma-XL/2-512": PixArtConfig(input_size=64, interpolation_scale=1.0, max_text_length=300, **_XL2),
    "PixArt-Sigma-XL/2-256": PixArtConfig(input_size=32, interpolation_scale=0.5, max_text_length=300, **_XL2),
}


# The Hugging Face repositories of the official diffusers checkpoints (organisation PixArt-alpha).
HUB_NAMES = {
    "PixArt-XL-2-1024-MS": "PixArt-alpha-XL/2-1024",
    "PixArt-XL-2-512x512": "PixArt-alpha-XL/2-512",
    "PixArt-XL-2-256x256": "PixArt-alpha-XL/2-256",
    "PixArt-Sigma-XL-2-2K-MS": "PixArt-Sigma-XL/2-2K",
    "PixArt-Sigma-XL-2-1024-MS": "PixArt-Sigma-XL/2-1024",
    "PixArt-Sigma-XL-2-512-MS": "PixArt-Sigma-XL/2-512",
    "PixArt-Sigma-XL-2-256x256": "PixArt-Sigma-XL/2-256",
}


def variant(name: str, **changes: Any) -> PixArtConfig:
    """Config of an official checkpoint, with optional field changes. `name` is a VARIANTS key
    ("PixArt-Sigma-XL/2-1024", or with "XL-2") or a Hub repository ("PixArt-alpha/PixArt-XL-2-1024-MS").

    Changing input_size keeps the variant's interpolation_scale (that is how PixArt samples other
    sizes with a trained model); pass interpolation_scale too to change it.
    """
    key = name.removeprefix("PixArt-alpha/")
    key = HUB_NAMES.get(key, key)
    key = key if key in VARIANTS else key.replace("XL-2", "XL/2")
    if key not in VARIANTS:
        raise ValueError(
            f"unknown PixArt variant {name!r}; known: {', '.join(VARIANTS)} (or a Hub name: {', '.join(HUB_NAMES)})"
        )
    return VARIANTS[key].replace(**changes)


def pixart_pos_embed_2d(
    dim: int, grid_h: int, grid_w: int, base_size: int, interpolation_scale: float
) -> np.ndarray:
    """PixArt's 2-D sin-cos position embedding: (grid_h * grid_w, dim) float32, row-major tokens.

    Positions along an axis of n tokens are arange(n) / (n / base_size) / interpolation_scale
    (float32, as diffusers computes them), so a grid of base_size tokens spans base_size /
    interpolation_scale whatever its resolution. The first half of the channels encodes the
    column, the second half the row, each [sin(p w_i), cos(p w_i)], w_i = 10000^(-i / (dim/4)).
    (`dit_jax.nn.layers.sincos_pos_embed_2d` is the case n = base_size, scale 1.)
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a hidden size divisible by 4, got {dim}")

    def positions(n: int) -> np.ndarray:
        pos = np.arange(n, dtype=np.float32) / np.float32(n / base_size) / np.float32(interpolation_scale)
        return pos.astype(np.float64)

    def one_axis(pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
        angles = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    rows, cols = np.meshgrid(positions(grid_h), positions(grid_w), indexing="ij")
    return np.concatenate([one_axis(cols), one_axis(rows)], axis=1).astype(np.float32)


@functools.lru_cache(maxsize=16)
def _pos_embed(config: PixArtConfig) -> np.ndarray:
    return pixart_pos_embed_2d(config.hidden_size, *config.grid, config.base_size, config.interpolation_scale)[None]


def text_bias(text_mask: jax.Array, dtype) -> jax.Array:
    """(B, L) mask (1 / True: a token, 0: padding) -> the (B, 1, 1, L) additive attention bias."""
    return ((1 - text_mask.astype(dtype)) * MASK_BIAS).astype(dtype)[:, None, None, :]


class CaptionProjection(nnx.Module):
    """T5 features -> hidden size: Linear, tanh-GELU, Linear (PixArt's y_embedder.y_proj)."""

    def __init__(self, caption_channels: int, hidden: int, *, rngs: nnx.Rngs, dtype):
        self.fc1 = _linear(caption_channels, hidden, rngs, dtype)
        self.fc2 = _linear(hidden, hidden, rngs, dtype)

    def __call__(self, caption: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(caption), approximate=True))


def _table(rngs: nnx.Rngs, rows: int, hidden: int, dtype) -> nnx.Param:
    """A scale_shift_table, initialised as PixArt does: N(0, 1) / sqrt(hidden)."""
    return nnx.Param((jax.random.normal(rngs.params(), (rows, hidden), jnp.float32) / hidden**0.5).astype(dtype))


class BlockContext(NamedTuple):
    """What every block reads besides its tokens (closed over by the block scan, never scanned)."""

    modulation: jax.Array  # (B, 6 * D): t_block's output, shared by the blocks
    text: jax.Array  # (B, L, D): the projected caption
    text_bias: jax.Array  # (B, 1, 1, L): 0 for tokens, -10000 for padding
    prompt_weight: float  # static: multiplies the cross-attention branch (1.0: untouched)


class PixArtBlock(nnx.Module):
    """adaLN-single block: self-attention (gated), cross-attention to the caption, MLP (gated)."""

    def __init__(self, cfg: PixArtConfig, *, rngs: nnx.Rngs, dtype):
        d = cfg.hidden_size
        self.norm_eps = cfg.norm_eps
        self.scale_shift_table = _table(rngs, 6, d, dtype)
        self.attn = MultiHeadAttention(d, cfg.num_heads, rngs=rngs, dtype=dtype)
        self.cross_attn = MultiHeadAttention(d, cfg.num_heads, rngs=rngs, dtype=dtype)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio), rngs=rngs, dtype=dtype, param_dtype=dtype)

    def __call__(
        self,
        x: jax.Array,  # (B, N, D)
        c: BlockContext,
        merger: BlockMerger | None = None,
        state: MergeState | None = None,
        grid: tuple[int, int] | None = None,
        plans: tuple | None = None,
        cache: jax.Array | None = None,
        cache_weight: float = 1.0,
    ) -> tuple[jax.Array, MergeState | None, tuple, jax.Array]:
        """Returns (x, state, (attn_plan, mlp_plan), branches), as `DiTBlock` does.

        plans: reuse these (built by an earlier block) instead of asking the merger.
        cache (3, B, N, D): this block's gated self-attention, gated MLP and cross-attention
          (before the prompt weight) outputs at the last full-resolution step; merged tokens
          blend with them (`blend_merged`, `dit_jax.nn.branches`).
        branches (3, B, N, D): this call's outputs of the same three branches.
        """
        b, _, d = x.shape
        modulation = self.scale_shift_table[None] + c.modulation.reshape(b, 6, d)  # (B, 6, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (modulation[:, i] for i in range(6))
        h = modulate(layer_norm(x, self.norm_eps), shift_msa, scale_msa)  # (B, N, D): the merge metric
        attn_branch, (attn_plan, mlp_plan), state = attention_branch(
            self.attn, h, gate_msa, merger, state, grid, plans, cache, cache_weight)
        x = x + attn_branch
        # Cross-attention on the un-normalised tokens; its queries follow the attention plan.
        cross = cross_attention_branch(self.cross_attn, x, c.text, c.text_bias, attn_plan, cache, cache_weight)
        x = x + (cross if c.prompt_weight == 1.0 else c.prompt_weight * cross)
        h = modulate(layer_norm(x, self.norm_eps), shift_mlp, scale_mlp)
        mlp_out = mlp_branch(self.mlp, h, gate_mlp, mlp_plan, cache, cache_weight)
        x = x + mlp_out
        return x, state, (attn_plan, mlp_plan), jnp.stack([attn_branch, mlp_out, cross])


class FinalLayer(nnx.Module):
    """LayerNorm, shift/scale from (its table + the embedded timestep), linear to patches."""

    def __init__(self, cfg: PixArtConfig, *, rngs: nnx.Rngs, dtype):
        d = cfg.hidden_size
        self.scale_shift_table = _table(rngs, 2, d, dtype)
        self.linear = _linear(d, cfg.patch_size**2 * cfg.out_channels, rngs, dtype)

    def __call__(self, x: jax.Array, embedded_timestep: jax.Array) -> jax.Array:
        shift_scale = self.scale_shift_table[None] + embedded_timestep[:, None]  # (B, 2, D)
        return self.linear(modulate(layer_norm(x, FINAL_NORM_EPS), shift_scale[:, 0], shift_scale[:, 1]))


_COND_SHAPES = {"text": "(B, L, caption_channels)", "text_mask": "(B, L)", "resolution": "(B, 2)",
                "aspect_ratio": "(B, 1)"}


class PixArt(nnx.Module):
    # Branch outputs per block in SDTM's protected-step cache: self-attention, MLP, cross-attention.
    CACHED_BRANCHES = 3
    PER_BLOCK_MODULATION = False  # every block reads the whole BlockContext (see DiT)

    def __init__(self, config: PixArtConfig, *, rngs: nnx.Rngs, dtype=jnp.float32):
        config.validate()
        self.config = config
        d = config.hidden_size
        self.x_embedder = PatchEmbed(config, rngs=rngs, dtype=dtype)
        self.t_embedder = TimestepEmbedder(d, rngs=rngs, dtype=dtype)
        if config.use_additional_conditions:
            self.csize_embedder = TimestepEmbedder(d // 3, rngs=rngs, dtype=dtype)  # per side: 2 * d/3
            self.ar_embedder = TimestepEmbedder(d // 3, rngs=rngs, dtype=dtype)
        self.t_block = _linear(d, 6 * d, rngs, dtype)
        self.y_embedder = CaptionProjection(config.caption_channels, d, rngs=rngs, dtype=dtype)
        self.blocks = stack_modules([PixArtBlock(config, rngs=rngs, dtype=dtype) for _ in range(config.depth)])
        self.final_layer = FinalLayer(config, rngs=rngs, dtype=dtype)

    # Shared with DiT as they are: they read only config.{grid, depth, patch_size, out_channels},
    # PER_BLOCK_MODULATION and self.blocks (stacked), and call each block as block(x, c, merger,
    # state, grid, plans, cache, cache_weight), which PixArtBlock follows with c a BlockContext.
    block = DiT.block
    run_blocks = DiT.run_blocks
    _scan_blocks = DiT._scan_blocks
    unpatchify = DiT.unpatchify

    def __call__(self, x: jax.Array, t: jax.Array, cond: dict) -> jax.Array:
        """x (B, H, W, C) NHWC, t (B,) timesteps, cond (module docstring) -> (B, H, W, out_channels)."""
        return self.forward_merged(x, t, cond)[0]

    def cond_keys(self) -> list[str]:
        """The keys of this model's `cond` dict."""
        extra = ["resolution", "aspect_ratio"] if self.config.use_additional_conditions else []
        return ["text", "text_mask", *extra]

    def check_cond(self, cond: dict, batch: int) -> None:
        """Raise a ValueError unless `cond` holds exactly this model's conditioning, batch-sized."""
        cfg = self.config
        want = self.cond_keys()
        if not isinstance(cond, dict):
            raise ValueError(f"PixArt's cond is a dict with keys {want}, got {type(cond).__name__}")
        missing, extra = [k for k in want if k not in cond], sorted(set(cond) - set(want))
        if missing or extra:
            what = "with" if cfg.use_additional_conditions else "without"
            problems = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
            raise ValueError(f"this PixArt ({what} micro-conditions) takes cond keys {want}; {'; '.join(problems)}")
        text = jnp.shape(cond["text"])
        length = text[1] if len(text) == 3 else None
        expected = {
            "text": (batch, length, cfg.caption_channels), "text_mask": (batch, length),
            "resolution": (batch, 2), "aspect_ratio": (batch, 1),
        }
        for key in want:
            got = tuple(jnp.shape(cond[key]))
            if got != expected[key]:
                raise ValueError(f"cond[{key!r}] has shape {got}, expected {_COND_SHAPES[key]} = {expected[key]}")

    def embed_conditions(self, t: jax.Array, cond: dict) -> jax.Array:
        """The embedded timestep (B, D) (plus the micro-condition embeddings): what t_block and the
        final layer read."""
        emb = self.t_embedder(t)  # (B, D)
        if self.config.use_additional_conditions:
            b = emb.shape[0]
            resolution = self.csize_embedder(jnp.reshape(cond["resolution"], (-1,))).reshape(b, -1)  # (B, 2D/3)
            aspect = self.ar_embedder(jnp.reshape(cond["aspect_ratio"], (-1,))).reshape(b, -1)  # (B, D/3)
            emb = emb + jnp.concatenate([resolution, aspect], axis=1)
        return emb

    def forward_merged(
        self,
        x: jax.Array,
        t: jax.Array,
        cond: dict,
        merger: BlockMerger | None = None,
        merge_state: MergeState | None = None,
        scan_blocks: bool = False,
        cache: jax.Array | None = None,
        cache_weight: float = 1.0,
        return_branches: bool = False,
        prompt_weight: float = 1.0,
    ):
        """The forward pass with a token-merging strategy -> (output, new merge state), and with
        `return_branches` also every block's branch outputs (depth, 3, B, N, D; see `PixArtBlock`).

        Same contract as `DiT.forward_merged`: scan_blocks runs the blocks as a `lax.scan` (default
        False: one after another); cache (depth, 3, B, N, D) and cache_weight blend merged tokens' outputs
        with the last full-resolution step's branches.
        prompt_weight: a static Python float multiplying every cross-attention branch (SDTM's
        per-stage prompt reweighting); 1.0 is the model itself, bit for bit.
        """
        cfg = self.config
        b, hgt, wid, _ = x.shape
        if (hgt, wid) != (cfg.input_size, cfg.input_size):
            raise ValueError(f"this PixArt takes {cfg.input_size}x{cfg.input_size} inputs, got {hgt}x{wid}")
        if isinstance(prompt_weight, bool) or not isinstance(prompt_weight, (int, float, np.integer, np.floating)):
            raise ValueError(
                f"prompt_weight must be a Python float (static: one compiled program per weight), "
                f"got {prompt_weight!r}"
            )
        self.check_cond(cond, b)
        tokens = self.x_embedder(x)  # (B, T, D)
        dtype = tokens.dtype
        tokens = (tokens.astype(jnp.float32) + _pos_embed(cfg)).astype(dtype)  # added in float32, as diffusers does
        emb = self.embed_conditions(jnp.broadcast_to(t, (b,)), cond)  # (B, D)
        context = BlockContext(
            modulation=self.t_block(jax.nn.silu(emb)),  # (B, 6D)
            text=self.y_embedder(jnp.asarray(cond["text"]).astype(dtype)),  # (B, L, D)
            text_bias=text_bias(jnp.asarray(cond["text_mask"]), dtype),  # (B, 1, 1, L)
            prompt_weight=float(prompt_weight),
        )
        tokens, merge_state, branches = self.run_blocks(
            tokens, context, merger, merge_state, scan_blocks, cache, cache_weight, return_branches
        )
        out = self.unpatchify(self.final_layer(tokens, emb))  # (B, H, W, C_out)
        return (out, merge_state, branches) if return_branches else (out, merge_state)
