"""Convert a DiT checkpoint (official facebookresearch/DiT layout or diffusers' DiTTransformer2DModel)
into a dit-jax weights bundle.

    python -m convert.dit DiT-XL-2-256x256.pt ckpts/dit-xl-2-256 --vae sd-vae-ft-ema/
    python -m convert.dit transformer/ ckpts/dit-from-diffusers      # a diffusers model directory

The variant (depth, width, heads, patch, input size, learned sigma) is read off the shapes.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from convert.common import ConversionError, check_state_dict, output_taken, read_state_dict, torch_conv, torch_linear
from dit_jax.models.dit import VARIANTS, DiTConfig
from dit_jax.nn.stack import stack_trees

# (depth, hidden) -> heads for the paper's variants; other widths need --num-heads.
_KNOWN_HEADS = {(c.depth, c.hidden_size): c.num_heads for c in VARIANTS.values()}


def official_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Every key of the official DiT state dict with its shape."""
    d, p = cfg.hidden_size, cfg.patch_size
    hidden_mlp = int(d * cfg.mlp_ratio)
    shapes = {
        "x_embedder.proj.weight": (d, cfg.in_channels, p, p),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (cfg.num_classes + int(cfg.class_dropout_prob > 0), d),
        "pos_embed": (1, cfg.num_tokens, d),
        "final_layer.linear.weight": (p * p * cfg.out_channels, d),
        "final_layer.linear.bias": (p * p * cfg.out_channels,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    for i in range(cfg.depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * d, d), b + "attn.qkv.bias": (3 * d,),
            b + "attn.proj.weight": (d, d), b + "attn.proj.bias": (d,),
            b + "mlp.fc1.weight": (hidden_mlp, d), b + "mlp.fc1.bias": (hidden_mlp,),
            b + "mlp.fc2.weight": (d, hidden_mlp), b + "mlp.fc2.bias": (d,),
            b + "adaLN_modulation.1.weight": (6 * d, d), b + "adaLN_modulation.1.bias": (6 * d,),
        })
    return shapes


