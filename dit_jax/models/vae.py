"""The Stable Diffusion VAE (AutoencoderKL, "kl-f8") in Flax NNX.

The latent space of stabilityai/sd-vae-ft-ema and sd-vae-ft-mse, which DiT samples in. Images are
NHWC floats in [-1, 1]; latents are NHWC and *unscaled*: the pipeline multiplies encoder means by
`config.scaling_factor` before diffusion and divides by it before `decode`.

    cfg = VAEConfig()                                   # the kl-f8 layout: 256 px <-> 32 x 32 x 4
    vae = AutoencoderKL(cfg, rngs=nnx.Rngs(0))          # weights: convert.vae.convert_vae(<diffusers dir>)
    mean, logvar = vae.encode(images)                   # (B, 256, 256, 3) -> 2 x (B, 32, 32, 4)
    images = vae.decode(latents / cfg.scaling_factor)   # (B, 32, 32, 4) -> (B, 256, 256, 3)

Module names follow diffusers' AutoencoderKL where that costs nothing, so the converter is a short
table; the mid-block's single attention is `attention` (not a one-element list) and the up/down
samplers are plain `upsample` / `downsample` convolutions.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# diffusers' defaults for keys a config.json may leave out (AutoencoderKL.__init__).
_DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}

# Keys of a diffusers config.json that change nothing in the network's arithmetic.
_IGNORED_DIFFUSERS_KEYS = {"_class_name", "_diffusers_version", "_name_or_path", "sample_size", "force_upcast"}

GROUP_NORM_EPS = 1e-6  # diffusers' VAE uses 1e-6 everywhere (GroupNorm's own default is 1e-5)
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # clamp of diffusers' DiagonalGaussianDistribution


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Hyper-parameters of an AutoencoderKL. Defaults are the SD kl-f8 VAE (sd-vae-ft-ema/-mse).

    Made by: python -m convert.vae <diffusers AutoencoderKL dir>   (prints the config it finds)
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # one entry per resolution level
    layers_per_block: int = 2  # resnets per encoder level; the decoder has one more per level
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215  # latents fed to diffusion = (mean - shift_factor) * scaling_factor
    shift_factor: float | None = None  # None for SD 1.x/2.x; set by SD3-style VAEs
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self) -> None:
        # JSON gives lists; keep the dataclass hashable and comparable.
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        self.validate()

    @property
    def downsample_factor(self) -> int:
        """Pixels per latent along one side (8 for kl-f8)."""
        return 2 ** (len(self.block_out_channels) - 1)

    def replace(self, **changes: Any) -> VAEConfig:
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Raise ValueError if the settings cannot build a network."""
        if not self.block_out_channels:
            raise ValueError("block_out_channels is empty; give one channel count per resolution level")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ValueError(
                f"block_out_channels {self.block_out_channels}: {bad} not divisible by norm_num_groups "
                f"{self.norm_num_groups}"
            )
        if self.layers_per_block < 1:
            raise ValueError(f"layers_per_block must be >= 1, got {self.layers_per_block}")
        for name in ("in_channels", "out_channels", "latent_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (tuples become lists); inverse of `from_dict`."""
        d = dataclasses.asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> VAEConfig:
        """Build from `to_dict()` output. Unknown fields are an error (they mean a different format)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(
                f"unknown VAE config fields {unknown}; valid fields: {sorted(names)} "
                "(for a diffusers config.json use VAEConfig.from_diffusers)"
            )
        return cls(**d)

    @classmethod
    def from_diffusers(cls, config_json: dict) -> VAEConfig:
        """Build from a diffusers AutoencoderKL `config.json` dict.

        Keys that do not change the arithmetic (sample_size, force_upcast, versions) are ignored;
        missing keys take diffusers' defaults. Raises ValueError for settings this model does not
        implement (other block types, activations, latents_mean/std normalisation, other classes).
        """
        class_name = config_json.get("_class_name", "AutoencoderKL")
        if class_name != "AutoencoderKL":
            raise ValueError(f"the config is for a {class_name!r} model; only AutoencoderKL is supported")
        unknown = sorted(set(config_json) - set(_DIFFUSERS_DEFAULTS) - _IGNORED_DIFFUSERS_KEYS)
        if unknown:
            raise ValueError(
                f"unsupported AutoencoderKL config keys {unknown}; supported keys: {sorted(_DIFFUSERS_DEFAULTS)}"
            )
        c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config_json.items() if k in _DIFFUSERS_DEFAULTS}}

        levels = len(c["block_out_channels"])
        problems = []
        for key, wanted in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            types = list(c[key])
            if len(types) != levels:
                problems.append(f"{key} has {len(types)} entries but block_out_channels has {levels}")
            others = sorted({t for t in types if t != wanted})
            if others:
                problems.append(f"{key} contains {others}; only {wanted} is supported")
        if c["act_fn"] not in ("silu", "swish"):
            problems.append(f"act_fn {c['act_fn']!r} is not supported (only silu)")
        for key in ("latents_mean", "latents_std"):
            if c[key] is not None:
                problems.append(f"{key} is set; per-channel latent normalisation is not supported")
        if problems:
            raise ValueError("unsupported AutoencoderKL config:\n  " + "\n  ".join(problems))

        return cls(
            in_channels=int(c["in_channels"]),
            out_channels=int(c["out_channels"]),
            latent_channels=int(c["latent_channels"]),
            block_out_channels=tuple(int(x) for x in c["block_out_channels"]),
            layers_per_block=int(c["layers_per_block"]),
            norm_num_groups=int(c["norm_num_groups"]),
            scaling_factor=float(c["scaling_factor"]),
            shift_factor=None if c["shift_factor"] is None else float(c["shift_factor"]),
            use_quant_conv=bool(c["use_quant_conv"]),
            use_post_quant_conv=bool(c["use_post_quant_conv"]),
            mid_block_add_attention=bool(c["mid_block_add_attention"]),
        )


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


class GroupNorm(nnx.Module):
    """GroupNorm over NHWC channels, statistics and affine in float32 whatever the compute dtype."""

    def __init__(self, channels: int, num_groups: int, *, dtype: Any = jnp.float32):
        self.num_groups = num_groups
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        grouped = x.astype(jnp.float32).reshape(b, h, w, self.num_groups, c // self.num_groups)
        mean = grouped.mean(axis=(1, 2, 4), keepdims=True)
        # Two-pass variance: E[x^2] - E[x]^2 loses digits on large-mean activations.
        var = jnp.square(grouped - mean).mean(axis=(1, 2, 4), keepdims=True)
        normed = ((grouped - mean) * jax.lax.rsqrt(var + GROUP_NORM_EPS)).reshape(b, h, w, c)
        return (normed * self.scale[...] + self.bias[...]).astype(self.dtype)


def _conv(
    cin: int, cout: int, kernel: int, rngs: nnx.Rngs, dtype: Any, *, stride: int = 1, padding: Any = None
) -> nnx.Conv:
    """A 2D conv with PyTorch's symmetric `kernel // 2` padding unless told otherwise."""
    if padding is None:
        padding = ((kernel // 2, kernel // 2),) * 2
    return nnx.Conv(cin, cout, (kernel, kernel), strides=stride, padding=padding, dtype=dtype, rngs=rngs)


class ResnetBlock(nnx.Module):
    """norm -> silu -> conv3x3, twice, plus a (1x1-projected when channels change) skip."""

    def __init__(self, cin: int, cout: int, groups: int, *, rngs: nnx.Rngs, dtype: Any):
        self.norm1 = GroupNorm(cin, groups, dtype=dtype)
        self.conv1 = _conv(cin, cout, 3, rngs, dtype)
        self.norm2 = GroupNorm(cout, groups, dtype=dtype)
        self.conv2 = _conv(cout, cout, 3, rngs, dtype)
        self.conv_shortcut = _conv(cin, cout, 1, rngs, dtype) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))  # (B, H, W, cout)
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class AttentionBlock(nnx.Module):
    """Single-head self-attention over all H*W positions, with pre group-norm and a residual."""

    def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs, dtype: Any):
        self.norm = GroupNorm(channels, groups, dtype=dtype)
        self.query = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.key = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.value = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)
        self.out = nnx.Linear(channels, channels, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        tokens = self.norm(x).reshape(b, h * w, 1, c)  # (B, T, heads=1, C)
        # Logits and softmax run in float32 inside dot_product_attention for any input dtype.
        attended = jax.nn.dot_product_attention(self.query(tokens), self.key(tokens), self.value(tokens))
        return x + self.out(attended.reshape(b, h, w, c))  # (B, H, W, C)


class MidBlock(nnx.Module):
    """resnet -> attention (optional) -> resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, with_attention: bool, *, rngs: nnx.Rngs, dtype: Any):
        self.resnets = nnx.List([ResnetBlock(channels, channels, groups, rngs=rngs, dtype=dtype) for _ in range(2)])
        self.attention = AttentionBlock(channels, groups, rngs=rngs, dtype=dtype) if with_attention else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


class DownBlock(nnx.Module):
    """Resnets at one resolution, then (except at the last level) a stride-2 conv."""

    def __init__(
        self, cin: int, cout: int, num_resnets: int, groups: int, downsample: bool, *, rngs: nnx.Rngs, dtype: Any
    ):
        self.resnets = nnx.List(
            [ResnetBlock(cin if i == 0 else cout, cout, groups, rngs=rngs, dtype=dtype) for i in range(num_resnets)]
        )
        # Asymmetric (0, 1) padding on bottom/right, as the original LDM encoder (diffusers: padding=0 + F.pad).
        self.downsample = (
            _conv(cout, cout, 3, rngs, dtype, stride=2, padding=((0, 1), (0, 1))) if downsample else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsample is None else self.downsample(x)  # (B, H/2, W/2, C) when downsampling


class UpBlock(nnx.Module):
    """Resnets at one resolution, then (except at the last level) nearest 2x upsampling + conv3x3."""

    def __init__(
        self, cin: int, cout: int, num_resnets: int, groups: int, upsample: bool, *, rngs: nnx.Rngs, dtype: Any
    ):
        self.resnets = nnx.List(
            [ResnetBlock(cin if i == 0 else cout, cout, groups, rngs=rngs, dtype=dtype) for i in range(num_resnets)]
        )
        self.upsample = _conv(cout, cout, 3, rngs, dtype) if upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsample is None:
            return x
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour, (B, 2H, 2W, C)
        return self.upsample(x)


class Encoder(nnx.Module):
    """Image (B, H, W, in) -> moments (B, H/f, W/f, 2 * latent) before quant_conv."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, dtype: Any):
        chans, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = _conv(config.in_channels, chans[0], 3, rngs, dtype)
        self.down_blocks = nnx.List(
            [
                DownBlock(
                    chans[max(i - 1, 0)], chans[i], config.layers_per_block, groups, i < len(chans) - 1,
                    rngs=rngs, dtype=dtype,
                )
                for i in range(len(chans))
            ]
        )
        self.mid_block = MidBlock(chans[-1], groups, config.mid_block_add_attention, rngs=rngs, dtype=dtype)
        self.norm_out = GroupNorm(chans[-1], groups, dtype=dtype)
        self.conv_out = _conv(chans[-1], 2 * config.latent_channels, 3, rngs, dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class Decoder(nnx.Module):
    """Latents (B, h, w, latent) -> image (B, h*f, w*f, out), after post_quant_conv."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, dtype: Any):
        chans, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups
        self.conv_in = _conv(config.latent_channels, chans[0], 3, rngs, dtype)
        self.mid_block = MidBlock(chans[0], groups, config.mid_block_add_attention, rngs=rngs, dtype=dtype)
        self.up_blocks = nnx.List(
            [
                UpBlock(
                    chans[max(i - 1, 0)], chans[i], config.layers_per_block + 1, groups, i < len(chans) - 1,
                    rngs=rngs, dtype=dtype,
                )
                for i in range(len(chans))
            ]
        )
        self.norm_out = GroupNorm(chans[-1], groups, dtype=dtype)
        self.conv_out = _conv(chans[-1], config.out_channels, 3, rngs, dtype)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.norm_out(x)))


class AutoencoderKL(nnx.Module):
    """The KL-regularised autoencoder of latent diffusion. NHWC in, NHWC out.

    Parameters are float32; `dtype` is the compute dtype of convolutions and projections (group
    norms and the attention softmax always run in float32). Outputs are float32.
    """

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.config = config
        self.dtype = dtype
        moments = 2 * config.latent_channels
        self.encoder = Encoder(config, rngs=rngs, dtype=dtype)
        self.decoder = Decoder(config, rngs=rngs, dtype=dtype)
        self.quant_conv = _conv(moments, moments, 1, rngs, dtype) if config.use_quant_conv else None
        latent = config.latent_channels
        self.post_quant_conv = _conv(latent, latent, 1, rngs, dtype) if config.use_post_quant_conv else None

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images (B, H, W, in_channels) in [-1, 1] -> (mean, logvar), each (B, H/f, W/f, latent).

        Latents are unscaled: multiply `mean` (or a sample `mean + exp(logvar / 2) * noise`) by
        `config.scaling_factor` for diffusion. `logvar` is clamped to [-30, 20] like diffusers.
        """
        moments = self.encoder(x.astype(self.dtype))  # (B, H/f, W/f, 2 * latent)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)

    def decode(self, z: jax.Array) -> jax.Array:
        """Unscaled latents (B, h, w, latent) -> images (B, h*f, w*f, out_channels), about [-1, 1]."""
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)
