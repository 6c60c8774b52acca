"""The `Weights` bundle: configs (static) and parameter trees (array leaves) of every component.

On disk a bundle is a directory:
    config.json   readable: each component's config, class names, provenance
    params/       an orbax checkpoint of {"dit": ..., "vae": ...}
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dit_jax.models.dit import DiT, DiTConfig

FORMAT_VERSION = 1
DEFAULT_WEIGHTS = Path(__file__).parent / "assets" / "fashion-dit"


@dataclasses.dataclass(frozen=True)
class BundleConfig:
    """Everything about a bundle that is not an array. Hashable: it is the static part of `Weights`."""

    dit: DiTConfig
    vae: Any = None  # dit_jax.models.vae.VAEConfig, or None for pixel-space models
    class_names: tuple[str, ...] | None = None  # None: ImageNet (the prompts module knows its names)
    info_json: str = "{}"  # provenance (converted from, trained with...), as JSON text

    @property
    def info(self) -> dict:
        return json.loads(self.info_json)

    @property
    def pixel_space(self) -> bool:
        return self.vae is None

    @property
    def image_size(self) -> int:
        """Side of the images `sample` returns."""
        if self.vae is None:
            return self.dit.input_size
        return self.dit.input_size * 2 ** (len(self.vae.block_out_channels) - 1)

    def to_dict(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "dit": self.dit.to_dict(),
            "vae": None if self.vae is None else self.vae.to_dict(),
            "class_names": None if self.class_names is None else list(self.class_names),
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: dict) -> BundleConfig:
        vae = None
        if d.get("vae") is not None:
            from dit_jax.models.vae import VAEConfig

            vae = VAEConfig.from_dict(d["vae"])
        names = d.get("class_names")
        return cls(
            dit=DiTConfig.from_dict(d["dit"]),
            vae=vae,
            class_names=None if names is None else tuple(names),
            info_json=json.dumps(d.get("info", {}), sort_keys=True),
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Weights:
    """Parameter trees (pure nested dicts of arrays) with their static config."""

    dit: dict
    vae: dict | None = None
    config: BundleConfig = dataclasses.field(default=None, metadata=dict(static=True))

    @property
    def dtype(self):
        return jax.tree.leaves(self.dit)[0].dtype


@functools.lru_cache(maxsize=None)
def _dit_graph(config: DiTConfig, dtype) -> nnx.GraphDef:
    abstract = nnx.eval_shape(lambda: DiT(config, rngs=nnx.Rngs(0), dtype=dtype))
    return nnx.split(abstract)[0]


def dit_module(weights: Weights) -> DiT:
    """The DiT as an NNX module over `weights.dit` (cheap: no parameter is copied)."""
    return nnx.merge(_dit_graph(weights.config.dit, jnp.dtype(weights.dtype)), weights.dit)


def vae_module(weights: Weights):
    """The VAE as an NNX module over `weights.vae`."""
    if weights.vae is None:
        raise ValueError("this bundle has no VAE (a pixel-space model)")
    return nnx.merge(_vae_graph(weights.config.vae, jnp.dtype(jax.tree.leaves(weights.vae)[0].dtype)), weights.vae)


@functools.lru_cache(maxsize=None)
def _vae_graph(config, dtype) -> nnx.GraphDef:
    from dit_jax.models.vae import AutoencoderKL

    abstract = nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0), dtype=dtype))
    return nnx.split(abstract)[0]


def use_compilation_cache(directory: str | os.PathLike, min_compile_seconds: float = 0.5) -> None:
    """Keep compiled programs in `directory` (JAX's persistent compilation cache): a later process
    that compiles the same sampler for the same device reads it back instead of compiling.
    Call it before the first compilation of the process."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def init_dit_params(config: DiTConfig, seed: int = 0, dtype=jnp.float32) -> dict:
    """Freshly initialised DiT parameters as a pure dict (random weights for tests and benchmarks)."""
    return nnx.to_pure_dict(nnx.state(DiT(config, rngs=nnx.Rngs(seed), dtype=dtype)))


def cast(weights: Weights, dtype) -> Weights:
    """Floating-point leaves cast to `dtype` (integer leaves untouched)."""

    def one(a):
        return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a

    return dataclasses.replace(
        weights,
        dit=jax.tree.map(one, weights.dit),
        vae=None if weights.vae is None else jax.tree.map(one, weights.vae),
    )


def _string_keys(tree):
    if isinstance(tree, dict):
        return {str(k): _string_keys(v) for k, v in tree.items()}
    return tree


def _restore_keys(tree):
    # nnx.List children have int keys; orbax stores every key as a string.
    if isinstance(tree, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _restore_keys(v) for k, v in tree.items()}
    return tree


def save(weights: Weights, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write a bundle directory atomically: built beside `path`, renamed into place at the end."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass force=True (CLI: --force) to overwrite it")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; a bundle shipped in a package must be readable
    try:
        (staging / "config.json").write_text(json.dumps(weights.config.to_dict(), indent=2) + "\n")
        tree = {"dit": weights.dit} if weights.vae is None else {"dit": weights.dit, "vae": weights.vae}
        tree = jax.tree.map(np.asarray, _string_keys(tree))
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(staging / "params", tree)
        if path.exists():
            shutil.rmtree(path)
        staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def load(path: str | os.PathLike | None = None, *, dtype=jnp.float32) -> Weights:
    """Read a bundle directory (default: the model shipped in the package).

    dtype: floating-point parameters (and so compute) in this dtype: float32 by default,
    `jnp.bfloat16` on accelerators; None keeps what is on disk (the shipped model is stored bf16).
    """
    import orbax.checkpoint as ocp

    path = Path(DEFAULT_WEIGHTS if path is None else path).absolute()
    config_file = path / "config.json"
    if not config_file.is_file():
        hint = ""
        if path == DEFAULT_WEIGHTS.absolute():
            hint = " (the embedded default is missing from this install: reinstall dit-jax)"
        raise FileNotFoundError(
            f"{path} is not a dit-jax weights directory: {config_file.name} not found{hint}. "
            "Make one with `python -m convert.dit SRC OUT`."
        )
    config = BundleConfig.from_dict(json.loads(config_file.read_text()))
    with ocp.StandardCheckpointer() as ckptr:
        tree = _restore_keys(ckptr.restore(path / "params"))
    weights = Weights(dit=tree["dit"], vae=tree.get("vae"), config=config)
    weights = jax.tree.map(jnp.asarray, weights)
    if dtype is not None:
        weights = cast(weights, dtype)
    return weights
