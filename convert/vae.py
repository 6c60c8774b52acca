"""Convert a diffusers AutoencoderKL (e.g. stabilityai/sd-vae-ft-ema, sd-vae-ft-mse) to dit_jax params.

    config, params = convert_vae("ckpts/sd-vae-ft-ema")   # dir with config.json + weights
    vae = AutoencoderKL(config, rngs=nnx.Rngs(0)); nnx.update(vae, params)

`python -m convert.vae SRC` prints the config it finds and the parameter count (writes nothing);
`python -m convert.dit ... --vae SRC` stores the result next to the DiT weights.

Both key spellings of the mid-block attention are accepted: the current one (`attentions.0.to_q`,
`to_k`, `to_v`, `to_out.0`) and the one of checkpoints saved by early diffusers (`query`, `key`,
`value`, `proj_attn`), which is what sd-vae-ft-ema's `.bin` holds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from convert.common import ConversionError, check_state_dict, read_state_dict, torch_conv, torch_linear
from dit_jax.models.vae import VAEConfig

# Looked for in this order inside a diffusers model directory.
WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
)
SHARD_INDEX_FILES = tuple(f"{name}.index.json" for name in WEIGHT_FILES if name.endswith(".safetensors"))

# Early diffusers' AttentionBlock names -> the current Attention names.
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_OLD_ATTENTION_KEY = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")

Path = tuple[Any, ...]  # a path into the nested param dict: str names and int list indices


# ----------------------------------------------------------------------------------------------
# Expected layout, from the config alone: diffusers key -> (our path, torch shape, kind)
# ----------------------------------------------------------------------------------------------


def _conv(key: str, path: Path, cin: int, cout: int, kernel: int) -> Iterator[tuple[str, Path, tuple, str]]:
    yield f"{key}.weight", path + ("kernel",), (cout, cin, kernel, kernel), "conv"
    yield f"{key}.bias", path + ("bias",), (cout,), "vector"


def _linear(key: str, path: Path, cin: int, cout: int) -> Iterator[tuple[str, Path, tuple, str]]:
    yield f"{key}.weight", path + ("kernel",), (cout, cin), "linear"
    yield f"{key}.bias", path + ("bias",), (cout,), "vector"


def _norm(key: str, path: Path, channels: int) -> Iterator[tuple[str, Path, tuple, str]]:
    yield f"{key}.weight", path + ("scale",), (channels,), "vector"
    yield f"{key}.bias", path + ("bias",), (channels,), "vector"


def _resnet(key: str, path: Path, cin: int, cout: int) -> Iterator[tuple[str, Path, tuple, str]]:
    yield from _norm(f"{key}.norm1", path + ("norm1",), cin)
    yield from _conv(f"{key}.conv1", path + ("conv1",), cin, cout, 3)
    yield from _norm(f"{key}.norm2", path + ("norm2",), cout)
    yield from _conv(f"{key}.conv2", path + ("conv2",), cout, cout, 3)
    if cin != cout:
        yield from _conv(f"{key}.conv_shortcut", path + ("conv_shortcut",), cin, cout, 1)


def _mid_block(key: str, path: Path, channels: int, with_attention: bool) -> Iterator[tuple[str, Path, tuple, str]]:
    for i in range(2):
        yield from _resnet(f"{key}.resnets.{i}", path + ("resnets", i), channels, channels)
    if with_attention:
        attn, attn_path = f"{key}.attentions.0", path + ("attention",)
        yield from _norm(f"{attn}.group_norm", attn_path + ("norm",), channels)
        for theirs, ours in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "out")):
            yield from _linear(f"{attn}.{theirs}", attn_path + (ours,), channels, channels)


def _layout(config: VAEConfig) -> Iterator[tuple[str, Path, tuple, str]]:
    chans, latent = config.block_out_channels, config.latent_channels
    levels = len(chans)

    enc = ("encoder",)
    yield from _conv("encoder.conv_in", enc + ("conv_in",), config.in_channels, chans[0], 3)
    for i in range(levels):
        cin = chans[max(i - 1, 0)]
        for j in range(config.layers_per_block):
            yield from _resnet(
                f"encoder.down_blocks.{i}.resnets.{j}", enc + ("down_blocks", i, "resnets", j),
                cin if j == 0 else chans[i], chans[i],
            )
        if i < levels - 1:
            yield from _conv(
                f"encoder.down_blocks.{i}.downsamplers.0.conv", enc + ("down_blocks", i, "downsample"),
                chans[i], chans[i], 3,
            )
    yield from _mid_block("encoder.mid_block", enc + ("mid_block",), chans[-1], config.mid_block_add_attention)
    yield from _norm("encoder.conv_norm_out", enc + ("norm_out",), chans[-1])
    yield from _conv("encoder.conv_out", enc + ("conv_out",), chans[-1], 2 * latent, 3)

    dec, rev = ("decoder",), tuple(reversed(chans))
    yield from _conv("decoder.conv_in", dec + ("conv_in",), latent, rev[0], 3)
    yield from _mid_block("decoder.mid_block", dec + ("mid_block",), rev[0], config.mid_block_add_attention)
    for i in range(levels):
        cin = rev[max(i - 1, 0)]
        for j in range(config.layers_per_block + 1):
            yield from _resnet(
                f"decoder.up_blocks.{i}.resnets.{j}", dec + ("up_blocks", i, "resnets", j),
                cin if j == 0 else rev[i], rev[i],
            )
        if i < levels - 1:
            yield from _conv(
                f"decoder.up_blocks.{i}.upsamplers.0.conv", dec + ("up_blocks", i, "upsample"), rev[i], rev[i], 3
            )
    yield from _norm("decoder.conv_norm_out", dec + ("norm_out",), rev[-1])
    yield from _conv("decoder.conv_out", dec + ("conv_out",), rev[-1], config.out_channels, 3)

    if config.use_quant_conv:
        yield from _conv("quant_conv", ("quant_conv",), 2 * latent, 2 * latent, 1)
    if config.use_post_quant_conv:
        yield from _conv("post_quant_conv", ("post_quant_conv",), latent, latent, 1)


def expected_shapes(config: VAEConfig) -> dict[str, tuple[int, ...]]:
    """The diffusers state-dict keys (current spelling) and PyTorch shapes this config needs."""
    return {key: shape for key, _, shape, _ in _layout(config)}


def _to_flax_shape(shape: tuple[int, ...], kind: str) -> tuple[int, ...]:
    if kind == "conv":  # [O, I, kh, kw] -> [kh, kw, I, O]
        return (shape[2], shape[3], shape[1], shape[0])
    if kind == "linear":  # [O, I] -> [I, O]
        return (shape[1], shape[0])
    return shape


def param_shapes(config: VAEConfig) -> dict:
    """Shapes of the converted param tree, nested like `nnx.state(AutoencoderKL(config), nnx.Param)`."""
    tree: dict = {}
    for _, path, shape, kind in _layout(config):
        _set_path(tree, path, _to_flax_shape(shape, kind))
    return tree


def _set_path(tree: dict, path: Path, value: Any) -> None:
    for part in path[:-1]:
        tree = tree.setdefault(part, {})
    tree[path[-1]] = value


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def _find_model_dir(src: str) -> str:
    """`src` itself, or its `vae/` subfolder when `src` is a whole diffusers pipeline."""
    if not os.path.isfile(os.path.join(src, "config.json")) and os.path.isfile(os.path.join(src, "vae", "config.json")):
        return os.path.join(src, "vae")
    return src


def _read_config(path: str) -> VAEConfig:
    if not os.path.isfile(path):
        raise ConversionError(
            f"{path}: not found; a diffusers AutoencoderKL directory holds config.json next to its weights "
            "(for a lone weights file pass config=..., on the command line --config)"
        )
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: not a readable JSON config ({e})") from e
    if not isinstance(raw, dict):
        raise ConversionError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    try:
        return VAEConfig.from_diffusers(raw)
    except ValueError as e:
        raise ConversionError(f"{path}: {e}") from e


def _read_weights(model_dir: str) -> tuple[str, dict[str, np.ndarray]]:
    for name in WEIGHT_FILES:
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            return path, read_state_dict(path)
    for name in SHARD_INDEX_FILES:
        index_path = os.path.join(model_dir, name)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ConversionError(f"{index_path}: not a readable shard index ({e})") from e
            state: dict[str, np.ndarray] = {}
            for shard in shards:
                state.update(read_state_dict(os.path.join(model_dir, shard)))
            return index_path, state
    raise ConversionError(
        f"{model_dir}: no weights file found; looked for {', '.join(WEIGHT_FILES + SHARD_INDEX_FILES)}"
    )


def _modernise_keys(source: str, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename early-diffusers attention keys (query/key/value/proj_attn) to to_q/to_k/to_v/to_out.0."""
    out: dict[str, np.ndarray] = {}
    renamed_from: dict[str, str] = {}
    for key, value in state.items():
        match = _OLD_ATTENTION_KEY.match(key)
        new_key = key
        if match:
            prefix, old, param = match.groups()
            new_key = f"{prefix}.{_OLD_ATTENTION_NAMES[old]}.{param}"
            # Original LDM checkpoints stored these projections as 1x1 convs.
            if param == "weight" and value.ndim == 4 and value.shape[2:] == (1, 1):
                value = value[:, :, 0, 0]
        if new_key in out:
            pair = sorted((renamed_from[new_key], key))
            raise ConversionError(
                f"{source}: {pair[0]!r} and {pair[1]!r} are both present and name the same weight; keep one"
            )
        out[new_key] = value
        renamed_from[new_key] = key
    return out


