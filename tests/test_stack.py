"""Stacked layers (dit_jax.nn.stack): one module over every block's parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dit_jax.nn.stack import module_at, stack_modules, stack_trees, unstack_module


def test_stacked_module_holds_every_layer_and_gives_each_back():
    layers = [nnx.Linear(3, 5, rngs=nnx.Rngs(i)) for i in range(4)]
    stacked = stack_modules(layers)
    assert isinstance(stacked, nnx.Linear)
    assert stacked.kernel.shape == (4, 3, 5) and stacked.bias.shape == (4, 5)
    x = jax.random.normal(jax.random.key(0), (2, 3))
    for i, layer in enumerate(layers):
        np.testing.assert_array_equal(module_at(stacked, i)(x), layer(x))
    # a traced index, inside a scan: each step reads its own layer
    graphdef, state = nnx.split(stacked)
    out = jax.lax.map(lambda i: module_at(nnx.merge(graphdef, state), i)(x), jnp.arange(4))
    np.testing.assert_allclose(out, jnp.stack([layer(x) for layer in layers]), rtol=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        stack_modules([])


def test_unstacked_layers_are_the_layers_and_their_gradient_is_the_stacks():
    layers = [nnx.Linear(3, 5, rngs=nnx.Rngs(i)) for i in range(3)]
    stacked = stack_modules(layers)
    x = jax.random.normal(jax.random.key(0), (2, 3))
    for mine, layer in zip(unstack_module(stacked), layers, strict=True):
        np.testing.assert_array_equal(mine(x), layer(x))
    graphdef, state = nnx.split(stacked)

    def chain(state):  # the layers one after another, as DiT runs its unrolled blocks
        h = x
        for layer in unstack_module(nnx.merge(graphdef, state)):
            h = jnp.tanh(layer(h)[:, :3])
        return h.sum()

    def chain_by_index(state):
        h = x
        for i in range(3):
            h = jnp.tanh(module_at(nnx.merge(graphdef, state), i)(h)[:, :3])
        return h.sum()

    grads, expected = jax.grad(chain)(state), jax.grad(chain_by_index)(state)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True):
        assert a.shape[0] == 3 and np.any(np.asarray(a) != 0)
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_stack_trees_stacks_leaf_by_leaf_in_index_order():
    per_layer = {str(i): {"w": np.full((2,), i), "b": {"c": np.arange(3) + i}} for i in (1, 0, 2)}
    stacked = stack_trees(per_layer, np.stack)
    assert per_layer == {}  # consumed
    np.testing.assert_array_equal(stacked["w"], [[0, 0], [1, 1], [2, 2]])
    np.testing.assert_array_equal(stacked["b"]["c"], [[0, 1, 2], [1, 2, 3], [2, 3, 4]])
    with pytest.raises(ValueError, match=r"numbered 0 \.\. n-1, got \[0, 2\]"):
        stack_trees({0: {"w": 1}, 2: {"w": 2}})
    with pytest.raises(ValueError, match=r"numbered 0 \.\. n-1, got \['attn', 'mlp'\]"):
        stack_trees({"attn": {"w": 1}, "mlp": {"w": 2}})  # a stacked tree, not layers
    with pytest.raises(ValueError, match="layer 1 has another parameter structure than layer 0"):
        stack_trees({0: {"w": np.ones(1)}, 1: {"v": np.ones(1)}})
