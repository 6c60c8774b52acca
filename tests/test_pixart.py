"""PixArt forward parity with diffusers' PixArtTransformer2DModel on the same (random) weights, and
token merging on PixArt blocks."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch_dit import relative_error

import sdtm
from convert.pixart_transformer import convert_pixart_transformer
from dit_jax.models import pixart as pixart_module
from dit_jax.models.pixart import (
    VARIANTS,
    BlockContext,
    PixArt,
    PixArtConfig,
    pixart_pos_embed_2d,
    text_bias,
    variant,
)
from dit_jax.nn.layers import sincos_pos_embed_2d
from sdtm.ops import plan_from_parents

# Tiny: 4x4 tokens, width 48 (divisible by 3 for the micro-conditions), captions of 6 tokens.
TINY = PixArtConfig(
    input_size=8, hidden_size=48, depth=2, num_heads=2, caption_channels=16, interpolation_scale=0.5,
    max_text_length=6,
)
TEXT_LENGTH = 6
# Rows with 6, 3 and 4 valid tokens, the last not a prefix.
MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 1, 1, 0, 1]], np.int32)


# ------------------------------------------------------------------------------------------------
# Helpers (also used by test_convert_pixart_transformer.py)


def diffusers_pixart(cfg: PixArtConfig, seed: int = 0):
    """diffusers' PixArtTransformer2DModel for `cfg` with every parameter random (its init zeroes
    nothing here, but PixArt's training init does; random values exercise every path)."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        num_layers=cfg.depth,
        cross_attention_dim=cfg.hidden_size,
        sample_size=cfg.input_size,
        patch_size=cfg.patch_size,
        norm_eps=cfg.norm_eps,
        interpolation_scale=cfg.interpolation_scale,
        use_additional_conditions=cfg.use_additional_conditions,
        caption_channels=cfg.caption_channels,
    ).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1 and "scale_shift_table" not in name:
                scale = 1.0 / np.sqrt(p.shape[1] * int(np.prod(p.shape[2:])))
            else:
                scale = 0.3  # biases and the modulation tables: well away from zero
            p.copy_(torch.randn_like(p) * scale)
    return model


