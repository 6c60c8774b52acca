"""diffusers' PixArtTransformer2DModel state dict -> the parameter tree of dit_jax.models.pixart.PixArt.

    cfg = infer_pixart_config(shapes, json.loads(Path("transformer/config.json").read_text()))
    params = convert_pixart_transformer(reader.get_tensor, shapes, cfg)   # one tensor at a time

`shapes` maps every key of the checkpoint to its shape (safetensors' metadata is enough), so
nothing is read before every key and shape has been checked. diffusers does not store the
position embedding (it is fixed by the config: sample_size, interpolation_scale), so it is not
read here either: the model computes it.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Mapping

import numpy as np

from convert.common import ConversionError, check_state_dict, torch_conv, torch_linear
from dit_jax.models.pixart import PixArtConfig
from dit_jax.nn.stack import stack_trees

# (our sub-path, diffusers name) of every linear layer, for the model and for one block.
_TOP_LINEARS = {
    ("t_embedder", "mlp_0"): "adaln_single.emb.timestep_embedder.linear_1",
    ("t_embedder", "mlp_2"): "adaln_single.emb.timestep_embedder.linear_2",
    ("t_block",): "adaln_single.linear",
    ("y_embedder", "fc1"): "caption_projection.linear_1",
    ("y_embedder", "fc2"): "caption_projection.linear_2",
    ("final_layer", "linear"): "proj_out",
}
_MICRO_LINEARS = {
    ("csize_embedder", "mlp_0"): "adaln_single.emb.resolution_embedder.linear_1",
    ("csize_embedder", "mlp_2"): "adaln_single.emb.resolution_embedder.linear_2",
    ("ar_embedder", "mlp_0"): "adaln_single.emb.aspect_ratio_embedder.linear_1",
    ("ar_embedder", "mlp_2"): "adaln_single.emb.aspect_ratio_embedder.linear_2",
}
_BLOCK_LINEARS = {
    **{("attn", ours): f"attn1.{theirs}" for ours, theirs in
       (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj", "to_out.0"))},
    **{("cross_attn", ours): f"attn2.{theirs}" for ours, theirs in
       (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj", "to_out.0"))},
    ("mlp", "fc1"): "ff.net.0.proj",
    ("mlp", "fc2"): "ff.net.2",
}

# The PixArt-XL/2 checkpoints' head width (diffusers' default attention_head_dim).
_HEAD_DIM = 72


def _layout(cfg: PixArtConfig) -> dict[str, tuple[tuple, str, tuple[int, ...]]]:
    """diffusers key -> (our path, how to convert it, its shape in the checkpoint)."""
    d, p = cfg.hidden_size, cfg.patch_size
    inner = int(d * cfg.mlp_ratio)
    linear_shapes = {  # (out, in) of each linear, by its diffusers name
        "adaln_single.emb.timestep_embedder.linear_1": (d, 256),
        "adaln_single.emb.timestep_embedder.linear_2": (d, d),
        "adaln_single.emb.resolution_embedder.linear_1": (d // 3, 256),
        "adaln_single.emb.resolution_embedder.linear_2": (d // 3, d // 3),
        "adaln_single.emb.aspect_ratio_embedder.linear_1": (d // 3, 256),
        "adaln_single.emb.aspect_ratio_embedder.linear_2": (d // 3, d // 3),
        "adaln_single.linear": (6 * d, d),
        "caption_projection.linear_1": (d, cfg.caption_channels),
        "caption_projection.linear_2": (d, d),
        "proj_out": (p * p * cfg.out_channels, d),
        "ff.net.0.proj": (inner, d),
        "ff.net.2": (d, inner),
    }
    layout: dict[str, tuple[tuple, str, tuple[int, ...]]] = {}

    def add_linear(path: tuple, name: str, shape_name: str | None = None) -> None:
        out_dim, in_dim = linear_shapes.get(shape_name or name, (d, d))
        layout[f"{name}.weight"] = ((*path, "kernel"), "linear", (out_dim, in_dim))
        layout[f"{name}.bias"] = ((*path, "bias"), "copy", (out_dim,))

    layout["pos_embed.proj.weight"] = (("x_embedder", "proj", "kernel"), "conv", (d, cfg.in_channels, p, p))
    layout["pos_embed.proj.bias"] = (("x_embedder", "proj", "bias"), "copy", (d,))
    linears = {**_TOP_LINEARS, **(_MICRO_LINEARS if cfg.use_additional_conditions else {})}
    for path, name in linears.items():
        add_linear(path, name)
    layout["scale_shift_table"] = (("final_layer", "scale_shift_table"), "copy", (2, d))
    for i in range(cfg.depth):
        prefix = f"transformer_blocks.{i}."
        layout[prefix + "scale_shift_table"] = (("blocks", i, "scale_shift_table"), "copy", (6, d))
        for path, name in _BLOCK_LINEARS.items():
            add_linear(("blocks", i, *path), prefix + name, name)
    return layout


def pixart_expected_shapes(cfg: PixArtConfig) -> dict[str, tuple[int, ...]]:
    """Every key of diffusers' PixArtTransformer2DModel state dict for `cfg`, with its shape."""
    return {key: shape for key, (_, _, shape) in _layout(cfg).items()}


