"""DiT forward parity with diffusers' DiTTransformer2DModel on the same (random) weights."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from torch_dit import diffusers_dit, random_official_state_dict, relative_error

from convert.dit import official_to_params
from dit_jax.models.dit import DiT, VARIANTS, guide, variant
from dit_jax.weights import BundleConfig, Weights, dit_module


def _both(cfg, seed=0):
    sd = random_official_state_dict(cfg, seed)
    ours = dit_module(Weights(dit=jax.tree.map(jnp.asarray, official_to_params(sd, cfg)), config=BundleConfig(dit=cfg)))
    return ours, diffusers_dit(cfg, sd)


def _run(ours, theirs, cfg, batch=2, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, cfg.input_size, cfg.input_size, cfg.in_channels)).astype(np.float32)
    t = rng.integers(0, 1000, batch)
    y = rng.integers(0, cfg.num_classes + 1, batch)  # includes the null class
    got = np.asarray(ours(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)))
    with torch.no_grad():
        want = theirs(
            torch.from_numpy(x.transpose(0, 3, 1, 2)), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(y)
        ).sample.numpy().transpose(0, 2, 3, 1)
    return got, want


@pytest.mark.parametrize(
    "name,input_size,learn_sigma",
    [("DiT-S/2", 8, True), ("DiT-S/2", 8, False), ("DiT-S/4", 16, True)],
)
def test_forward_matches_diffusers(name, input_size, learn_sigma):
    cfg = variant(name, input_size=input_size, num_classes=10, learn_sigma=learn_sigma)
    ours, theirs = _both(cfg)
    got, want = _run(ours, theirs, cfg)
    assert got.shape == (2, input_size, input_size, cfg.out_channels)
    assert relative_error(got, want) < 1e-4


def test_classifier_free_guidance_matches_dit_rule():
    """DiT's forward_with_cfg: [cond; uncond] halves, guidance on the first three channels only."""
    cfg = variant("DiT-S/2", input_size=8, num_classes=10)
    ours, theirs = _both(cfg, seed=3)
    rng = np.random.default_rng(4)
    half = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    x = np.concatenate([half, half])
    t = np.array([500, 20, 500, 20])
    y = np.array([3, 7, cfg.null_class, cfg.null_class])
    scale = 4.0
    got = np.asarray(guide(ours(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)), scale))
    with torch.no_grad():
        out = theirs(torch.from_numpy(x.transpose(0, 3, 1, 2)), timestep=torch.from_numpy(t),
                     class_labels=torch.from_numpy(y)).sample
        eps, rest = out[:, :3], out[:, 3:]
        cond, uncond = torch.split(eps, len(eps) // 2)
        guided = uncond + scale * (cond - uncond)
        want = torch.cat([torch.cat([guided, guided]), rest], dim=1).numpy().transpose(0, 2, 3, 1)
    assert got.shape == x.shape[:3] + (8,)
    assert relative_error(got, want) < 1e-4


def test_diffusers_default_timestep_frequencies_differ_from_dit():
    """diffusers' DiT divides frequencies by half-1; the original (and this project) by half."""
    cfg = variant("DiT-S/2", input_size=8, num_classes=10)
    ours, theirs = _both(cfg)
    for block in theirs.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 1
    got, want = _run(ours, theirs, cfg)
    assert relative_error(got, want) > 1e-3


def _count(cfg):
    abstract = nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))
    shapes = jax.tree.map(lambda a: a.shape, nnx.to_pure_dict(nnx.state(abstract)))
    return shapes, sum(int(np.prod(s)) for s in jax.tree.leaves(shapes, is_leaf=lambda s: isinstance(s, tuple)))


def test_dit_xl2_256_parameter_tree():
    shapes, total = _count(variant("DiT-XL/2", input_size=32))
    assert total == 675_129_632  # the official DiT-XL-2-256x256.pt, pos_embed included
    assert shapes["x_embedder"]["proj"]["kernel"] == (2, 2, 4, 1152)
    assert shapes["pos_embed"] == (1, 256, 1152)
    assert shapes["y_embedder"]["embedding_table"]["embedding"] == (1001, 1152)
    assert shapes["blocks"] == {  # the 28 blocks stored stacked
        "attn": {"qkv": {"kernel": (28, 1152, 3456), "bias": (28, 3456)},
                 "proj": {"kernel": (28, 1152, 1152), "bias": (28, 1152)}},
        "mlp": {"fc1": {"kernel": (28, 1152, 4608), "bias": (28, 4608)},
                "fc2": {"kernel": (28, 4608, 1152), "bias": (28, 1152)}},
        "adaLN_modulation": {"kernel": (28, 1152, 6912), "bias": (28, 6912)},
    }
    assert shapes["final_layer"]["linear"]["kernel"] == (1152, 32)


def test_variant_registry():
    assert len(VARIANTS) == 12
    assert variant("DiT-XL-2", input_size=64).num_tokens == 1024
    assert variant("DiT-B/4").num_heads == 12
    with pytest.raises(ValueError, match="unknown DiT variant 'DiT-M/2'.*DiT-S/2"):
        variant("DiT-M/2")


def test_wrong_input_size_is_refused():
    cfg = variant("DiT-S/8", input_size=16, num_classes=4, depth=1)
    model = DiT(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="takes 16x16 inputs, got 8x8"):
        model(jnp.zeros((1, 8, 8, 4)), jnp.zeros(1), jnp.zeros(1, jnp.int32))