def state_dict_of(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def ours_from_state_dict(cfg: PixArtConfig, sd: dict[str, np.ndarray]) -> PixArt:
    params = convert_pixart_transformer(sd.__getitem__, {k: v.shape for k, v in sd.items()}, cfg)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: PixArt(cfg, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


def make_inputs(cfg: PixArtConfig, batch: int = 3, seed: int = 1):
    """x (B, H, W, C), t (B,), cond (NumPy leaves)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cfg.input_size, cfg.input_size, cfg.in_channels)).astype(np.float32)
    t = rng.integers(0, 1000, batch)
    cond = {
        "text": rng.standard_normal((batch, TEXT_LENGTH, cfg.caption_channels)).astype(np.float32),
        "text_mask": MASK[np.arange(batch) % len(MASK)],
    }
    if cfg.use_additional_conditions:
        resolution = np.array([[1024, 1024], [768, 1344], [1536, 640]], np.float32)[np.arange(batch) % 3]
        cond["resolution"] = resolution
        cond["aspect_ratio"] = resolution[:, :1] / resolution[:, 1:]
    return x, t, cond


def diffusers_forward(model, x, t, cond) -> np.ndarray:
    added = None
    if "resolution" in cond:
        added = {key: torch.from_numpy(cond[key]) for key in ("resolution", "aspect_ratio")}
    with torch.no_grad():
        out = model(
            torch.from_numpy(x.transpose(0, 3, 1, 2)), encoder_hidden_states=torch.from_numpy(cond["text"]),
            timestep=torch.from_numpy(t), added_cond_kwargs=added,
            encoder_attention_mask=torch.from_numpy(cond["text_mask"]),
        ).sample
    return out.numpy().transpose(0, 2, 3, 1)


def as_jax(x, t, cond):
    return jnp.asarray(x), jnp.asarray(t), jax.tree.map(jnp.asarray, cond)


def fwd(model, x, t, cond, merger=None, merge_state=None, *, scan=False, cache=None, **static):
    """model.forward_merged(...), eagerly (on a CPU the op-by-op caches shared by the tests beat
    compiling each variant); scan: the blocks as one lax.scan over their stacked parameters."""
    return model.forward_merged(x, t, cond, merger, merge_state, scan_blocks=scan, cache=cache, **static)


@pytest.fixture(scope="module")
def tiny():
    """(diffusers model, its state dict, our model) for TINY."""
    theirs = diffusers_pixart(TINY, seed=0)
    sd = state_dict_of(theirs)
    return theirs, sd, ours_from_state_dict(TINY, sd)


# ------------------------------------------------------------------------------------------------
# Parity


@pytest.mark.parametrize(
    "changes",
    [
        {},  # interpolation 0.5 (Sigma-256's), learned sigma
        {"use_additional_conditions": True, "interpolation_scale": 2.0},  # alpha-1024's layout
        {"out_channels": 4, "interpolation_scale": 1.0, "norm_eps": 1e-5},  # no learned sigma
    ],
)
def test_forward_matches_diffusers(changes):
    cfg = TINY.replace(**changes)
    theirs = diffusers_pixart(cfg, seed=2)
    ours = ours_from_state_dict(cfg, state_dict_of(theirs))
    x, t, cond = make_inputs(cfg)
    got = np.asarray(fwd(ours, *as_jax(x, t, cond))[0])
    want = diffusers_forward(theirs, x, t, cond)
    assert got.shape == (3, 8, 8, cfg.out_channels)
    assert relative_error(got, want) < 1e-4
    # the position embedding diffusers keeps as a (non-persistent) buffer, bit for bit
    np.testing.assert_array_equal(
        pixart_pos_embed_2d(cfg.hidden_size, *cfg.grid, cfg.base_size, cfg.interpolation_scale),
        theirs.pos_embed.pos_embed[0].numpy(),
    )


def test_float_timesteps_and_scalar_timestep(tiny):
    theirs, _, ours = tiny
    x, _, cond = make_inputs(TINY)
    t = np.array([0.5, 250.25, 999.0], np.float32)
    got = np.asarray(fwd(ours, *as_jax(x, t, cond))[0])
    assert relative_error(got, diffusers_forward(theirs, x, t, cond)) < 1e-4
    scalar = np.asarray(fwd(ours, *as_jax(x, 37, cond))[0])
    repeated = np.asarray(fwd(ours, *as_jax(x, np.full(3, 37), cond))[0])
    np.testing.assert_array_equal(scalar, repeated)


def test_padded_caption_tokens_are_ignored(tiny):
    """Changing padded tokens' features changes nothing; changing a valid one does."""
    _, _, ours = tiny
    x, t, cond = make_inputs(TINY)
    base = np.asarray(fwd(ours, *as_jax(x, t, cond))[0])
    padded = dict(cond, text=cond["text"].copy())
    padded["text"][1, 3:] += 5.0  # row 1 keeps tokens 0..2
    padded["text"][2, [1, 4]] -= 3.0  # row 2 keeps 0, 2, 3, 5
    np.testing.assert_allclose(np.asarray(fwd(ours, *as_jax(x, t, padded))[0]), base, rtol=1e-6, atol=1e-6)
    valid = dict(cond, text=cond["text"].copy())
    valid["text"][2, 3] += 1.0
    changed = np.asarray(fwd(ours, *as_jax(x, t, valid))[0])
    assert np.abs(changed[2] - base[2]).max() > 1e-3
    np.testing.assert_array_equal(changed[:2], base[:2])


def test_text_bias_is_diffusers_mask_bias():
    bias = np.asarray(text_bias(jnp.asarray(MASK), jnp.float32))
    assert bias.shape == (3, 1, 1, 6)
    np.testing.assert_array_equal(bias[:, 0, 0], (1 - MASK) * -10000.0)
    np.testing.assert_array_equal(np.asarray(text_bias(jnp.asarray(MASK.astype(bool)), jnp.float32)), bias)


def test_pos_embed_at_scale_one_is_dits():
    np.testing.assert_array_equal(pixart_pos_embed_2d(64, 4, 4, 4, 1.0), sincos_pos_embed_2d(64, 4, 4))
    # a grid twice its base size steps by 1/2: every other token is the base grid's
    fine = pixart_pos_embed_2d(64, 8, 8, 4, 1.0).reshape(8, 8, 64)
    np.testing.assert_allclose(fine[::2, ::2].reshape(16, 64), sincos_pos_embed_2d(64, 4, 4), atol=1e-7)
    # scale 0.5 steps by 2: every other token of an unscaled grid twice as large
    coarse = pixart_pos_embed_2d(64, 4, 4, 4, 0.5)
    every_other = sincos_pos_embed_2d(64, 8, 8).reshape(8, 8, 64)[::2, ::2].reshape(16, 64)
    np.testing.assert_allclose(coarse, every_other, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# Merge-aware forward


def test_scanned_blocks_equal_unrolled_blocks(tiny):
    _, _, model = tiny
    cfg = TINY
    x, t, cond = as_jax(*make_inputs(cfg))
    unrolled, _, full_branches = fwd(model, x, t, cond, return_branches=True)
    np.testing.assert_allclose(fwd(model, x, t, cond, scan=True)[0], unrolled, rtol=1e-5, atol=1e-6)
    # the structure stage with plans shared by 2 blocks, a reweighted prompt and the protected
    # steps' cache; the detail stage (IDM: key attention). (The grouping itself, leftover blocks
    # included, is DiT's, tested in test_dit.py.)
    cases = [
        (sdtm.SDTMConfig(switch_step=1.0, plan_every=2), {"prompt_weight": 1.5, "cache": full_branches, "cache_weight": 0.5}),
        (sdtm.SDTMConfig(switch_step=0), {}),
    ]
    for config, options in cases:
        merger = sdtm.schedule(config, 1, cfg.num_tokens)[0].merger
        state = sdtm.init_state(3, cfg.num_tokens)
        a, sa, ba = fwd(model, x, t, cond, merger, state, return_branches=True, **options)
        b, sb, bb = fwd(model, x, t, cond, merger, state, scan=True, return_branches=True, **options)
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bb, ba, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(sa["counter"], sb["counter"])
        assert ba.shape == (cfg.depth, PixArt.CACHED_BRANCHES, 3, cfg.num_tokens, cfg.hidden_size)
        assert not np.allclose(a, unrolled)


def test_jitted_forward_equals_eager(tiny):
    """As the sampler runs it: split once, merge inside jit (the cond checks see tracers)."""
    _, _, model = tiny
    x, t, cond = as_jax(*make_inputs(TINY))
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda state, x, t, cond: nnx.merge(graphdef, state)(x, t, cond))
    np.testing.assert_allclose(jitted(state, x, t, cond), fwd(model, x, t, cond)[0], rtol=1e-5, atol=1e-6)


def test_bfloat16_forward(tiny):
    """Weights cast to bf16 (norms and softmax still in float32): close to the float32 output."""
    _, _, model = tiny
    state = nnx.state(model)
    # as dit_jax.weights builds it: the module made for bf16 (its layers compute in bf16)
    half_graphdef = nnx.split(nnx.eval_shape(lambda: PixArt(TINY, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)))[0]
    half = jax.tree.map(lambda a: a.astype(jnp.bfloat16), state)
    x, t, cond = as_jax(*make_inputs(TINY))

    @jax.jit
    def run(state, x, t, cond, merge_state):
        return nnx.merge(half_graphdef, state).forward_merged(x, t, cond, sdtm.SSMMerger(6), merge_state)[0]

    merge_state = sdtm.init_state(3, TINY.num_tokens)
    out = run(half, x.astype(jnp.bfloat16), t, cond, merge_state)  # text, micro-conditions: float32
    assert out.dtype == jnp.bfloat16
    assert relative_error(out.astype(jnp.float32), fwd(model, x, t, cond, sdtm.SSMMerger(6), merge_state)[0]) < 0.05


def test_sdtm_phases_run_on_pixart(tiny):
    _, _, model = tiny
    x, t, cond = as_jax(*make_inputs(TINY))
    plain = np.asarray(fwd(model, x, t, cond)[0])
    phases = sdtm.schedule(sdtm.SDTMConfig(), 10, TINY.num_tokens, grid=TINY.grid)
    assert {p.strategy for p in phases} == {"ssm", "idm"}
    state = sdtm.init_state(3, TINY.num_tokens)
    for phase in phases:
        out, state = fwd(model, x, t, cond, phase.merger, state)
        assert out.shape == plain.shape and bool(jnp.all(jnp.isfinite(out)))
        assert state["counter"].shape == (3, TINY.num_tokens)
        assert not np.allclose(out, plain)  # every phase merges something
    assert float(state["counter"].max()) > 0  # frequency priority saw the merges


@pytest.mark.parametrize("merger", [sdtm.NoMerger(), sdtm.SSMMerger(0), sdtm.IDMMerger(0)])
def test_mergers_that_merge_nothing_give_the_plain_output(tiny, merger):
    _, _, model = tiny
    x, t, cond = as_jax(*make_inputs(TINY))
    out, _ = fwd(model, x, t, cond, merger, sdtm.init_state(3, TINY.num_tokens))
    np.testing.assert_array_equal(out, fwd(model, x, t, cond)[0])


@pytest.mark.parametrize(
    "config", [sdtm.ToMeConfig(ratio=0.5), sdtm.ToMeConfig(ratio=0.5, merge_mlp=True, random=False)]
)
def test_tome_runs_on_pixart(tiny, config):
    _, _, model = tiny
    x, t, cond = as_jax(*make_inputs(TINY))
    (phase,) = sdtm.schedule(config, 10, TINY.num_tokens, grid=TINY.grid)
    assert phase.strategy == "tome" and phase.merge_count == 8
    out, _ = fwd(model, x, t, cond, phase.merger, sdtm.init_state(3, TINY.num_tokens, jax.random.key(3)))
    assert out.shape == (3, 8, 8, 8) and bool(jnp.all(jnp.isfinite(out)))
    assert not np.allclose(out, fwd(model, x, t, cond)[0])


def test_structure_stage_merges_self_and_cross_attention_queries(tiny, monkeypatch):
    """An SSM plan shortens both attentions' queries; the caption's keys stay whole."""
    _, _, model = tiny
    calls = []
    original = pixart_module.MultiHeadAttention.__call__

    def spy(self, x, context=None, bias=None, **kw):
        keys = x if context is None else context
        calls.append(("self" if context is None else "cross", x.shape[1], keys.shape[1]))
        return original(self, x, context, bias, **kw)

    monkeypatch.setattr(pixart_module.MultiHeadAttention, "__call__", spy)
    x, t, cond = as_jax(*make_inputs(TINY))
    fwd(model, x, t, cond)
    assert calls == [("self", 16, 16), ("cross", 16, TEXT_LENGTH)] * TINY.depth
    calls.clear()
    fwd(model, x, t, cond, sdtm.SSMMerger(6), sdtm.init_state(3, TINY.num_tokens))
    assert calls == [("self", 10, 10), ("cross", 10, TEXT_LENGTH)] * TINY.depth
    calls.clear()  # the detail stage (IDM) merges MLP inputs only
    fwd(model, x, t, cond, sdtm.IDMMerger(6), sdtm.init_state(3, TINY.num_tokens))
    assert calls == [("self", 16, 16), ("cross", 16, TEXT_LENGTH)] * TINY.depth


def _block_setup(sd, zero_self_attention=True):
    """Block 0 of a model (self-attention output zeroed, so merging its keys cannot matter) and
    the BlockContext of a real conditioning."""
    sd = dict(sd)
    if zero_self_attention:
        for key in ("transformer_blocks.0.attn1.to_out.0.weight", "transformer_blocks.0.attn1.to_out.0.bias"):
            sd[key] = np.zeros_like(sd[key])
    model = ours_from_state_dict(TINY, sd)
    _, t, cond = as_jax(*make_inputs(TINY))
    emb = model.embed_conditions(t, cond)
    context = BlockContext(model.t_block(jax.nn.silu(emb)), model.y_embedder(cond["text"]),
                           text_bias(cond["text_mask"], jnp.float32), 1.0)
    return model.block(0), context


def _window_plan(batch=3):
    """Tokens 1, 4, 5 join token 0 (the top-left 2x2 window of the 4x4 grid)."""
    parent = np.arange(16)
    parent[[1, 4, 5]] = 0
    is_src = np.zeros(16, bool)
    is_src[[1, 4, 5]] = True
    tile = lambda a: jnp.asarray(np.broadcast_to(a, (batch, 16)))
    return plan_from_parents(tile(parent), tile(is_src), 3)


def test_merging_a_window_of_identical_tokens_changes_nothing(tiny):
    _, sd, _ = tiny
    block, context = _block_setup(sd)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((3, 16, TINY.hidden_size)).astype(np.float32)
    x[:, [1, 4, 5]] = x[:, [0]]
    plan = _window_plan()
    plain = block(jnp.asarray(x), context)[0]
    merged = block(jnp.asarray(x), context, plans=(plan, plan))[0]
    np.testing.assert_allclose(merged, plain, rtol=1e-6, atol=1e-6)


def test_merged_cross_attention_queries_share_one_output(tiny):
    """With distinct tokens, the merged window's cross-attention and MLP updates are one slot's,
    copied to its four tokens; without the plan they differ per token."""
    _, sd, _ = tiny
    block, context = _block_setup(sd)
    x = np.random.default_rng(8).standard_normal((3, 16, TINY.hidden_size)).astype(np.float32)
    plan = _window_plan()
    update = np.asarray(block(jnp.asarray(x), context, plans=(plan, plan))[0]) - x
    for token in (1, 4, 5):
        np.testing.assert_allclose(update[:, token], update[:, 0], atol=1e-5)
    unmerged = np.asarray(block(jnp.asarray(x), context)[0]) - x
    assert np.abs(unmerged[:, 1] - unmerged[:, 0]).max() > 1e-2
    # tokens outside the window: their own queries, but their MLP and cross-attention inputs
    # did not change, so neither did their updates
    np.testing.assert_allclose(update[:, 2], unmerged[:, 2], rtol=1e-5, atol=1e-5)


def test_prompt_weight(tiny):
    _, sd, model = tiny
    x, t, cond = as_jax(*make_inputs(TINY))
    np.testing.assert_array_equal(fwd(model, x, t, cond, prompt_weight=1.0)[0], fwd(model, x, t, cond)[0])
    # 0.0 is the model without cross-attention: the same weights with attn2's output projection zero
    dropped = dict(sd)
    for i in range(TINY.depth):
        for key in (f"transformer_blocks.{i}.attn2.to_out.0.weight", f"transformer_blocks.{i}.attn2.to_out.0.bias"):
            dropped[key] = np.zeros_like(dropped[key])
    reference = fwd(ours_from_state_dict(TINY, dropped), x, t, cond)[0]
    np.testing.assert_allclose(fwd(model, x, t, cond, prompt_weight=0.0)[0], reference, rtol=1e-6, atol=1e-6)
    # with merging too (scanned: test_scanned_blocks_equal_unrolled_blocks)
    merger, state = sdtm.SSMMerger(6), sdtm.init_state(3, TINY.num_tokens)
    reweighted = fwd(model, x, t, cond, merger, state, prompt_weight=1.5)[0]
    assert bool(jnp.all(jnp.isfinite(reweighted)))
    assert not np.allclose(reweighted, fwd(model, x, t, cond, merger, state)[0])
    with pytest.raises(ValueError, match="prompt_weight must be a Python float"):
        model.forward_merged(x, t, cond, prompt_weight=jnp.float32(0.5))


def test_cache_blend(tiny):
    _, _, model = tiny
    x, t, cond = as_jax(*make_inputs(TINY))
    full, _, branches = fwd(model, x, t, cond, return_branches=True)
    assert branches.shape == (TINY.depth, PixArt.CACHED_BRANCHES, 3, TINY.num_tokens, TINY.hidden_size)
    np.testing.assert_array_equal(full, fwd(model, x, t, cond)[0])
    merger, state = sdtm.SSMMerger(6), sdtm.init_state(3, TINY.num_tokens)
    merged = fwd(model, x, t, cond, merger, state)[0]
    # weight 1.0 ignores the cache; weight 0.0 takes the cache for merged tokens
    np.testing.assert_array_equal(fwd(model, x, t, cond, merger, state, cache=branches, cache_weight=1.0)[0], merged)
    blended = fwd(model, x, t, cond, merger, state, cache=branches, cache_weight=0.0)[0]
    assert bool(jnp.all(jnp.isfinite(blended))) and not np.allclose(blended, merged)


# ------------------------------------------------------------------------------------------------
# Parameter tree, config, errors


def _shapes(cfg):
    abstract = nnx.eval_shape(lambda: PixArt(cfg, rngs=nnx.Rngs(0)))
    shapes = jax.tree.map(lambda a: a.shape, nnx.to_pure_dict(nnx.state(abstract)))
    return shapes, sum(int(np.prod(s)) for s in jax.tree.leaves(shapes, is_leaf=lambda s: isinstance(s, tuple)))


def _linear(din, dout):
    return {"kernel": (din, dout), "bias": (dout,)}


def test_tiny_parameter_tree():
    shapes, _ = _shapes(TINY.replace(use_additional_conditions=True))
    attn = {"q": _linear(48, 48), "k": _linear(48, 48), "v": _linear(48, 48), "proj": _linear(48, 48)}
    assert shapes == {
        "x_embedder": {"proj": {"kernel": (2, 2, 4, 48), "bias": (48,)}},
        "t_embedder": {"mlp_0": _linear(256, 48), "mlp_2": _linear(48, 48)},
        "csize_embedder": {"mlp_0": _linear(256, 16), "mlp_2": _linear(16, 16)},
        "ar_embedder": {"mlp_0": _linear(256, 16), "mlp_2": _linear(16, 16)},
        "t_block": _linear(48, 288),
        "y_embedder": {"fc1": _linear(16, 48), "fc2": _linear(48, 48)},
        "blocks": jax.tree.map(  # the 2 blocks stored stacked
            lambda shape: (2, *shape),
            {"scale_shift_table": (6, 48), "attn": attn, "cross_attn": attn,
             "mlp": {"fc1": _linear(48, 192), "fc2": _linear(192, 48)}},
            is_leaf=lambda a: isinstance(a, tuple)),
        "final_layer": {"scale_shift_table": (2, 48), "linear": _linear(48, 32)},
    }
    plain, _ = _shapes(TINY)
    assert "csize_embedder" not in plain and "ar_embedder" not in plain


def test_official_parameter_counts():
    """diffusers' PixArt-XL-2-1024-MS (alpha, micro-conditions) and PixArt-Sigma-XL-2 transformers.
    (Counted from depth 1 and 2: tracing 28 blocks takes seconds.)"""

    def count(name):
        one, two = (_shapes(variant(name, depth=depth))[1] for depth in (1, 2))
        return one + 27 * (two - one)

    assert count("PixArt-alpha-XL/2-1024") == 611_349_152
    assert count("PixArt-Sigma-XL/2-1024") == 610_856_096


def test_variant_registry():
    assert variant("PixArt-alpha-XL/2-1024").use_additional_conditions
    assert not any(v.use_additional_conditions for k, v in VARIANTS.items() if k != "PixArt-alpha-XL/2-1024")
    assert {k: (v.input_size, v.interpolation_scale, v.max_text_length) for k, v in VARIANTS.items()} == {
        "PixArt-alpha-XL/2-1024": (128, 2.0, 120),
        "PixArt-alpha-XL/2-512": (64, 1.0, 120),
        "PixArt-alpha-XL/2-256": (32, 1.0, 120),
        "PixArt-Sigma-XL/2-2K": (256, 4.0, 300),
        "PixArt-Sigma-XL/2-1024": (128, 2.0, 300),
        "PixArt-Sigma-XL/2-512": (64, 1.0, 300),
        "PixArt-Sigma-XL/2-256": (32, 0.5, 300),
    }
    sigma = variant("PixArt-Sigma-XL-2-1024")
    assert (sigma.num_tokens, sigma.grid, sigma.learn_sigma, sigma.caption_channels) == (4096, (64, 64), True, 4096)
    assert variant("PixArt-Sigma-XL/2-512", input_size=32).interpolation_scale == 1.0
    assert variant("PixArt-alpha/PixArt-XL-2-1024-MS") == variant("PixArt-alpha-XL/2-1024")
    assert variant("PixArt-Sigma-XL-2-256x256") == variant("PixArt-Sigma-XL/2-256")
    with pytest.raises(ValueError, match="unknown PixArt variant 'PixArt-XL/2'; known: PixArt-alpha-XL/2-1024"):
        variant("PixArt-XL/2")


def test_config_dict_round_trip_and_defaults():
    for cfg in VARIANTS.values():
        assert PixArtConfig.from_dict(cfg.to_dict()) == cfg
    assert PixArtConfig(input_size=128).interpolation_scale == 2.0  # diffusers' rule when unset
    assert PixArtConfig(input_size=32).interpolation_scale == 1.0
    assert PixArtConfig(input_size=32, interpolation_scale=None).to_dict()["interpolation_scale"] == 1.0
    assert isinstance(PixArtConfig(interpolation_scale=2).interpolation_scale, float)
    with pytest.raises(ValueError, match=r"unknown PixArt config fields \['sample_size'\]; valid fields: \[.*'caption_channels'"):
        PixArtConfig.from_dict({"sample_size": 128})


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"input_size": 9}, "input_size 9 is not divisible by patch_size 2"),
        ({"num_heads": 5}, "hidden_size 48 is not divisible by num_heads 5"),
        ({"hidden_size": 30, "num_heads": 1}, "hidden_size divisible by 4, got 30"),
        ({"hidden_size": 44, "num_heads": 1, "use_additional_conditions": True}, "44 is not divisible by 3"),
        ({"interpolation_scale": 0.0}, "interpolation_scale must be > 0"),
        ({"depth": 0}, "depth must be a positive int, got 0"),
        ({"caption_channels": None}, "caption_channels must be a positive int, got None"),
    ],
)
def test_config_errors(changes, message):
    with pytest.raises(ValueError, match=message):
        PixArt(TINY.replace(**changes), rngs=nnx.Rngs(0))


