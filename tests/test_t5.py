"""T5Encoder parity with transformers' T5EncoderModel on the same (random) weights, and its config."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.models.t5.modeling_t5 import T5Attention as HFT5Attention

from convert.t5 import convert_t5
from dit_jax.models.t5 import T5_V1_1_XXL, T5Config, T5Encoder, relative_position_buckets

TINY = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)
# Original T5's plain ReLU feed-forward, few buckets and a short max distance, so that sequences
# of 16 reach the shared last bucket; heads * d_kv != d_model.
TINY_RELU = T5Config(
    vocab_size=100, d_model=24, d_kv=10, d_ff=40, num_layers=3, num_heads=3,
    relative_attention_num_buckets=8, relative_attention_max_distance=10, feed_forward_proj="relu",
)


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def hf_encoder(cfg: T5Config, seed: int = 0) -> transformers.T5EncoderModel:
    """transformers' encoder with every parameter random (layer norms too: they init to ones)."""
    hf_cfg = transformers.T5Config(**cfg.to_dict(), dropout_rate=0.0)
    model = transformers.T5EncoderModel(hf_cfg).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif p.ndim == 2 and "relative_attention_bias" not in name and "shared" not in name:
                p.normal_(std=p.shape[1] ** -0.5)  # (out, in): keeps activations O(1)
            else:
                p.normal_()  # embeddings and the position bias
    return model


def ours(cfg: T5Config, model, dtype=np.float32):
    """T5Encoder holding the weights of a transformers model (through convert_t5), jitted:
    returns f(input_ids, attention_mask) -> np.ndarray."""
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    return encoder_fn(cfg, convert_t5(sd.__getitem__, {k: v.shape for k, v in sd.items()}, cfg, dtype), dtype)


def encoder_fn(cfg: T5Config, params: dict, dtype=np.float32):
    """Jitted T5Encoder over a converted parameter tree: f(input_ids, attention_mask) -> np.ndarray float32."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.dtype(dtype))))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    run = jax.jit(lambda state, ids, mask: nnx.merge(graphdef, state)(ids, mask))
    return lambda ids, mask: np.asarray(run(state, jnp.asarray(ids), jnp.asarray(mask)).astype(jnp.float32))


def padded_batch(cfg: T5Config, lengths: list[int], width: int, seed: int = 1):
    """Random ids with EOS (1) closing each row, pad (0) after it; mask 1 on the real tokens."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), width), np.int64)
    mask = np.zeros((len(lengths), width), np.int64)
    for row, n in enumerate(lengths):
        ids[row, : n - 1] = rng.integers(2, cfg.vocab_size, n - 1)
        ids[row, n - 1] = 1
        mask[row, :n] = 1
    return ids, mask


def reference(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()


@pytest.mark.parametrize("cfg,width", [(TINY, 12), (TINY_RELU, 16)], ids=["gated-gelu", "relu"])
def test_forward_matches_transformers(cfg, width):
    model = hf_encoder(cfg)
    ids, mask = padded_batch(cfg, [width, 7, 1], width)
    want = reference(model, ids, mask)
    got = ours(cfg, model)(ids, mask)
    assert got.shape == (3, width, cfg.d_model)
    real = mask.astype(bool)
    assert relative_error(got[real], want[real]) < 1e-4
    # Padded positions are compared to transformers' values too: both mask padding as keys only,
    # so a padded query still attends to its row's real tokens and gets the same (unused) output.
    assert relative_error(got[~real], want[~real]) < 1e-4


def test_without_mask_is_all_tokens():
    model = hf_encoder(TINY, seed=3)
    ids, _ = padded_batch(TINY, [9, 9], 9)
    run = ours(TINY, model)
    assert relative_error(run(ids, np.ones_like(ids)), reference(model, ids, np.ones_like(ids))) < 1e-4


def test_bfloat16_stays_close_to_float32():
    """bf16 parameters and matmuls (float32 norms, softmax and residual stream) against transformers
    in float32. bf16 keeps 8 significant bits (relative rounding up to 2^-9 = 0.2%) on every weight
    and matmul input; across two blocks and the final norm the worst element drifts by about 1%
    of the output's largest value, so 3% is loose enough not to flake and tight enough to catch a
    wrong formula (those give errors of order 1)."""
    model = hf_encoder(TINY, seed=4)
    ids, mask = padded_batch(TINY, [12, 5], 12)
    want = reference(model, ids, mask)
    got = ours(TINY, model, ml_dtypes.bfloat16)(ids, mask)
    real = mask.astype(bool)
    assert relative_error(got[real], want[real]) < 3e-2


def test_position_buckets_match_transformers():
    """Every relative position up to 600 tokens apart, for T5's buckets and two odd settings: the
    float32 truncation at bucket edges must fall on the same side as transformers'."""
    positions = torch.arange(600)
    relative = positions[None, :] - positions[:, None]
    for buckets, max_distance in [(32, 128), (8, 10), (64, 300)]:
        want = HFT5Attention._relative_position_bucket(relative, True, buckets, max_distance).numpy()
        np.testing.assert_array_equal(relative_position_buckets(600, buckets, max_distance), want)


def test_tiny_parameter_tree():
    abstract = nnx.eval_shape(lambda: T5Encoder(TINY, rngs=nnx.Rngs(0)))
    shapes = jax.tree.map(lambda a: a.shape, nnx.to_pure_dict(nnx.state(abstract)))
    block = {
        "attention_norm": {"scale": (32,)},
        "attention": {"q": {"kernel": (32, 32)}, "k": {"kernel": (32, 32)}, "v": {"kernel": (32, 32)},
                      "o": {"kernel": (32, 32)}},
        "ff_norm": {"scale": (32,)},
        "ff": {"wi_0": {"kernel": (32, 48)}, "wi_1": {"kernel": (32, 48)}, "wo": {"kernel": (48, 32)}},
    }
    assert shapes == {
        "shared": {"embedding": (100, 32)},
        "relative_attention_bias": {"embedding": (32, 4)},
        "blocks": {0: block, 1: block},
        "final_norm": {"scale": (32,)},
    }
    relu = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: T5Encoder(TINY_RELU, rngs=nnx.Rngs(0)))))
    relu_ff = jax.tree.map(lambda a: a.shape, relu["blocks"][2]["ff"])
    assert relu_ff == {"wi": {"kernel": (24, 40)}, "wo": {"kernel": (40, 24)}}
    assert relu["blocks"][0]["attention"]["o"]["kernel"].shape == (30, 24)