def _note(notes: list[str] | None, text: str) -> None:
    if notes is None:
        warnings.warn(text, stacklevel=3)
    else:
        notes.append(text)


def infer_pixart_config(
    keys_and_shapes: Mapping[str, tuple[int, ...]],
    diffusers_config: dict | None = None,
    *,
    notes: list[str] | None = None,
) -> PixArtConfig:
    """The PixArtConfig of a diffusers PixArtTransformer2DModel checkpoint.

    keys_and_shapes: every key of the state dict with its shape. diffusers_config: its
    config.json as a dict (or any part of it), read for what the weights do not say: sample_size,
    interpolation_scale, num_attention_heads; a "max_text_length" entry (not a diffusers field)
    is honoured too. What neither gives is assumed, each assumption described in `notes` (a list
    to append to) or, without one, in a warning. Raises a ConversionError for what this model
    cannot represent.
    """
    shapes = {k: tuple(int(n) for n in v) for k, v in keys_and_shapes.items()}
    hf = dict(diffusers_config or {})
    needed = ["pos_embed.proj.weight", "proj_out.weight", "caption_projection.linear_1.weight",
              "adaln_single.linear.weight", "transformer_blocks.0.ff.net.0.proj.weight"]
    absent = [k for k in needed if k not in shapes]
    if absent:
        raise ConversionError(
            f"not a PixArtTransformer2DModel state dict: missing {', '.join(absent)} "
            f"(found {len(shapes)} keys, e.g. {sorted(shapes)[:5]})"
        )
    problems = []
    for field, wanted in (("norm_type", "ada_norm_single"), ("norm_elementwise_affine", False),
                          ("activation_fn", "gelu-approximate"), ("attention_type", "default"),
                          ("attention_bias", True)):
        if field in hf and hf[field] is not None and hf[field] != wanted:
            problems.append(f"{field} {hf[field]!r} (this model has {wanted!r})")
    if "caption_channels" in hf and hf["caption_channels"] is None:
        problems.append("caption_channels None (no caption projection; this model always projects the caption)")
    if problems:
        raise ConversionError("this PixArt transformer cannot be represented: " + "; ".join(problems))

    hidden, in_channels, patch, patch_w = shapes["pos_embed.proj.weight"]
    if patch != patch_w:
        raise ConversionError(f"pos_embed.proj.weight has a {patch}x{patch_w} patch; only square patches are supported")
    depth = len({m.group(1) for k in shapes if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
    projected = shapes["proj_out.weight"][0]
    if projected % (patch * patch):
        raise ConversionError(
            f"proj_out gives {projected} values per token, not a multiple of patch^2 = {patch * patch}"
        )
    out_channels = projected // (patch * patch)
    caption_channels = shapes["caption_projection.linear_1.weight"][1]
    mlp_ratio = shapes["transformer_blocks.0.ff.net.0.proj.weight"][0] / hidden
    micro = any(k.startswith("adaln_single.emb.resolution_embedder.") for k in shapes)

    cross = hf.get("cross_attention_dim")
    if cross is not None and cross != hidden:
        raise ConversionError(f"cross_attention_dim {cross} differs from the hidden size {hidden}")
    if hf.get("num_attention_heads") is not None:
        num_heads = int(hf["num_attention_heads"])
        head_dim = hf.get("attention_head_dim")
        if head_dim is not None and num_heads * int(head_dim) != hidden:
            raise ConversionError(
                f"num_attention_heads {num_heads} x attention_head_dim {head_dim} != hidden size {hidden}"
            )
    else:
        head_dim = int(hf.get("attention_head_dim") or _HEAD_DIM)
        if hidden % head_dim:
            raise ConversionError(
                f"hidden size {hidden} is not a multiple of the head width {head_dim}: give num_attention_heads"
            )
        num_heads = hidden // head_dim
        _note(notes, f"assumed {num_heads} attention heads of width {head_dim} (no num_attention_heads given)")
    if hf.get("sample_size") is not None:
        input_size = int(hf["sample_size"])
    else:
        input_size = 128
        _note(notes, "assumed sample_size 128 (1024 px, diffusers' default): the weights do not fix it; "
                     "give the config.json for 256 / 512 px checkpoints")
    if hf.get("interpolation_scale") is not None:
        scale = float(hf["interpolation_scale"])
    else:
        scale = float(max(input_size // 64, 1))
        _note(notes, f"interpolation_scale {scale:g} from diffusers' rule max(sample_size // 64, 1) (none given)")
    if hf.get("use_additional_conditions") is not None:
        declared = bool(hf["use_additional_conditions"])
    elif hf.get("sample_size") is not None:
        declared = input_size == 128  # what diffusers makes of a config without the field
    else:
        declared = micro  # nothing said: the weights decide
    if declared != micro:
        raise ConversionError(
            f"the config {'asks for' if declared else 'has no'} resolution / aspect-ratio micro-conditions but "
            f"the weights {'have' if micro else 'lack'} their embedders (adaln_single.emb.resolution_embedder.*)"
        )
    if hf.get("max_text_length") is not None:
        max_text_length = int(hf["max_text_length"])
    else:
        # Only alpha-1024 has micro-conditions; otherwise alpha's configs carry no
        # interpolation_scale (diffusers' conversion never wrote one) and Sigma's do. With no
        # config at all, Sigma's length (longer prompts are only truncated later).
        alpha = micro or (bool(hf) and hf.get("interpolation_scale") is None)
        max_text_length = 120 if alpha else 300
        _note(notes, f"max_text_length {max_text_length} (PixArt-{'alpha' if alpha else 'Sigma'}'s T5 length, "
                     "guessed from the config; it only sets where prompts are truncated)")
    out = hf.get("out_channels")
    if out is not None and int(out) != out_channels:
        raise ConversionError(f"config out_channels {out} disagrees with proj_out, which gives {out_channels}")
    cfg = PixArtConfig(
        input_size=input_size, patch_size=patch, in_channels=in_channels, out_channels=out_channels,
        hidden_size=hidden, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
        caption_channels=caption_channels, interpolation_scale=scale, use_additional_conditions=micro,
        max_text_length=max_text_length, norm_eps=float(hf.get("norm_eps") or 1e-6),
    )
    try:
        cfg.validate()
    except ValueError as e:
        raise ConversionError(f"inferred config is not valid: {e}") from e
    return cfg


def convert_pixart_transformer(
    get_tensor: Callable[[str], np.ndarray],
    keys_and_shapes: Mapping[str, tuple[int, ...]],
    cfg: PixArtConfig,
    dtype=np.float32,
) -> dict:
    """The pure parameter tree of PixArt(cfg) (as nnx.to_pure_dict(nnx.state(model)) has it).

    Every key and shape is checked first (a ConversionError lists every missing, unexpected and
    mismatched one); then each tensor is read with get_tensor(key), converted to `dtype`
    (transposed for linear / conv kernels) and dropped, one at a time.
    """
    layout = _layout(cfg)
    check_state_dict(
        "PixArt transformer checkpoint",
        {k: tuple(v) for k, v in keys_and_shapes.items()},
        {k: shape for k, (_, _, shape) in layout.items()},
    )
    tree: dict = {}
    for key, (path, kind, shape) in layout.items():
        array = np.asarray(get_tensor(key))
        if tuple(array.shape) != shape:
            raise ConversionError(f"{key}: get_tensor returned shape {tuple(array.shape)}, the checkpoint said {shape}")
        if kind == "linear":
            array = torch_linear(array)
        elif kind == "conv":
            array = torch_conv(array)
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = np.ascontiguousarray(array.astype(dtype))
    tree["blocks"] = stack_trees(tree["blocks"], np.stack)  # PixArt stores its blocks stacked: (depth, ...)
    return tree