def test_scanned_blocks_equal_unrolled_blocks():
    import sdtm

    cfg = variant("DiT-S/2", input_size=8, num_classes=10, depth=3)
    model = DiT(cfg, rngs=nnx.Rngs(2))
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    t, y = jnp.array([5, 700]), jnp.array([1, 10])
    unrolled = model.forward_merged(x, t, y, scan_blocks=False)[0]
    scanned = model.forward_merged(x, t, y, scan_blocks=True)[0]
    np.testing.assert_allclose(scanned, unrolled, rtol=1e-5, atol=1e-6)
    merger = sdtm.schedule(sdtm.SDTMConfig(switch_step=1.0), 1, cfg.num_tokens)[0].merger
    state = sdtm.init_state(2, cfg.num_tokens)
    a, sa = model.forward_merged(x, t, y, merger, state, scan_blocks=False)
    b, sb = model.forward_merged(x, t, y, merger, state, scan_blocks=True)
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(sa["counter"], sb["counter"])


@pytest.mark.parametrize("every", [2, 3])
def test_shared_plans_scanned_equal_unrolled(every):
    """plan_every: the unrolled loop and the grouped scans give the same numbers (depth 5: a leftover block)."""
    import sdtm

    cfg = variant("DiT-S/2", input_size=8, num_classes=10, depth=5)
    model = DiT(cfg, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 4))
    t, y = jnp.array([5, 700]), jnp.array([1, 10])
    for config in (sdtm.SDTMConfig(switch_step=1.0, plan_every=every), sdtm.SDTMConfig(switch_step=0, plan_every=every)):
        merger = sdtm.schedule(config, 1, cfg.num_tokens)[0].merger
        state = sdtm.init_state(2, cfg.num_tokens)
        a, sa = model.forward_merged(x, t, y, merger, state, scan_blocks=False)
        b, sb = model.forward_merged(x, t, y, merger, state, scan_blocks=True)
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(sa["counter"], sb["counter"])
        # with the protected steps' cache in (read by index like the weights) and every block's branches out
        full = model.forward_merged(x, t, y, return_branches=True, scan_blocks=False)[2]
        a2, _, ba = model.forward_merged(x, t, y, merger, state, scan_blocks=False, cache=full, cache_weight=0.5,
                                         return_branches=True)
        b2, _, bb = model.forward_merged(x, t, y, merger, state, scan_blocks=True, cache=full, cache_weight=0.5,
                                         return_branches=True)
        np.testing.assert_allclose(b2, a2, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bb, ba, rtol=1e-5, atol=1e-6)
        assert not np.allclose(a2, a)
        single = sdtm.schedule(config.replace(plan_every=1), 1, cfg.num_tokens)[0].merger
        c, sc = model.forward_merged(x, t, y, single, state, scan_blocks=False)
        assert not np.allclose(a, c)  # sharing changes which plans the later blocks use
        # counters advance once per built plan: fewer builds than blocks
        assert float(sa["counter"].max()) <= float(sc["counter"].max())


def test_shared_plans_read_the_stack_in_place():
    """With plans shared over 4 blocks the scans read each block's parameters from the stack by
    index: the compiled forward allocates no copy of a group's weights (taking the groups apart
    with slices copied them all: 2.85 GiB of temporaries for DiT-XL/2 against 0.09 GiB unshared)."""
    import sdtm

    cfg = variant("DiT-S/2", input_size=8, num_classes=2, depth=16, hidden_size=128, num_heads=2)
    model = DiT(cfg, rngs=nnx.Rngs(0))
    x = jnp.zeros((1, 8, 8, 4))
    t, y = jnp.array([5]), jnp.array([1])
    graphdef, params = nnx.split(model)
    weights = sum(a.nbytes for a in jax.tree.leaves(nnx.state(model.blocks)))
    for every in (1, 4):
        merger = sdtm.schedule(sdtm.SDTMConfig(switch_step=1.0, plan_every=every), 1, cfg.num_tokens)[0].merger
        state = sdtm.init_state(1, cfg.num_tokens)

        def forward(params, merger=merger, state=state):
            return nnx.merge(graphdef, params).forward_merged(x, t, y, merger, state, scan_blocks=True)[0]

        compiled = jax.jit(forward).lower(params).compile()
        assert compiled.memory_analysis().temp_size_in_bytes < weights / 8, every


def test_adaln_tables_are_computed_before_the_blocks():
    """Every block's adaLN table comes from one matmul before the blocks: the scanned block
    neither slices its [D, 6D] kernel out of the stack (a copy per block on a GPU) nor multiplies
    by it, and each block's table equals its own adaLN linear's."""
    cfg = variant("DiT-S/2", input_size=8, num_classes=10, depth=3, hidden_size=64, num_heads=2)
    model = DiT(cfg, rngs=nnx.Rngs(4))
    c = jax.random.normal(jax.random.key(2), (2, 64))
    tables = model.blocks.modulation(c)  # (depth, B, 6D)
    assert tables.shape == (3, 2, 384) and float(jnp.abs(tables).min()) > 0
    for i in range(3):
        block = model.block(i)
        np.testing.assert_allclose(tables[i], block.adaLN_modulation(jax.nn.silu(c)), rtol=1e-5, atol=1e-6)
    graphdef, params = nnx.split(model)
    x = jnp.zeros((2, 8, 8, 4))
    t, y = jnp.array([5, 9]), jnp.array([1, 2])

    def forward(params):
        return nnx.merge(graphdef, params).forward_merged(x, t, y, scan_blocks=True)[0]

    text = jax.jit(forward).lower(params).compile().as_text()
    assert "while" in text
    assert not re.search(r"f32\[(1,)?64,384\]", text), "a block reads its own adaLN kernel inside the loop"
