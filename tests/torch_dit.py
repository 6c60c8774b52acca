"""Test helpers: diffusers' DiT built from an official-layout state dict, with every parameter random."""

from __future__ import annotations

import numpy as np
import torch

from convert.dit import official_shapes
from dit_jax.models.dit import DiTConfig


def random_official_state_dict(cfg: DiTConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random values for every key (the official init zeroes adaLN and the final layer; here nothing is zero)."""
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in official_shapes(cfg).items():
        fan_in = shape[1] * int(np.prod(shape[2:])) if len(shape) > 1 else 1
        scale = 1.0 / np.sqrt(fan_in) if len(shape) > 1 else 0.05
        sd[key] = (rng.standard_normal(shape) * scale).astype(np.float32)
    from dit_jax.nn.layers import sincos_pos_embed_2d

    sd["pos_embed"] = sincos_pos_embed_2d(cfg.hidden_size, *cfg.grid)[None]
    return sd


def diffusers_dit(cfg: DiTConfig, official: dict[str, np.ndarray]):
    """diffusers' DiTTransformer2DModel holding the same weights as an official state dict.

    diffusers divides the timestep frequencies by (half - 1), the original DiT by half: its
    time projections are set to the original's so both compute facebookresearch/DiT's function.
    """
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_layers=cfg.depth,
        sample_size=cfg.input_size,
        patch_size=cfg.patch_size,
        num_embeds_ada_norm=cfg.num_classes,
    ).eval()
    sd = diffusers_state_dict(cfg, official)
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=True)
    assert not missing and not unexpected
    for block in model.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return model


def diffusers_state_dict(cfg: DiTConfig, official: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The official layout renamed to diffusers' (embedders repeated in every block)."""
    d = cfg.hidden_size
    sd = {
        "pos_embed.proj.weight": official["x_embedder.proj.weight"],
        "pos_embed.proj.bias": official["x_embedder.proj.bias"],
        "proj_out_1.weight": official["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": official["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": official["final_layer.linear.weight"],
        "proj_out_2.bias": official["final_layer.linear.bias"],
    }
    for i in range(cfg.depth):
        b, o = f"transformer_blocks.{i}.", f"blocks.{i}."
        sd[b + "norm1.emb.timestep_embedder.linear_1.weight"] = official["t_embedder.mlp.0.weight"]
        sd[b + "norm1.emb.timestep_embedder.linear_1.bias"] = official["t_embedder.mlp.0.bias"]
        sd[b + "norm1.emb.timestep_embedder.linear_2.weight"] = official["t_embedder.mlp.2.weight"]
        sd[b + "norm1.emb.timestep_embedder.linear_2.bias"] = official["t_embedder.mlp.2.bias"]
        sd[b + "norm1.emb.class_embedder.embedding_table.weight"] = official["y_embedder.embedding_table.weight"]
        sd[b + "norm1.linear.weight"] = official[o + "adaLN_modulation.1.weight"]
        sd[b + "norm1.linear.bias"] = official[o + "adaLN_modulation.1.bias"]
        for j, name in enumerate("qkv"):
            sd[b + f"attn1.to_{name}.weight"] = official[o + "attn.qkv.weight"][j * d:(j + 1) * d]
            sd[b + f"attn1.to_{name}.bias"] = official[o + "attn.qkv.bias"][j * d:(j + 1) * d]
        sd[b + "attn1.to_out.0.weight"] = official[o + "attn.proj.weight"]
        sd[b + "attn1.to_out.0.bias"] = official[o + "attn.proj.bias"]
        sd[b + "ff.net.0.proj.weight"] = official[o + "mlp.fc1.weight"]
        sd[b + "ff.net.0.proj.bias"] = official[o + "mlp.fc1.bias"]
        sd[b + "ff.net.2.weight"] = official[o + "mlp.fc2.weight"]
        sd[b + "ff.net.2.bias"] = official[o + "mlp.fc2.bias"]
    return sd


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())