def _looks_like_ldm(state: dict[str, np.ndarray]) -> bool:
    return any(k.startswith(("encoder.down.", "first_stage_model.")) for k in state)


def convert_state_dict(source: str, state: dict[str, np.ndarray], config: VAEConfig) -> dict:
    """Map a diffusers AutoencoderKL state dict onto the nested param dict of `AutoencoderKL(config)`.

    Every key and shape is checked first; a ConversionError lists all problems at once.
    Returns float32 NumPy arrays in the structure of `nnx.state(model, nnx.Param).to_pure_dict()`.
    """
    if _looks_like_ldm(state):
        raise ConversionError(
            f"{source}: this is an original CompVis/LDM checkpoint (keys like 'encoder.down.0.block.0...'); "
            "convert the diffusers-format VAE instead (e.g. the stabilityai/sd-vae-ft-ema repository)"
        )
    state = _modernise_keys(source, state)
    layout = list(_layout(config))
    check_state_dict(source, {k: tuple(v.shape) for k, v in state.items()}, {k: s for k, _, s, _ in layout})

    params: dict = {}
    for key, path, _, kind in layout:
        value = np.asarray(state[key], dtype=np.float32)
        if kind == "conv":
            value = torch_conv(value)
        elif kind == "linear":
            value = torch_linear(value)
        _set_path(params, path, value)
    return params


