"""Weights bundles: save/load round trip, dtype casting, errors."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_pixart import TINY as TINY_PIXART
from test_t5 import TINY as TINY_T5
from test_vae import TINY_CONFIGS as TINY_VAES

from dit_jax.models.dit import DiT, variant
from dit_jax.models.pixart import PixArt
from dit_jax.models.t5 import T5Encoder
from dit_jax.models.vae import AutoencoderKL, VAEConfig
from dit_jax.weights import (
    BundleConfig, Weights, abstract_module, dit_module, init_dit_params, load, save, use_compilation_cache,
)

CFG = variant("DiT-S/8", input_size=16, num_classes=3, depth=2)


def _weights():
    return Weights(dit=init_dit_params(CFG, seed=1), config=BundleConfig(dit=CFG, class_names=("a", "b", "c")))


def test_round_trip_is_exact(tmp_path):
    w = _weights()
    save(w, tmp_path / "w")
    back = load(tmp_path / "w")
    assert back.config == w.config
    assert jax.tree.structure(back) == jax.tree.structure(w)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(w)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    x = jnp.ones((1, 16, 16, 4))
    np.testing.assert_array_equal(dit_module(back)(x, jnp.ones(1), jnp.ones(1, jnp.int32)),
                                  dit_module(w)(x, jnp.ones(1), jnp.ones(1, jnp.int32)))


def test_load_bfloat16(tmp_path):
    """Each array is read into bfloat16 (rounded as astype rounds) and onto the default device."""
    save(_weights(), tmp_path / "w")
    w = load(tmp_path / "w", dtype=jnp.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(w)} == {jnp.dtype(jnp.bfloat16)}
    for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(_weights())):
        assert isinstance(a, jax.Array) and a.devices() == {jax.local_devices()[0]}
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b).astype(jnp.bfloat16))
    assert {a.dtype for a in jax.tree.leaves(load(tmp_path / "w", dtype=None))} == {jnp.dtype(jnp.float32)}
    out = dit_module(w)(jnp.ones((1, 16, 16, 4), jnp.bfloat16), jnp.ones(1), jnp.ones(1, jnp.int32))
    assert out.dtype == jnp.bfloat16 and bool(jnp.isfinite(out.astype(jnp.float32)).all())


def test_save_refuses_existing_and_load_explains_missing(tmp_path):
    save(_weights(), tmp_path / "w")
    with pytest.raises(FileExistsError, match="force=True"):
        save(_weights(), tmp_path / "w")
    with pytest.raises(FileNotFoundError, match="not a dit-jax weights directory.*convert.dit"):
        load(tmp_path / "nothing")


def test_load_names_parameters_that_do_not_fit_the_config(tmp_path):
    """A bundle whose arrays disagree with its config.json fails in load, naming every key."""
    params = init_dit_params(CFG, seed=1)
    del params["pos_embed"]
    params["x_embedder"]["proj"]["bias"] = np.zeros(7, np.float32)
    params["stray"] = np.zeros(3, np.float32)
    save(Weights(dit=params, config=BundleConfig(dit=CFG)), tmp_path / "w")
    with pytest.raises(ValueError) as info:
        load(tmp_path / "w")
    message = str(info.value)
    assert "the stored parameters do not fit its config.json" in message
    assert "missing keys (1):\n  pos_embed" in message and "unexpected keys (1):\n  stray" in message
    assert f"x_embedder/proj/bias: stored (7,), expected ({CFG.hidden_size},)" in message

    # A config that describes another model (deeper) than the arrays hold.
    save(_weights(), tmp_path / "v")
    config = json.loads((tmp_path / "v" / "config.json").read_text())
    config["dit"]["depth"] = 3
    (tmp_path / "v" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"blocks/attn/qkv/kernel: stored \(2, "):
        load(tmp_path / "v")


def test_load_explains_a_broken_config_file(tmp_path):
    save(_weights(), tmp_path / "w")
    config_file = tmp_path / "w" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        load(tmp_path / "w")
    del config["dit"]
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="config.json has no 'dit' entry"):
        load(tmp_path / "w")


def test_weights_is_a_pytree_with_static_config():
    w = _weights()
    leaves, treedef = jax.tree.flatten(w)
    assert all(hasattr(a, "shape") for a in leaves)
    assert jax.tree.unflatten(treedef, leaves).config is w.config


def test_compilation_cache_is_written(tmp_path):
    """In a fresh process (the cache is set up at a process's first compilation)."""
    import subprocess
    import sys

    code = (
        "import jax, jax.numpy as jnp; from dit_jax.weights import use_compilation_cache; "
        f"use_compilation_cache({str(tmp_path / 'cache')!r}, min_compile_seconds=0); "
        "jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T + 3.0)(jnp.ones((64, 64))).block_until_ready()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    assert any(p.is_file() for p in (tmp_path / "cache").rglob("*"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file; give a folder"):
        use_compilation_cache(tmp_path / "file")


def test_format_1_bundles_load_with_their_blocks_stacked(tmp_path):
    """Bundles written before the blocks were stored stacked (format 1: one tree per block) load
    into today's layout, the same numbers; a bundle from a newer format is refused."""
    import json

    w = _weights()
    blocks = w.dit["blocks"]  # (depth, ...) each
    old = {**w.dit, "blocks": {i: jax.tree.map(lambda a, i=i: a[i], blocks) for i in range(CFG.depth)}}
    save(Weights(dit=old, config=w.config), tmp_path / "old")
    config_file = tmp_path / "old" / "config.json"
    config = json.loads(config_file.read_text())
    assert config["format_version"] == 2
    config_file.write_text(json.dumps({**config, "format_version": 1}))
    back = load(tmp_path / "old")
    assert jax.tree.structure(back) == jax.tree.structure(w)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(w)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    config_file.write_text(json.dumps({**config, "format_version": 3}))
    with pytest.raises(ValueError, match="format-3 bundle, newer than this dit-jax reads.*upgrade"):
        load(tmp_path / "old")


@pytest.mark.parametrize("cls, config", [
    (DiT, CFG),
    (PixArt, TINY_PIXART.replace(use_additional_conditions=True)),
    (T5Encoder, TINY_T5),
    (AutoencoderKL, VAEConfig.from_diffusers(TINY_VAES["attn"])),
], ids=["dit", "pixart", "t5", "vae"])
def test_abstract_module_is_what_nnx_rngs_builds(cls, config):
    """The shapes-only build with one key for every initialiser gives the module graph and the
    parameter shapes and dtypes that building with `nnx.Rngs` does."""
    graph, state = nnx.split(abstract_module(cls, config, jnp.bfloat16))
    ref_graph, ref_state = nnx.split(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)))
    assert graph == ref_graph
    as_shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), nnx.to_pure_dict(tree))  # noqa: E731
    assert as_shapes(state) == as_shapes(ref_state)
    assert all(isinstance(a, jax.ShapeDtypeStruct) for a in jax.tree.leaves(state))
