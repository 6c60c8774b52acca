"""Parity of dit_jax.models.vae.AutoencoderKL with diffusers' AutoencoderKL, through convert.vae.

Errors are relative: max|ours - theirs| / max|theirs|, float32 on CPU, must stay under 1e-4.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert.vae import convert_vae, expected_shapes, param_shapes
from dit_jax.models.vae import AutoencoderKL, GroupNorm, VAEConfig
from dit_jax.weights import abstract_module

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4

# Two tiny layouts: (A) kl-f8's shape with attention and quant convs; (B) three levels, two
# resnets per level, no mid attention, no quant convs, different in/out/latent channel counts.
TINY_CONFIGS = {
    "attn": dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ),
    "plain": dict(
        in_channels=3, out_channels=2, latent_channels=3, block_out_channels=(8, 8, 16), layers_per_block=2,
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        mid_block_add_attention=False, use_quant_conv=False, use_post_quant_conv=False,
    ),
}
IMAGE_SIDE = {"attn": 32, "plain": 16}

# stabilityai/sd-vae-ft-ema's config.json (it predates scaling_factor, so diffusers' default applies).
SD_VAE_FT_EMA_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.4.2",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def rel_err(ours, theirs_nchw: torch.Tensor) -> float:
    theirs = theirs_nchw.permute(0, 2, 3, 1).numpy()
    return float(np.abs(np.asarray(ours) - theirs).max() / np.abs(theirs).max())


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random: norm scales around 1, everything else around 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            is_norm_scale = "norm" in name and name.endswith("weight")
            p.copy_(1 + 0.2 * noise if is_norm_scale else 0.2 * noise)


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def tiny(request, tmp_path_factory):
    """(name, diffusers model, saved directory) for one tiny random config."""
    torch_vae = diffusers.AutoencoderKL(**TINY_CONFIGS[request.param]).eval()
    randomise(torch_vae, seed=len(request.param))
    out = tmp_path_factory.mktemp(f"vae_{request.param}")
    torch_vae.save_pretrained(out)
    return request.param, torch_vae, out


def load_ours(src, dtype=jnp.float32) -> tuple[AutoencoderKL, dict]:
    """The converted checkpoint as a model, the way dit_jax.weights builds it (no random init)."""
    config, params = convert_vae(src)
    model = abstract_module(AutoencoderKL, config, dtype)  # shapes only: no random init
    nnx.update(model, jax.tree.map(lambda a: jnp.asarray(a, dtype), params))
    return model, params


def encode_and_decode(model: AutoencoderKL, images: jax.Array, latents: jax.Array):
    """(mean, logvar), decoded: one compiled program over the split state, as the pipeline runs it."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, images, latents):
        vae = nnx.merge(graphdef, state)
        return vae.encode(images), vae.decode(latents)

    return run(state, images, latents)


def test_encode_decode_match_diffusers(tiny):
    name, torch_vae, path = tiny
    ours, _ = load_ours(path)
    side, latent_side = IMAGE_SIDE[name], IMAGE_SIDE[name] // ours.config.downsample_factor
    gen = torch.Generator().manual_seed(1)
    images = torch.rand(2, torch_vae.config.in_channels, side, side, generator=gen) * 2 - 1
    latents = torch.randn(2, torch_vae.config.latent_channels, latent_side, latent_side, generator=gen)
    with torch.no_grad():
        posterior = torch_vae.encode(images).latent_dist
        decoded = torch_vae.decode(latents).sample

    (mean, logvar), out = encode_and_decode(
        ours, jnp.asarray(images.permute(0, 2, 3, 1).numpy()), jnp.asarray(latents.permute(0, 2, 3, 1).numpy())
    )

    assert mean.shape == (2, latent_side, latent_side, torch_vae.config.latent_channels)
    assert out.shape == (2, side, side, torch_vae.config.out_channels)
    assert mean.dtype == logvar.dtype == out.dtype == jnp.float32
    assert rel_err(mean, posterior.mean) < TOL
    assert rel_err(logvar, posterior.logvar) < TOL
    assert rel_err(out, decoded) < TOL


