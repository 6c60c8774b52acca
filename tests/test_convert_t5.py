"""convert.t5: transformers T5 encoder directories (safetensors, sharded, .bin, bf16) and every error it must name."""

import json

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file
from test_t5 import TINY, TINY_RELU, encoder_fn, hf_encoder, padded_batch, reference, relative_error

from convert.common import ArraySpill, ConversionError
from convert.t5 import convert_t5, read_t5_dir, t5_expected_shapes


@pytest.fixture(scope="module")
def model():
    return hf_encoder(TINY, seed=7)


@pytest.fixture(scope="module")
def state_dict(model):
    return {k: v.numpy() for k, v in model.state_dict().items()}


def _convert_dir(path, dtype=np.float32):
    cfg, keys_and_shapes, get_tensor = read_t5_dir(path)
    return cfg, convert_t5(get_tensor, keys_and_shapes, cfg, dtype, source=str(path))


def _from_memory(sd, dtype=np.float32):
    return convert_t5(sd.__getitem__, {k: v.shape for k, v in sd.items()}, TINY, dtype)


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)


def _write_dir(path, sd, cfg=TINY):
    """A text_encoder/ directory holding `sd` as model.safetensors and cfg as a transformers config.json."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps(transformers.T5Config(**cfg.to_dict()).to_dict()))
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize("cfg", [TINY, TINY_RELU], ids=["gated-gelu", "relu"])
def test_expected_shapes_are_transformers_state_dict(cfg):
    hf = transformers.T5EncoderModel(transformers.T5Config(**cfg.to_dict()))
    assert t5_expected_shapes(cfg) == {k: tuple(v.shape) for k, v in hf.state_dict().items()}


def test_safetensors_directory_converts_and_matches(tmp_path, model, state_dict):
    model.save_pretrained(tmp_path / "text_encoder")
    cfg, keys, get = read_t5_dir(tmp_path / "text_encoder")
    assert cfg == TINY
    assert "encoder.embed_tokens.weight" not in keys  # the tied copy is not saved: not required
    params = convert_t5(get, keys, cfg)
    _assert_trees_equal(params, _from_memory(state_dict))
    ids, mask = padded_batch(TINY, [12, 6], 12)
    assert relative_error(encoder_fn(TINY, params)(ids, mask), reference(model, ids, mask)) < 1e-4


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16], ids=["float32", "bfloat16"])
def test_store_parks_every_array_on_disk(tmp_path, state_dict, dtype):
    spill = ArraySpill(tmp_path / "spill")
    params = convert_t5(state_dict.__getitem__, {k: v.shape for k, v in state_dict.items()}, TINY, dtype, store=spill)
    leaves = jax.tree.leaves(params)
    assert all(isinstance(a, np.memmap) and not a.flags.writeable for a in leaves)
    assert spill.count == len(leaves) == len(list((tmp_path / "spill").iterdir()))
    _assert_trees_equal(params, _from_memory(state_dict, dtype))


def test_sharded_safetensors_directory(tmp_path, model, state_dict):
    model.save_pretrained(tmp_path / "sharded", max_shard_size="10KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 2
    model.save_pretrained(tmp_path / "single")
    _assert_trees_equal(_convert_dir(tmp_path / "sharded")[1], _convert_dir(tmp_path / "single")[1])


def test_pytorch_bin_directory(tmp_path, model, state_dict):
    # transformers 5 always writes safetensors (safe_serialization=False is ignored): write the .bin
    # as older transformers did, the tied encoder.embed_tokens.weight included.
    model.save_pretrained(tmp_path / "st")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    _, keys, _ = read_t5_dir(tmp_path / "bin")
    assert "encoder.embed_tokens.weight" in keys
    _assert_trees_equal(_convert_dir(tmp_path / "bin")[1], _convert_dir(tmp_path / "st")[1])


def test_bfloat16_checkpoints(tmp_path, model):
    """bf16 safetensors (NumPy cannot read them: raw bytes viewed as ml_dtypes.bfloat16) and bf16 .bin."""
    bf16 = hf_encoder(TINY, seed=7).to(torch.bfloat16)
    bf16.save_pretrained(tmp_path / "st")
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text((tmp_path / "st" / "config.json").read_text())
    torch.save(bf16.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    want = _from_memory({k: v.float().numpy() for k, v in bf16.state_dict().items()}, ml_dtypes.bfloat16)
    for src in ("st", "bin"):
        _, params = _convert_dir(tmp_path / src, ml_dtypes.bfloat16)
        _assert_trees_equal(params, want)
        as_f32 = _convert_dir(tmp_path / src, np.float32)[1]
        _assert_trees_equal(as_f32, jax.tree.map(lambda a: a.astype(np.float32), want))


def test_whole_t5_directory_drops_the_decoder(tmp_path, state_dict):
    """A T5ForConditionalGeneration checkpoint: decoder.* and lm_head are left out, as
    transformers' T5EncoderModel leaves them out."""
    full = transformers.T5ForConditionalGeneration(transformers.T5Config(**TINY.to_dict()))
    full.load_state_dict({k: torch.from_numpy(v) for k, v in state_dict.items()}, strict=False)
    full.save_pretrained(tmp_path / "t5")
    cfg, keys, _ = read_t5_dir(tmp_path / "t5")
    assert not [k for k in keys if k.startswith("decoder.") or k.startswith("lm_head")]
    _assert_trees_equal(_convert_dir(tmp_path / "t5")[1], _from_memory(state_dict))


