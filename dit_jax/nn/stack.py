"""Layers stored stacked: one module whose every parameter has a leading depth axis.

A transformer's blocks are kept this way (`DiT.blocks`, `PixArt.blocks`) so that a `lax.scan`
runs them straight from the stored parameters. Stored one module per block, a scan needs them
stacked first, and stacking copies every block's weights: inside the compiled sampler that copy
was XLA's largest temporary (2.2 of the 2.6 GiB of DiT-XL/2's float32 sampler at 256 px).

    blocks = stack_modules([Block(cfg, rngs=rngs) for _ in range(depth)])   # kernels (depth, ...)
    third = module_at(blocks, 2)                                            # kernels (...)
    first, *rest = unstack_module(blocks)                                   # every layer

Parameter trees of bundles written before the stacked layout (format 1) hold the blocks as
{0: tree, 1: tree, ...}; `stack_trees` turns them into the stacked tree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def stack_modules(modules: list[nnx.Module]) -> nnx.Module:
    """Modules of one class and config -> one module of that class whose parameters are theirs
    stacked on a new leading axis (len(modules), ...). Do not call it: scan it (see `module_at`)."""
    if not modules:
        raise ValueError("stack_modules needs at least one module")
    graphdef = nnx.split(modules[0])[0]
    states = [nnx.split(module)[1] for module in modules]
    return nnx.merge(graphdef, jax.tree.map(lambda *leaves: jnp.stack(leaves), *states))


def layer_of(tree: Any, index) -> Any:
    """Entry `index` (an int or a traced integer) of every leaf of a stacked tree, read by index
    (inside jit and loops: no copy of the other layers, as a slice handed to a loop would be)."""
    return jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, index, keepdims=False), tree)


def module_at(stacked: nnx.Module, index) -> nnx.Module:
    """Layer `index` (an int or a traced integer) of a stacked module, as a module of its own."""
    graphdef, state = nnx.split(stacked)
    return nnx.merge(graphdef, layer_of(state, index))


def unstack_module(stacked: nnx.Module) -> list[nnx.Module]:
    """A stacked module -> its layers as modules of their own, in order. Each parameter is split
    once (`jnp.split`), so a gradient through the layers is one concatenation per parameter
    (reading layer by layer with `module_at` costs a zero-padded full-size gradient per layer)."""
    graphdef, state = nnx.split(stacked)
    leaves, treedef = jax.tree.flatten(state)
    depth = leaves[0].shape[0]
    parts = [[jnp.squeeze(part, 0) for part in jnp.split(leaf, depth)] for leaf in leaves]
    return [nnx.merge(graphdef, jax.tree.unflatten(treedef, [p[i] for p in parts])) for i in range(depth)]


def stack_trees(per_layer: dict[Any, Any], stack: Callable = jnp.stack) -> Any:
    """{0: tree, 1: tree, ...} (keys ints or digit strings, every tree the same structure) -> one
    tree with each leaf the layers' leaves stacked in index order; `per_layer` is emptied.
    `stack` is `jnp.stack` for device arrays, `np.stack` for host arrays. Leaf by leaf: the
    layers' arrays are released as their stack is made, so the peak is one leaf's worth more
    than the layers themselves (when the caller holds no other reference to them)."""
    indices = list(per_layer)
    if {str(i) for i in indices} != {str(i) for i in range(len(indices))}:  # int or str keys
        raise ValueError(f"layers must be numbered 0 .. n-1, got {indices}")
    indices.sort(key=int)
    layers = [per_layer.pop(i) for i in indices]
    structure = jax.tree.structure(layers[0])
    for i, layer in zip(indices, layers):
        if jax.tree.structure(layer) != structure:
            raise ValueError(f"layer {i} has another parameter structure than layer {indices[0]}")
    columns = [jax.tree.leaves(layer) for layer in layers]
    del layers
    stacked = []
    for leaf in range(structure.num_leaves):
        stacked.append(stack([column[leaf] for column in columns]))
        for column in columns:
            column[leaf] = None  # release the layer's array
    return jax.tree.unflatten(structure, stacked)