def convert_vae(
    src: str | os.PathLike, *, config: VAEConfig | dict | str | os.PathLike | None = None
) -> tuple[VAEConfig, dict]:
    """Read a diffusers AutoencoderKL and return `(VAEConfig, params)`.

    `src` is a model directory (config.json + diffusion_pytorch_model.{safetensors,bin}), a whole
    pipeline directory (its `vae/` is used), or a single weights file whose config comes from
    `config` (a VAEConfig, a diffusers config dict, or a config.json path) or a config.json beside it.
    `params` are float32 NumPy arrays shaped like `nnx.state(AutoencoderKL(cfg), nnx.Param).to_pure_dict()`.
    Raises ConversionError (a ValueError) naming what is missing, unexpected or misshapen.
    """
    src = os.fspath(src)
    if os.path.isdir(src):
        model_dir = _find_model_dir(src)
        weights_path: str | None = None
    elif os.path.isfile(src):
        model_dir, weights_path = os.path.dirname(src) or ".", src
    else:
        raise ConversionError(f"{src}: no such file or directory")

    if isinstance(config, VAEConfig):
        vae_config = config
    elif isinstance(config, dict):
        try:
            vae_config = VAEConfig.from_diffusers(config)
        except ValueError as e:
            raise ConversionError(f"config: {e}") from e
    else:
        vae_config = _read_config(os.fspath(config) if config is not None else os.path.join(model_dir, "config.json"))

    if weights_path is None:
        source, state = _read_weights(model_dir)
    else:
        source, state = weights_path, read_state_dict(weights_path)
    return vae_config, convert_state_dict(source, state, vae_config)


def _count(tree: dict) -> int:
    return sum(_count(v) if isinstance(v, dict) else int(np.prod(v.shape)) for v in tree.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m convert.vae", description="Check a diffusers AutoencoderKL converts; print its config."
    )
    parser.add_argument("src", help="diffusers AutoencoderKL directory, pipeline directory or weights file")
    parser.add_argument("--config", help="config.json, when SRC is a lone weights file")
    args = parser.parse_args(argv)
    try:
        config, params = convert_vae(args.src, config=args.config)
    except ConversionError as e:
        raise SystemExit(f"error: {e}") from None
    print(json.dumps(config.to_dict(), indent=2))
    print(f"parameters: {_count(params):,}")


if __name__ == "__main__":
    main()