def test_input_and_cond_errors(tiny):
    _, _, model = tiny
    x, t, cond = as_jax(*make_inputs(TINY))
    with pytest.raises(ValueError, match="takes 8x8 inputs, got 4x4"):
        model(x[:, :4, :4], t, cond)
    with pytest.raises(ValueError, match=r"without micro-conditions\) takes cond keys \['text', 'text_mask'\]; missing \['text_mask'\]"):
        model(x, t, {"text": cond["text"]})
    with pytest.raises(ValueError, match=r"unexpected \['resolution'\]"):
        model(x, t, dict(cond, resolution=jnp.ones((3, 2))))
    with pytest.raises(ValueError, match=r"cond\['text_mask'\] has shape \(3, 5\), expected \(B, L\) = \(3, 6\)"):
        model(x, t, dict(cond, text_mask=cond["text_mask"][:, :5]))
    with pytest.raises(ValueError, match=r"cond\['text'\] has shape \(2, 6, 16\), expected \(B, L, caption_channels\) = \(3, 6, 16\)"):
        model(x, t, dict(cond, text=cond["text"][:2]))
    with pytest.raises(ValueError, match=r"cond is a dict with keys \['text', 'text_mask'\], got ArrayImpl"):
        model(x, t, cond["text"])
    # the checks run before any computation: an abstract model is enough
    micro = nnx.eval_shape(lambda: PixArt(TINY.replace(use_additional_conditions=True), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"with micro-conditions\) takes cond keys .* missing \['resolution', 'aspect_ratio'\]"):
        micro(x, t, cond)


def test_config_is_hashable_and_frozen():
    assert hash(TINY) == hash(dataclasses.replace(TINY))
    with pytest.raises(dataclasses.FrozenInstanceError):
        TINY.depth = 3