def test_xxl_parameter_count_and_dtype():
    abstract = nnx.eval_shape(lambda: T5Encoder(T5_V1_1_XXL, rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
    leaves = jax.tree.leaves(nnx.to_pure_dict(nnx.state(abstract)))
    assert sum(int(np.prod(a.shape)) for a in leaves) == 4_762_310_656  # T5EncoderModel of google/t5-v1_1-xxl
    assert {a.dtype for a in leaves} == {jnp.dtype(jnp.bfloat16)}


def test_bfloat16_encoder_needs_no_float32_copy_of_its_weights():
    """XLA's CPU backend computes bfloat16 matmuls in float32; a bf16-output projection made it
    convert every weight matrix first and keep them all (1 GB of temporaries for these two XXL
    blocks, 12 GiB for the 24 of T5-XXL). With float32 outputs it multiplies the bf16 weights as
    they are: the temporaries are the activations."""
    import dataclasses

    cfg = dataclasses.replace(T5_V1_1_XXL, num_layers=2)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: T5Encoder(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)))
    ids = jax.ShapeDtypeStruct((2, 120), jnp.int32)
    encode = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids, ids))
    memory = encode.lower(state, ids).compile().memory_analysis()
    assert memory.temp_size_in_bytes < 100 * 2**20, memory.temp_size_in_bytes / 2**20  # one q kernel in f32: 64 MiB


# google/t5-v1_1-xxl's config.json (the decoder's and generation's fields included, no max distance).
XXL_CONFIG_JSON = {
    "architectures": ["T5ForConditionalGeneration"], "d_ff": 10240, "d_kv": 64, "d_model": 4096,
    "decoder_start_token_id": 0, "dropout_rate": 0.1, "eos_token_id": 1, "feed_forward_proj": "gated-gelu",
    "initializer_factor": 1.0, "is_encoder_decoder": True, "layer_norm_epsilon": 1e-06, "model_type": "t5",
    "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24, "output_past": True, "pad_token_id": 0,
    "relative_attention_num_buckets": 32, "tie_word_embeddings": False, "vocab_size": 32128,
}


def test_from_hf_config():
    assert T5Config.from_hf_config(XXL_CONFIG_JSON) == T5_V1_1_XXL
    assert T5Config.from_hf_config(transformers.T5Config(**TINY_RELU.to_dict()).to_dict()) == TINY_RELU
    # transformers' default feed-forward is original T5's "relu": an absent field means that
    no_ff = {k: v for k, v in XXL_CONFIG_JSON.items() if k != "feed_forward_proj"}
    assert T5Config.from_hf_config(no_ff).feed_forward_proj == "relu"
    with pytest.raises(ValueError, match="lacks d_kv, num_heads: not a T5 config"):
        T5Config.from_hf_config({k: v for k, v in XXL_CONFIG_JSON.items() if k not in ("d_kv", "num_heads")})
    with pytest.raises(ValueError, match="model_type 'umt5'.*position bias in every block"):
        T5Config.from_hf_config(dict(XXL_CONFIG_JSON, model_type="umt5"))
    with pytest.raises(ValueError, match="feed_forward_proj 'gated-swiglu' is not supported"):
        T5Config.from_hf_config(dict(XXL_CONFIG_JSON, feed_forward_proj="gated-swiglu"))


def test_config_dict_round_trip_and_errors():
    assert T5Config.from_dict(TINY.to_dict()) == TINY
    assert T5Config() == T5_V1_1_XXL
    with pytest.raises(ValueError) as err:
        T5Config.from_dict(dict(TINY.to_dict(), hidden_size=32, dropout_rate=0.1))
    assert str(err.value).startswith("unknown T5 config fields ['dropout_rate', 'hidden_size']; valid fields: [")
    assert "'d_kv'" in str(err.value) and "'relative_attention_max_distance'" in str(err.value)
    with pytest.raises(ValueError, match="must be even and >= 4, got 7"):
        T5Encoder(TINY.replace(relative_attention_num_buckets=7), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="sizes must be positive: num_layers=0"):
        TINY.replace(num_layers=0).validate()
