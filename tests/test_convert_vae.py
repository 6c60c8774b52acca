"""convert.vae: file discovery, key and shape checks, and the error messages a user sees.

Checkpoints here are random NumPy state dicts laid out from `expected_shapes` (numerical parity
with diffusers is tests/test_vae.py's job), so these tests need neither diffusers nor a model.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from convert.common import ConversionError
from convert.vae import convert_vae, expected_shapes, main, param_shapes
from dit_jax.models.vae import VAEConfig

DIFFUSERS_CONFIG = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.42.1",
    "act_fn": "silu",
    "block_out_channels": [8, 16],
    "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
    "force_upcast": True,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "out_channels": 3,
    "sample_size": 32,
    "scaling_factor": 0.18215,
}
CONFIG = VAEConfig.from_diffusers(DIFFUSERS_CONFIG)
WEIGHTS = "diffusion_pytorch_model.safetensors"
ATTN_Q = "encoder.mid_block.attentions.0.to_q.weight"


def random_state(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(shape).astype(np.float32) for k, shape in expected_shapes(CONFIG).items()}


def write_model(directory, state: dict[str, np.ndarray], *, weights_name: str = WEIGHTS, config: dict | None = None):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(DIFFUSERS_CONFIG if config is None else config))
    save_file(state, str(directory / weights_name))
    return directory


def conversion_error(src, **kwargs) -> str:
    with pytest.raises(ConversionError) as info:
        convert_vae(src, **kwargs)
    return str(info.value)


def test_converts_every_key_with_transposes(tmp_path):
    state = random_state()
    config, params = convert_vae(write_model(tmp_path / "vae", state))
    assert config == CONFIG
    shapes = jax.tree.map(lambda a: tuple(a.shape), params)
    assert shapes == param_shapes(CONFIG)
    assert len(jax.tree.leaves(params)) == len(state)
    conv_w = state["encoder.conv_in.weight"]  # [O, I, kh, kw] -> [kh, kw, I, O]
    np.testing.assert_array_equal(params["encoder"]["conv_in"]["kernel"], conv_w.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["encoder"]["mid_block"]["attention"]["query"]["kernel"], state[ATTN_Q].T)
    np.testing.assert_array_equal(
        params["decoder"]["up_blocks"][0]["upsample"]["bias"], state["decoder.up_blocks.0.upsamplers.0.conv.bias"]
    )
    np.testing.assert_array_equal(
        params["encoder"]["norm_out"]["scale"], state["encoder.conv_norm_out.weight"]
    )


def test_half_precision_weights_come_back_float32(tmp_path):
    state = {k: v.astype(np.float16) for k, v in random_state().items()}
    model_dir = write_model(tmp_path / "vae", state, weights_name="diffusion_pytorch_model.fp16.safetensors")
    _, params = convert_vae(model_dir)
    assert {a.dtype for a in jax.tree.leaves(params)} == {np.dtype(np.float32)}


def test_missing_key(tmp_path):
    state = random_state()
    del state["decoder.mid_block.resnets.1.norm2.bias"]
    message = conversion_error(write_model(tmp_path / "vae", state))
    assert "missing keys (1):\n  decoder.mid_block.resnets.1.norm2.bias" in message
    assert "unexpected" not in message and WEIGHTS in message


def test_extra_key(tmp_path):
    state = random_state()
    state["encoder.down_blocks.0.attentions.0.to_q.weight"] = np.zeros((8, 8), np.float32)
    message = conversion_error(write_model(tmp_path / "vae", state))
    assert "unexpected keys (1):\n  encoder.down_blocks.0.attentions.0.to_q.weight" in message
    assert "missing" not in message


def test_wrong_shape_names_both_shapes(tmp_path):
    state = random_state()
    state["encoder.conv_out.weight"] = np.zeros((16, 16, 3, 3), np.float32)  # 2 * latent should be 8
    message = conversion_error(write_model(tmp_path / "vae", state))
    assert "encoder.conv_out.weight: checkpoint has (16, 16, 3, 3), expected (8, 16, 3, 3)" in message


def test_all_problems_reported_at_once(tmp_path):
    state = random_state()
    del state[ATTN_Q]
    state["stray"] = np.zeros(3, np.float32)
    state["quant_conv.bias"] = np.zeros(7, np.float32)
    message = conversion_error(write_model(tmp_path / "vae", state))
    assert ATTN_Q in message and "stray" in message and "quant_conv.bias: checkpoint has (7,), expected (8,)" in message


@pytest.mark.parametrize("weights_name,complaint", [
    (WEIGHTS, "not a readable safetensors file"),
    ("diffusion_pytorch_model.bin", "not a readable PyTorch checkpoint"),
])
def test_unreadable_weights_file(tmp_path, weights_name, complaint):
    model_dir = tmp_path / "vae"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(DIFFUSERS_CONFIG))
    (model_dir / weights_name).write_bytes(b"this is not a checkpoint")
    message = conversion_error(model_dir)
    assert weights_name in message and complaint in message


def test_missing_config_json(tmp_path):
    model_dir = write_model(tmp_path / "vae", random_state())
    (model_dir / "config.json").unlink()
    message = conversion_error(model_dir)
    assert "config.json: not found" in message and "pass config=" in message


def test_unreadable_and_unsupported_config_json(tmp_path):
    model_dir = write_model(tmp_path / "vae", random_state())
    (model_dir / "config.json").write_text("{not json")
    assert "not a readable JSON config" in conversion_error(model_dir)
    (model_dir / "config.json").write_text(
        json.dumps({**DIFFUSERS_CONFIG, "down_block_types": ["CrossAttnDownBlock2D", "DownEncoderBlock2D"]})
    )
    assert "down_block_types contains ['CrossAttnDownBlock2D']; only DownEncoderBlock2D" in conversion_error(model_dir)


def test_no_weights_file_lists_names_looked_for(tmp_path):
    model_dir = tmp_path / "vae"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(DIFFUSERS_CONFIG))
    message = conversion_error(model_dir)
    looked_for = "looked for diffusion_pytorch_model.safetensors, diffusion_pytorch_model.bin, "
    assert "no weights file found; " + looked_for in message


def test_missing_source(tmp_path):
    assert "no such file or directory" in conversion_error(tmp_path / "nowhere")


def test_pipeline_directory_uses_its_vae_subfolder(tmp_path):
    write_model(tmp_path / "pipeline" / "vae", random_state())
    config, _ = convert_vae(tmp_path / "pipeline")
    assert config == CONFIG


def test_single_file_with_config_argument(tmp_path):
    state = random_state()
    weights = tmp_path / "my-vae.safetensors"
    save_file(state, str(weights))
    assert "config.json: not found" in conversion_error(weights)  # no config beside it
    for config in (DIFFUSERS_CONFIG, CONFIG):
        got_config, params = convert_vae(weights, config=config)
        assert got_config == CONFIG
        np.testing.assert_array_equal(params["post_quant_conv"]["bias"], state["post_quant_conv.bias"])


def test_sharded_safetensors(tmp_path):
    state = random_state()
    model_dir = tmp_path / "vae"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(DIFFUSERS_CONFIG))
    keys = sorted(state)
    shards = {"part-1.safetensors": keys[: len(keys) // 2], "part-2.safetensors": keys[len(keys) // 2 :]}
    for shard, shard_keys in shards.items():
        save_file({k: state[k] for k in shard_keys}, str(model_dir / shard))
    weight_map = {k: shard for shard, shard_keys in shards.items() for k in shard_keys}
    (model_dir / f"{WEIGHTS}.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _, params = convert_vae(model_dir)
    assert len(jax.tree.leaves(params)) == len(state)


def test_old_and_new_attention_names_together_is_an_error(tmp_path):
    state = random_state()
    state[ATTN_Q.replace("to_q", "query")] = state[ATTN_Q]
    message = conversion_error(write_model(tmp_path / "vae", state))
    assert (
        "'encoder.mid_block.attentions.0.query.weight' and 'encoder.mid_block.attentions.0.to_q.weight' "
        "are both present and name the same weight"
    ) in message


def test_ldm_layout_is_refused_with_advice(tmp_path):
    state = {"encoder.down.0.block.0.norm1.weight": np.ones(8, np.float32)}
    message = conversion_error(write_model(tmp_path / "vae", state))
    assert "original CompVis/LDM checkpoint" in message and "diffusers-format VAE" in message


def test_cli_prints_config_and_count(tmp_path, capsys):
    model_dir = write_model(tmp_path / "vae", random_state())
    main([str(model_dir)])
    out = capsys.readouterr().out
    assert '"block_out_channels": [\n    8,\n    16\n  ]' in out
    assert f"parameters: {sum(int(np.prod(s)) for s in expected_shapes(CONFIG).values()):,}" in out
    (model_dir / "config.json").unlink()
    with pytest.raises(SystemExit, match="error: .*config.json: not found"):
        main([str(model_dir)])