def infer_config(
    sd: dict[str, np.ndarray], *, input_size: int | None = None, num_heads: int | None = None
) -> DiTConfig:
    """Read the variant off an official-layout state dict's shapes."""
    needed = ["x_embedder.proj.weight", "y_embedder.embedding_table.weight", "final_layer.linear.weight"]
    absent = [k for k in needed if k not in sd]
    if absent:
        raise ConversionError(
            f"not a DiT state dict: missing {', '.join(absent)} (found {len(sd)} keys, e.g. {sorted(sd)[:5]})"
        )
    hidden, in_channels, patch, _ = sd["x_embedder.proj.weight"].shape
    depth = len({m.group(1) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    out_channels = sd["final_layer.linear.weight"].shape[0] // (patch * patch)
    if out_channels not in (in_channels, 2 * in_channels):
        raise ConversionError(f"final layer gives {out_channels} channels for {in_channels} input channels")
    if "pos_embed" in sd:
        tokens = sd["pos_embed"].shape[1]
        side = int(round(tokens**0.5))
        if side * side != tokens:
            raise ConversionError(f"pos_embed has {tokens} tokens, not a square grid")
        found = side * patch
        if input_size is not None and input_size != found:
            raise ConversionError(f"--input-size {input_size} disagrees with pos_embed, which implies {found}")
        input_size = found
    if input_size is None:
        raise ConversionError("this checkpoint has no pos_embed: pass --input-size (32 for 256 px, 64 for 512 px)")
    if num_heads is None:
        num_heads = _KNOWN_HEADS.get((depth, hidden))
        if num_heads is None:
            raise ConversionError(
                f"depth {depth} x width {hidden} is not one of the paper's variants: pass --num-heads"
            )
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    config = DiTConfig(
        input_size=input_size, patch_size=patch, in_channels=in_channels, hidden_size=hidden, depth=depth,
        num_heads=num_heads, num_classes=rows - 1, class_dropout_prob=0.1,
        learn_sigma=out_channels == 2 * in_channels,
    )
    try:
        config.validate()  # e.g. --num-heads that does not divide the width: refused before anything is written
    except ValueError as e:
        raise ConversionError(f"the checkpoint's model cannot be built: {e}") from e
    return config


def diffusers_to_official(sd: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Rename a DiTTransformer2DModel state dict to the official layout.

    diffusers repeats the timestep and class embedders in every block; they must all be equal
    (block 0's are used). Returns the renamed dict and notes about what was found.
    """
    out: dict[str, np.ndarray] = {}
    notes: list[str] = []
    embedder = {
        "norm1.emb.timestep_embedder.linear_1.weight": "t_embedder.mlp.0.weight",
        "norm1.emb.timestep_embedder.linear_1.bias": "t_embedder.mlp.0.bias",
        "norm1.emb.timestep_embedder.linear_2.weight": "t_embedder.mlp.2.weight",
        "norm1.emb.timestep_embedder.linear_2.bias": "t_embedder.mlp.2.bias",
        "norm1.emb.class_embedder.embedding_table.weight": "y_embedder.embedding_table.weight",
    }
    per_block = {
        "norm1.linear.weight": "adaLN_modulation.1.weight", "norm1.linear.bias": "adaLN_modulation.1.bias",
        "attn1.to_out.0.weight": "attn.proj.weight", "attn1.to_out.0.bias": "attn.proj.bias",
        "ff.net.0.proj.weight": "mlp.fc1.weight", "ff.net.0.proj.bias": "mlp.fc1.bias",
        "ff.net.2.weight": "mlp.fc2.weight", "ff.net.2.bias": "mlp.fc2.bias",
    }
    top = {
        "pos_embed.proj.weight": "x_embedder.proj.weight", "pos_embed.proj.bias": "x_embedder.proj.bias",
        "pos_embed.pos_embed": "pos_embed",
        "proj_out_1.weight": "final_layer.adaLN_modulation.1.weight",
        "proj_out_1.bias": "final_layer.adaLN_modulation.1.bias",
        "proj_out_2.weight": "final_layer.linear.weight", "proj_out_2.bias": "final_layer.linear.bias",
    }
    unequal: set[str] = set()
    qkv: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in sd.items():
        if key in top:
            out[top[key]] = value
            continue
        m = re.match(r"transformer_blocks\.(\d+)\.(.+)$", key)
        if not m:
            out[key] = value  # unexpected: reported by the key check
            continue
        i, rest = int(m.group(1)), m.group(2)
        if rest in embedder:
            name = embedder[rest]
            if name not in out:
                out[name] = sd[f"transformer_blocks.0.{rest}"] if f"transformer_blocks.0.{rest}" in sd else value
            if not np.array_equal(out[name], value):
                unequal.add(name)
        elif rest in per_block:
            out[f"blocks.{i}.{per_block[rest]}"] = value
        elif (q := re.match(r"attn1\.to_([qkv])\.(weight|bias)$", rest)):
            qkv.setdefault((i, q.group(2)), {})[q.group(1)] = value
        else:
            out[key] = value
    for (i, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            missing = sorted(set("qkv") - set(parts))
            raise ConversionError(f"transformer_blocks.{i}.attn1 lacks to_{', to_'.join(missing)}.{kind}")
        out[f"blocks.{i}.attn.qkv.{kind}"] = np.concatenate([parts["q"], parts["k"], parts["v"]], axis=0)
    if unequal:
        raise ConversionError(
            "diffusers repeats the timestep/class embedders in every block, but these differ between blocks: "
            + ", ".join(sorted(unequal))
            + ". The DiT architecture has one embedder; this checkpoint cannot be represented exactly."
        )
    notes.append("diffusers layout: per-block timestep and class embedders are all equal; block 0's are used")
    return out, notes


def official_to_params(sd: dict[str, np.ndarray], cfg: DiTConfig) -> dict:
    """Official-layout state dict -> the pure parameter tree of dit_jax.models.dit.DiT (float32)."""
    check_state_dict("DiT checkpoint", {k: v.shape for k, v in sd.items()}, official_shapes(cfg))
    f = {k: np.asarray(v, np.float32) for k, v in sd.items()}

    def linear(prefix: str) -> dict:
        return {"kernel": torch_linear(f[prefix + ".weight"]), "bias": f[prefix + ".bias"]}

    blocks = {
        i: {
            "attn": {"qkv": linear(f"blocks.{i}.attn.qkv"), "proj": linear(f"blocks.{i}.attn.proj")},
            "mlp": {"fc1": linear(f"blocks.{i}.mlp.fc1"), "fc2": linear(f"blocks.{i}.mlp.fc2")},
            "adaLN_modulation": linear(f"blocks.{i}.adaLN_modulation.1"),
        }
        for i in range(cfg.depth)
    }
    return {
        "x_embedder": {"proj": {"kernel": torch_conv(f["x_embedder.proj.weight"]), "bias": f["x_embedder.proj.bias"]}},
        "t_embedder": {"mlp_0": linear("t_embedder.mlp.0"), "mlp_2": linear("t_embedder.mlp.2")},
        "y_embedder": {"embedding_table": {"embedding": f["y_embedder.embedding_table.weight"]}},
        "pos_embed": f["pos_embed"],
        "blocks": stack_trees(blocks, np.stack),  # (depth, ...) each: DiT stores its blocks stacked
        "final_layer": {
            "linear": linear("final_layer.linear"),
            "adaLN_modulation": linear("final_layer.adaLN_modulation.1"),
        },
    }


def read_dit(
    src: str | Path, *, input_size: int | None = None, num_heads: int | None = None
) -> tuple[DiTConfig, dict, list[str]]:
    """Read an official or diffusers DiT checkpoint: (config, parameter tree, notes on what was found)."""
    src = Path(src)
    notes: list[str] = []
    if src.is_dir():  # a diffusers model directory: config.json + weights
        config_file = src / "config.json"
        candidates = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"]
        weight_file = next((src / c for c in candidates if (src / c).is_file()), None)
        if weight_file is None:
            raise ConversionError(f"{src}: no weights file (looked for {', '.join(candidates)})")
        if config_file.is_file():
            hf = json.loads(config_file.read_text())
            num_heads = num_heads or hf.get("num_attention_heads")
            if input_size is None and hf.get("sample_size"):
                input_size = int(hf["sample_size"])
        src = weight_file
    sd = read_state_dict(src)
    if any(k.startswith("transformer_blocks.") for k in sd):
        sd, more = diffusers_to_official(sd)
        notes += more
    cfg = infer_config(sd, input_size=input_size, num_heads=num_heads)
    if "pos_embed" not in sd:
        from dit_jax.nn.layers import sincos_pos_embed_2d

        sd["pos_embed"] = sincos_pos_embed_2d(cfg.hidden_size, *cfg.grid)[None]
        notes.append("no pos_embed in the checkpoint: the fixed 2-D sin-cos embedding was computed")
    return cfg, official_to_params(sd, cfg), notes


def describe(cfg: DiTConfig) -> str:
    arch = (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size)
    name = next(
        (n for n, v in VARIANTS.items() if (v.depth, v.hidden_size, v.num_heads, v.patch_size) == arch), "custom DiT"
    )
    return (
        f"{name}: depth {cfg.depth}, hidden {cfg.hidden_size}, heads {cfg.num_heads}, patch {cfg.patch_size}, "
        f"input {cfg.input_size}x{cfg.input_size}x{cfg.in_channels} ({cfg.num_tokens} tokens), "
        f"{cfg.num_classes} classes, learned sigma {cfg.learn_sigma}"
    )


def main(argv: list[str] | None = None) -> int:
    from dit_jax.weights import BundleConfig, Weights, save

    ap = argparse.ArgumentParser(prog="python -m convert.dit", description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="official .pt / .safetensors, or a diffusers DiTTransformer2DModel directory")
    ap.add_argument("out", help="output weights directory")
    ap.add_argument("--vae", help="diffusers AutoencoderKL directory to bundle (latent-space models)")
    ap.add_argument("--input-size", type=int, help="latent side, only when the checkpoint has no pos_embed")
    ap.add_argument("--num-heads", type=int, help="attention heads, only for non-paper widths")
    ap.add_argument("--class-names", help="JSON list of class names (default: the ImageNet classes)")
    ap.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    args = ap.parse_args(argv)

    out = Path(args.out)
    if output_taken(out, args.force):
        return 2
    start = time.perf_counter()
    try:
        cfg, params, notes = read_dit(args.src, input_size=args.input_size, num_heads=args.num_heads)
        print(f"found {describe(cfg)}")
        for note in notes:
            print(f"note: {note}")
        vae_cfg, vae_params = None, None
        if args.vae:
            from convert.vae import convert_vae

            vae_cfg, vae_params = convert_vae(args.vae)
            print(f"found VAE: {vae_cfg}")
        class_names = None
        if args.class_names:
            try:
                class_names = tuple(json.loads(Path(args.class_names).read_text()))
            except (OSError, json.JSONDecodeError, TypeError) as e:
                raise ConversionError(f"--class-names {args.class_names}: not a readable JSON list of names ({e})") from e
            if not all(isinstance(name, str) for name in class_names):
                raise ConversionError(f"--class-names {args.class_names}: every class name must be a string")
            if len(class_names) != cfg.num_classes:
                raise ConversionError(f"{len(class_names)} class names for {cfg.num_classes} classes")
        info = {"converted_from": str(Path(args.src).name), "layout": "diffusers" if notes[:1] and
                notes[0].startswith("diffusers") else "official"}
        bundle = Weights(
            dit=params, vae=vae_params,
            config=BundleConfig(dit=cfg, vae=vae_cfg, class_names=class_names, info_json=json.dumps(info)),
        )
        save(bundle, out, force=args.force)
    except (ConversionError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    count = sum(np.size(a) for a in __import__("jax").tree.leaves(params))
    print(f"wrote {out} ({count:,} DiT numbers{', with VAE' if args.vae else ''}) in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