def test_param_tree_matches_model_and_diffusers_count(tiny):
    name, torch_vae, path = tiny
    config, params = convert_vae(path)
    model_tree = nnx.state(abstract_module(AutoencoderKL, config, jnp.float32), nnx.Param).to_pure_dict()

    shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)  # noqa: E731
    assert jax.tree.structure(params) == jax.tree.structure(model_tree)
    assert shapes(params) == shapes(model_tree)
    assert all(a.dtype == np.float32 for a in jax.tree.leaves(params))

    torch_params = dict(torch_vae.named_parameters())
    assert len(jax.tree.leaves(params)) == len(torch_params)
    assert sum(a.size for a in jax.tree.leaves(params)) == sum(p.numel() for p in torch_params.values())


def test_param_tree_shapes_pinned_for_tiny_attn_config():
    config = VAEConfig.from_diffusers(TINY_CONFIGS["attn"])
    shapes = param_shapes(config)
    enc, dec = shapes["encoder"], shapes["decoder"]
    assert enc["conv_in"] == {"kernel": (3, 3, 3, 8), "bias": (8,)}
    assert enc["down_blocks"][0]["downsample"]["kernel"] == (3, 3, 8, 8)
    assert "downsample" not in enc["down_blocks"][1]
    assert enc["down_blocks"][1]["resnets"][0]["conv_shortcut"]["kernel"] == (1, 1, 8, 16)
    assert enc["mid_block"]["attention"]["query"] == {"kernel": (16, 16), "bias": (16,)}
    assert enc["mid_block"]["attention"]["norm"] == {"scale": (16,), "bias": (16,)}
    assert enc["conv_out"]["kernel"] == (3, 3, 16, 8)
    assert len(dec["up_blocks"][0]["resnets"]) == 2  # layers_per_block + 1
    assert dec["up_blocks"][1]["resnets"][0]["conv_shortcut"]["kernel"] == (1, 1, 16, 8)
    assert dec["up_blocks"][0]["upsample"]["kernel"] == (3, 3, 16, 16)
    assert shapes["quant_conv"]["kernel"] == (1, 1, 8, 8)
    assert shapes["post_quant_conv"]["kernel"] == (1, 1, 4, 4)


def test_sd_kl_f8_layout_matches_diffusers_and_model():
    """The real kl-f8 layout, without allocating it: diffusers on the meta device, ours via eval_shape."""
    config = VAEConfig.from_diffusers(SD_VAE_FT_EMA_CONFIG)
    assert config == VAEConfig()
    with torch.device("meta"):
        torch_vae = diffusers.AutoencoderKL(**{k: v for k, v in SD_VAE_FT_EMA_CONFIG.items() if not k.startswith("_")})
    assert expected_shapes(config) == {k: tuple(v.shape) for k, v in torch_vae.state_dict().items()}

    model_shapes = jax.tree.map(lambda a: tuple(a.shape), nnx.state(abstract_module(AutoencoderKL, config, jnp.float32), nnx.Param).to_pure_dict())
    assert model_shapes == param_shapes(config)
    total = sum(np.prod(s) for s in jax.tree.leaves(model_shapes, is_leaf=lambda x: isinstance(x, tuple)))
    assert total == sum(p.numel() for p in torch_vae.parameters()) == 83_653_863


