"""convert.pixart_transformer: a saved diffusers PixArtTransformer2DModel read lazily, its config,
and every error the conversion must name."""

import json
import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from test_pixart import TINY, diffusers_forward, diffusers_pixart, make_inputs, state_dict_of
from torch_dit import relative_error

from convert.common import ConversionError
from convert.pixart_transformer import convert_pixart_transformer, infer_pixart_config, pixart_expected_shapes
from dit_jax.models.pixart import PixArt, variant


def _module(cfg, params):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: PixArt(cfg, rngs=nnx.Rngs(0))))
    want = jax.tree.map(lambda a: (a.shape, a.dtype), nnx.to_pure_dict(state))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), params) == want  # the tree PixArt(cfg) has
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


class LazyReader:
    """A safetensors file read one tensor at a time, counting the reads."""

    def __init__(self, path):
        self.file = safe_open(str(path), framework="np")
        self.shapes = {k: tuple(self.file.get_slice(k).get_shape()) for k in self.file.keys()}  # noqa: SIM118 (a safe_open handle, not a dict)
        self.reads = []

    def get_tensor(self, key):
        self.reads.append(key)
        return self.file.get_tensor(key)


@pytest.mark.parametrize(
    "changes,text_length",
    [
        ({"use_additional_conditions": True, "interpolation_scale": 2.0}, 120),  # alpha-1024's layout
        ({"interpolation_scale": 0.5}, 300),  # Sigma-256's
    ],
)
def test_saved_diffusers_model_converts_and_matches(tmp_path, changes, text_length):
    cfg = TINY.replace(**changes)
    theirs = diffusers_pixart(cfg, seed=4)
    theirs.save_pretrained(tmp_path / "transformer")  # config.json + diffusion_pytorch_model.safetensors
    hf_config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    reader = LazyReader(tmp_path / "transformer" / "diffusion_pytorch_model.safetensors")
    notes = []
    found = infer_pixart_config(reader.shapes, hf_config, notes=notes)
    assert found == cfg.replace(max_text_length=text_length)
    assert len(notes) == 1 and f"max_text_length {text_length}" in notes[0]
    assert reader.reads == []  # the config comes from shapes and config.json alone
    params = convert_pixart_transformer(reader.get_tensor, reader.shapes, found)
    assert sorted(reader.reads) == sorted(reader.shapes)  # every tensor read, each once
    x, t, cond = make_inputs(cfg)
    got = np.asarray(_module(found, params)(jnp.asarray(x), jnp.asarray(t), jax.tree.map(jnp.asarray, cond)))
    assert relative_error(got, diffusers_forward(theirs, x, t, cond)) < 1e-4


def test_converts_to_bfloat16():
    cfg = TINY.replace(depth=1)
    sd = state_dict_of(diffusers_pixart(cfg, seed=1))
    params = convert_pixart_transformer(sd.__getitem__, {k: v.shape for k, v in sd.items()}, cfg, dtype=ml_dtypes.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(params)} == {np.dtype(ml_dtypes.bfloat16)}
    np.testing.assert_array_equal(
        params["blocks"]["attn"]["q"]["kernel"][0], sd["transformer_blocks.0.attn1.to_q.weight"].T.astype(ml_dtypes.bfloat16)
    )
    np.testing.assert_array_equal(
        params["x_embedder"]["proj"]["kernel"], sd["pos_embed.proj.weight"].transpose(2, 3, 1, 0).astype(ml_dtypes.bfloat16)
    )


@pytest.mark.parametrize("name", ["PixArt-alpha-XL/2-1024", "PixArt-Sigma-XL/2-512"])
def test_expected_shapes_are_diffusers_state_dict(name):
    from diffusers import PixArtTransformer2DModel

    cfg = variant(name)
    with torch.device("meta"):  # shapes only: no memory, no init
        model = PixArtTransformer2DModel(
            sample_size=cfg.input_size, caption_channels=4096, interpolation_scale=cfg.interpolation_scale,
            use_additional_conditions=cfg.use_additional_conditions,
        )
    assert pixart_expected_shapes(cfg) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["PixArt-alpha-XL/2-1024", "PixArt-Sigma-XL/2-1024"])
def test_infer_without_config_assumes_and_says_so(name):
    cfg = variant(name)
    notes = []
    assert infer_pixart_config(pixart_expected_shapes(cfg), None, notes=notes) == cfg
    text = "\n".join(notes)
    assert "assumed 16 attention heads of width 72" in text
    assert "assumed sample_size 128" in text and "interpolation_scale 2 from diffusers' rule" in text
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        infer_pixart_config(pixart_expected_shapes(cfg))
    assert [str(w.message) for w in caught] == notes


def test_infer_reads_the_config_fields():
    shapes = pixart_expected_shapes(variant("PixArt-Sigma-XL/2-512"))
    official = {  # PixArt-Sigma-XL-2-512-MS's transformer/config.json, the fields that matter
        "_class_name": "PixArtTransformer2DModel", "activation_fn": "gelu-approximate", "attention_bias": True,
        "attention_head_dim": 72, "caption_channels": 4096, "cross_attention_dim": 1152, "in_channels": 4,
        "interpolation_scale": 1, "norm_elementwise_affine": False, "norm_eps": 1e-06, "norm_type": "ada_norm_single",
        "num_attention_heads": 16, "num_layers": 28, "out_channels": 8, "patch_size": 2, "sample_size": 64,
        "use_additional_conditions": False,
    }
    notes = []
    assert infer_pixart_config(shapes, official, notes=notes) == variant("PixArt-Sigma-XL/2-512")
    # alpha's configs have no interpolation_scale: diffusers' rule, alpha's text length
    alpha = {k: v for k, v in official.items() if k not in ("interpolation_scale", "use_additional_conditions")}
    assert infer_pixart_config(shapes, alpha, notes=notes) == variant("PixArt-alpha-XL/2-512")
    assert infer_pixart_config(shapes, dict(official, max_text_length=77), notes=notes).max_text_length == 77