def test_embed_tokens_alone_is_accepted(tmp_path, state_dict):
    sd = {k: v for k, v in state_dict.items() if k != "shared.weight"}
    _, params = _convert_dir(_write_dir(tmp_path / "te", sd))
    np.testing.assert_array_equal(params["shared"]["embedding"], state_dict["encoder.embed_tokens.weight"])


def _fails(tmp_path, sd) -> str:
    with pytest.raises(ConversionError) as err:
        _convert_dir(_write_dir(tmp_path / "te", sd))
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'te'} does not match the expected layout:")
    return message


def test_missing_keys_are_named(tmp_path, state_dict):
    sd = dict(state_dict)
    del sd["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"], sd["encoder.final_layer_norm.weight"]
    del sd["shared.weight"], sd["encoder.embed_tokens.weight"]
    assert "missing keys (3):\n  encoder.block.1.layer.1.DenseReluDense.wi_1.weight\n" \
           "  encoder.final_layer_norm.weight\n  shared.weight" in _fails(tmp_path, sd)


def test_extra_keys_are_named(tmp_path, state_dict):
    extra = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"  # only block 0 has one
    sd = dict(state_dict, **{extra: np.zeros((32, 4), np.float32)})
    assert f"unexpected keys (1):\n  {extra}" in _fails(tmp_path, sd)


def test_shape_mismatch_shows_both_shapes(tmp_path, state_dict):
    sd = dict(state_dict)
    sd["encoder.block.0.layer.1.DenseReluDense.wo.weight"] = np.zeros((32, 40), np.float32)
    sd["encoder.embed_tokens.weight"] = np.zeros((99, 32), np.float32)
    message = _fails(tmp_path, sd)
    assert "shape mismatches (2):\n" in message
    assert "  encoder.block.0.layer.1.DenseReluDense.wo.weight: checkpoint has (32, 40), expected (32, 48)" in message
    assert "  encoder.embed_tokens.weight: checkpoint has (99, 32), expected (100, 32)" in message


def test_directory_errors(tmp_path, model):
    with pytest.raises(ConversionError, match="nowhere: not a directory"):
        read_t5_dir(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="empty: no config.json"):
        read_t5_dir(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(transformers.T5Config(**TINY.to_dict()).to_dict()))
    looked_for = r"model.safetensors, model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json"
    with pytest.raises(ConversionError, match=rf"no weights \(looked for {looked_for}\)"):
        read_t5_dir(tmp_path / "empty")
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ConversionError, match="model.safetensors: not a readable safetensors file"):
        read_t5_dir(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "umt5"}))
    with pytest.raises(ConversionError, match="config.json: model_type 'umt5' is not supported"):
        read_t5_dir(tmp_path / "empty")
    model.save_pretrained(tmp_path / "sharded", max_shard_size="10KB")
    next((tmp_path / "sharded").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(ConversionError, match=r"index.json names shards that are not there: model-00002-of-"):
        read_t5_dir(tmp_path / "sharded")


def test_float16_is_refused(state_dict):
    with pytest.raises(ValueError, match="float32 or bfloat16, not float16"):
        _from_memory(state_dict, np.float16)