@pytest.mark.parametrize("tiny", ["attn"], indirect=True)
@pytest.mark.parametrize("file_format,conv_shaped", [("bin", False), ("safetensors", True)])
def test_old_attention_key_names(tiny, tmp_path, file_format, conv_shaped):
    """Early-diffusers checkpoints (sd-vae-ft-ema) name the attention query/key/value/proj_attn."""
    name, torch_vae, path = tiny
    new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old_state = {}
    for key, value in torch_vae.state_dict().items():
        for new, old in new_to_old.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        if conv_shaped and ".attentions.0." in key and key.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM stored these projections as 1x1 convs
        old_state[key] = value.clone().contiguous()
    assert any(".query." in k for k in old_state) and not any(".to_q." in k for k in old_state)

    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    if file_format == "bin":
        torch.save(old_state, tmp_path / "diffusion_pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(old_state, tmp_path / "diffusion_pytorch_model.safetensors")

    _, reference = convert_vae(path)
    _, converted = convert_vae(tmp_path)
    assert jax.tree.structure(converted) == jax.tree.structure(reference)
    for a, b in zip(jax.tree.leaves(converted), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(a, b)


def test_group_norm_eps_matches_torch():
    """Small-variance input, where GroupNorm's eps (1e-6, not the default 1e-5) shows."""
    x = torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(0)) * 3e-3 + 0.5
    theirs_norm = torch.nn.GroupNorm(4, 8, eps=1e-6)
    torch.nn.init.normal_(theirs_norm.weight)
    torch.nn.init.normal_(theirs_norm.bias)
    ours = GroupNorm(8, 4)
    ours.scale[...] = jnp.asarray(theirs_norm.weight.detach().numpy())
    ours.bias[...] = jnp.asarray(theirs_norm.bias.detach().numpy())
    with torch.no_grad():
        theirs = theirs_norm(x)
    assert rel_err(ours(jnp.asarray(x.permute(0, 2, 3, 1).numpy())), theirs) < TOL


@pytest.mark.parametrize("tiny", ["attn"], indirect=True)
def test_bfloat16_params_and_compute(tiny):
    """bfloat16 params and compute (what `weights.load(dtype=jnp.bfloat16)` gives) stay close to float32."""
    _, _, path = tiny
    model32, _ = load_ours(path)
    model16, _ = load_ours(path, dtype=jnp.bfloat16)
    assert model16.encoder.conv_in.kernel.dtype == jnp.bfloat16
    key_images, key_latents = jax.random.split(jax.random.key(0))
    images = jax.random.uniform(key_images, (1, 16, 16, 3), minval=-1, maxval=1)  # small: bf16 convs are slow on CPU
    latents = jax.random.normal(key_latents, (1, 8, 8, 4))
    (mean32, _), out32 = encode_and_decode(model32, images, latents)
    (mean16, _), out16 = encode_and_decode(model16, images, latents)
    assert mean16.dtype == out16.dtype == jnp.float32
    for low, full in ((mean16, mean32), (out16, out32)):
        err = float(jnp.abs(low - full).max() / jnp.abs(full).max())
        assert 0 < err < 0.1  # bf16 really ran (err > 0), and nothing was wired wrong (err small)


def test_config_round_trip_and_errors():
    config = VAEConfig.from_diffusers(TINY_CONFIGS["plain"])
    assert VAEConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.downsample_factor == 4
    assert VAEConfig.from_diffusers({**SD_VAE_FT_EMA_CONFIG, "scaling_factor": 0.13025}).scaling_factor == 0.13025

    with pytest.raises(ValueError, match=r"unknown VAE config fields \['dropout'\]"):
        VAEConfig.from_dict({**config.to_dict(), "dropout": 0.1})
    with pytest.raises(ValueError, match=r"down_block_types contains \['AttnDownEncoderBlock2D'\]"):
        VAEConfig.from_diffusers({**SD_VAE_FT_EMA_CONFIG, "down_block_types": ["AttnDownEncoderBlock2D"] * 4})
    with pytest.raises(ValueError, match="up_block_types has 2 entries but block_out_channels has 4"):
        VAEConfig.from_diffusers({**SD_VAE_FT_EMA_CONFIG, "up_block_types": ["UpDecoderBlock2D"] * 2})
    with pytest.raises(ValueError, match="act_fn 'gelu' is not supported"):
        VAEConfig.from_diffusers({**SD_VAE_FT_EMA_CONFIG, "act_fn": "gelu"})
    with pytest.raises(ValueError, match="latents_mean is set"):
        VAEConfig.from_diffusers({**SD_VAE_FT_EMA_CONFIG, "latents_mean": [0.0] * 4})
    with pytest.raises(ValueError, match="the config is for a 'AutoencoderTiny' model; only AutoencoderKL"):
        VAEConfig.from_diffusers({**SD_VAE_FT_EMA_CONFIG, "_class_name": "AutoencoderTiny"})
    with pytest.raises(ValueError, match=r"unsupported AutoencoderKL config keys \['norm_type'\]"):
        VAEConfig.from_diffusers({**SD_VAE_FT_EMA_CONFIG, "norm_type": "spatial"})
    with pytest.raises(ValueError, match=r"\[12\] not divisible by norm_num_groups 8"):
        VAEConfig(block_out_channels=(8, 12), norm_num_groups=8)