@pytest.mark.parametrize(
    "config,message",
    [
        ({"norm_type": "ada_norm_zero"}, "norm_type 'ada_norm_zero' \\(this model has 'ada_norm_single'\\)"),
        ({"norm_elementwise_affine": True}, "norm_elementwise_affine True"),
        ({"caption_channels": None}, "caption_channels None"),
        ({"cross_attention_dim": 768}, "cross_attention_dim 768 differs from the hidden size 1152"),
        ({"num_attention_heads": 8, "attention_head_dim": 72}, "num_attention_heads 8 x attention_head_dim 72 != hidden size 1152"),
        ({"sample_size": 128, "use_additional_conditions": None},
         "config asks for resolution / aspect-ratio micro-conditions but the weights lack their embedders"),
        ({"out_channels": 4}, "config out_channels 4 disagrees with proj_out, which gives 8"),
    ],
)
def test_infer_refuses_what_the_model_cannot_be(config, message):
    shapes = pixart_expected_shapes(variant("PixArt-Sigma-XL/2-1024"))
    with pytest.raises(ConversionError, match=message):
        infer_pixart_config(shapes, dict(config, sample_size=config.get("sample_size", 128),
                                         use_additional_conditions=config.get("use_additional_conditions", False)),
                            notes=[])


def test_infer_errors_without_enough_to_go_on():
    with pytest.raises(ConversionError, match="not a PixArtTransformer2DModel state dict: missing pos_embed.proj.weight"):
        infer_pixart_config({"x_embedder.proj.weight": (384, 4, 2, 2)}, None, notes=[])
    # widths that are not a multiple of 72 need the head count
    with pytest.raises(ConversionError, match="hidden size 48 is not a multiple of the head width 72: give num_attention_heads"):
        infer_pixart_config(pixart_expected_shapes(TINY), {"sample_size": 8}, notes=[])
    assert infer_pixart_config(pixart_expected_shapes(TINY), {"sample_size": 8, "num_attention_heads": 2}, notes=[]).num_heads == 2


def _never_read(key):
    raise AssertionError(f"{key} was read before the layout was checked")


def _fails(shapes, cfg=TINY):
    with pytest.raises(ConversionError) as e:
        convert_pixart_transformer(_never_read, shapes, cfg)
    return str(e.value)


def test_missing_keys_are_named():
    shapes = pixart_expected_shapes(TINY)
    del shapes["transformer_blocks.1.attn2.to_k.bias"], shapes["caption_projection.linear_1.weight"]
    err = _fails(shapes)
    assert err.startswith("PixArt transformer checkpoint does not match the expected layout:")
    assert "missing keys (2):\n  caption_projection.linear_1.weight\n  transformer_blocks.1.attn2.to_k.bias" in err


def test_unexpected_keys_are_named():
    shapes = dict(pixart_expected_shapes(TINY), **{
        "transformer_blocks.0.attn1.q_norm.weight": (24,),  # a qk-norm checkpoint
        "adaln_single.emb.resolution_embedder.linear_1.weight": (16, 256),  # micro-conditions for a model without
    })
    err = _fails(shapes)
    assert ("unexpected keys (2):\n  adaln_single.emb.resolution_embedder.linear_1.weight\n"
            "  transformer_blocks.0.attn1.q_norm.weight") in err


def test_shape_mismatches_show_both_shapes():
    shapes = pixart_expected_shapes(TINY)
    shapes["transformer_blocks.0.ff.net.0.proj.weight"] = (96, 48)
    shapes["scale_shift_table"] = (6, 48)
    err = _fails(shapes)
    assert "shape mismatches (2):" in err
    assert "  scale_shift_table: checkpoint has (6, 48), expected (2, 48)" in err
    assert "  transformer_blocks.0.ff.net.0.proj.weight: checkpoint has (96, 48), expected (192, 48)" in err


def test_all_problems_at_once():
    shapes = pixart_expected_shapes(TINY)
    del shapes["proj_out.bias"]
    shapes["extra.weight"] = (1,)
    shapes["proj_out.weight"] = (16, 48)
    err = _fails(shapes)
    assert "missing keys (1):\n  proj_out.bias" in err and "unexpected keys (1):\n  extra.weight" in err
    assert "proj_out.weight: checkpoint has (16, 48), expected (32, 48)" in err


def test_get_tensor_disagreeing_with_the_shapes_is_caught():
    cfg = TINY.replace(depth=1)
    sd = state_dict_of(diffusers_pixart(cfg, seed=1))
    shapes = {k: v.shape for k, v in sd.items()}
    bad = dict(sd, **{"proj_out.bias": np.zeros(5, np.float32)})
    with pytest.raises(ConversionError, match=r"proj_out.bias: get_tensor returned shape \(5,\), the checkpoint said \(32,\)"):
        convert_pixart_transformer(bad.__getitem__, shapes, cfg)
