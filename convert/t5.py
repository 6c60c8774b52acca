"""transformers' T5 encoder state dict -> the parameter tree of `dit_jax.models.t5.T5Encoder`.

No command line of its own: the text-to-image converters (`convert.pixart`) call it on a
checkpoint's `text_encoder/` directory:

    cfg, keys_and_shapes, get_tensor = read_t5_dir("PixArt-XL-2-1024-MS/text_encoder")
    params = convert_t5(get_tensor, keys_and_shapes, cfg, ml_dtypes.bfloat16, source="text_encoder")

Tensors are read, cast and transposed one at a time, so the 4.7B-parameter T5-XXL is never held
twice: peak memory is the output tree plus one float32 tensor, or one tensor alone when `store`
parks each converted array on disk (`convert.common.ArraySpill`, what `convert.pixart` does).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from convert.common import TRANSFORMERS_WEIGHT_FILES, ConversionError, GetTensor, check_state_dict, open_weights_dir, torch_linear
from dit_jax.models.t5 import T5Config

# transformers ties the encoder's embedding to `shared`; safetensors files keep one of the two names.
_TIED = ("shared.weight", "encoder.embed_tokens.weight")


def t5_expected_shapes(cfg: T5Config) -> dict[str, tuple[int, ...]]:
    """Every key of a transformers `T5EncoderModel` state dict with its shape (torch layout)."""
    d, inner, ff = cfg.d_model, cfg.inner_dim, cfg.d_ff
    shapes: dict[str, tuple[int, ...]] = {
        "shared.weight": (cfg.vocab_size, d),
        "encoder.embed_tokens.weight": (cfg.vocab_size, d),  # tied to shared.weight
        "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": (
            cfg.relative_attention_num_buckets, cfg.num_heads,
        ),
        "encoder.final_layer_norm.weight": (d,),
    }
    wi = ("wi_0", "wi_1") if cfg.is_gated else ("wi",)
    for i in range(cfg.num_layers):
        attn, ffn = f"encoder.block.{i}.layer.0.", f"encoder.block.{i}.layer.1."
        shapes.update({attn + f"SelfAttention.{n}.weight": (inner, d) for n in "qkv"})
        shapes[attn + "SelfAttention.o.weight"] = (d, inner)
        shapes[attn + "layer_norm.weight"] = (d,)
        shapes.update({ffn + f"DenseReluDense.{n}.weight": (ff, d) for n in wi})
        shapes[ffn + "DenseReluDense.wo.weight"] = (d, ff)
        shapes[ffn + "layer_norm.weight"] = (d,)
    return shapes


def convert_t5(
    get_tensor: GetTensor,
    keys_and_shapes: Mapping[str, tuple[int, ...]],
    cfg: T5Config,
    dtype=np.float32,
    *,
    source: str = "T5 checkpoint",
    store: Callable[[np.ndarray], np.ndarray] | None = None,
) -> dict:
    """Build `nnx.to_pure_dict(nnx.state(T5Encoder(cfg, dtype=dtype)))`'s tree from a state dict.

    get_tensor(key) returns one tensor as a NumPy array (any float dtype, bfloat16 as ml_dtypes);
    keys_and_shapes lists every key of the checkpoint with its shape. Keys and shapes are checked
    first (every missing, unexpected and mismatched key named, `source` in the message); of the
    tied pair shared.weight / encoder.embed_tokens.weight one suffices (shared.weight is read when
    both are there). dtype: float32 or bfloat16 (np.float32, ml_dtypes.bfloat16, jnp.bfloat16).
    store(array) -> array keeps each converted array (e.g. `convert.common.ArraySpill`, which
    parks it in a file); None keeps it in memory. Returns NumPy arrays of `dtype`.
    """
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)):
        raise ValueError(
            f"T5 parameters can be float32 or bfloat16, not {dtype} (float16 overflows in T5 v1.1's activations)"
        )
    got = {k: tuple(s) for k, s in keys_and_shapes.items()}
    expected = t5_expected_shapes(cfg)
    present = [k for k in _TIED if k in got]
    embedding_key = present[0] if present else _TIED[0]
    required = {k: s for k, s in expected.items() if k not in _TIED or k in present or k == embedding_key}
    check_state_dict(source, got, required)

    keep = store or (lambda array: array)

    def cast(key: str) -> np.ndarray:
        return np.asarray(get_tensor(key)).astype(dtype, copy=False)

    def read(key: str) -> np.ndarray:
        return keep(cast(key))

    def kernel(key: str) -> dict:
        return {"kernel": keep(torch_linear(cast(key)))}  # cast first: the transpose copies half the bytes in bf16

    wi = ("wi_0", "wi_1") if cfg.is_gated else ("wi",)
    blocks = {}
    for i in range(cfg.num_layers):
        attn, ffn = f"encoder.block.{i}.layer.0.", f"encoder.block.{i}.layer.1."
        blocks[i] = {
            "attention_norm": {"scale": read(attn + "layer_norm.weight")},
            "attention": {n: kernel(attn + f"SelfAttention.{n}.weight") for n in "qkvo"},
            "ff_norm": {"scale": read(ffn + "layer_norm.weight")},
            "ff": {n: kernel(ffn + f"DenseReluDense.{n}.weight") for n in (*wi, "wo")},
        }
    return {
        "shared": {"embedding": read(embedding_key)},
        "relative_attention_bias": {
            "embedding": read("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        },
        "blocks": blocks,
        "final_norm": {"scale": read("encoder.final_layer_norm.weight")},
    }


def read_t5_dir(path: str | os.PathLike) -> tuple[T5Config, dict[str, tuple[int, ...]], GetTensor]:
    """A transformers T5 encoder directory (diffusers' `text_encoder/`) -> (config, keys and
    shapes, get_tensor) for `convert_t5`, without reading any tensor yet.

    Reads config.json and one of: model.safetensors; sharded safetensors through
    model.safetensors.index.json; pytorch_model.bin (or its sharded index), loaded with
    weights_only=True and memory-mapped. bfloat16 tensors come back as ml_dtypes.bfloat16.
    A whole T5 (T5ForConditionalGeneration) works too: its decoder.* and lm_head.weight keys are
    left out, as transformers' T5EncoderModel leaves them out.
    """
    path = Path(path)
    if not path.is_dir():
        raise ConversionError(f"{path}: not a directory (expected a T5 text_encoder/ folder)")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{path}: no config.json")
    try:
        cfg = T5Config.from_hf_config(json.loads(config_file.read_text()))
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{config_file}: {e}") from e
    all_shapes, read = open_weights_dir(path, TRANSFORMERS_WEIGHT_FILES)
    # A whole T5 (encoder-decoder) converts too: transformers' T5EncoderModel drops these.
    keys_and_shapes = {
        k: shape for k, shape in all_shapes.items() if not (k.startswith("decoder.") or k == "lm_head.weight")
    }

    return cfg, keys_and_shapes, read
