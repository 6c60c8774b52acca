"""The `Weights` bundle: configs (static) and parameter trees (array leaves) of every component.

On disk a bundle is a directory:
    config.json   readable: the family, each component's config, class names, provenance
    params/       an orbax checkpoint of {"dit": ..., "vae": ..., "text_encoder": ...}
    tokenizer/    text families only: the checkpoint's own tokenizer files

Families: "dit" (class-conditional DiT, `dit_jax.models.dit`) and "pixart" (text-conditional
PixArt-alpha/Sigma, `dit_jax.models.pixart`, with a T5 text encoder). The diffusion transformer's
parameters sit under `dit` whatever the family.
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

from dit_jax.devices import auto_dtype
from dit_jax.models.dit import DiT, DiTConfig
from dit_jax.nn.stack import stack_trees

# 2: the diffusion transformer's blocks stacked (`dit/blocks/...` arrays (depth, ...)); 1 stored
# them one tree per block (`dit/blocks/0/...`), which `load` still reads.
FORMAT_VERSION = 2
DEFAULT_WEIGHTS = Path(__file__).parent / "assets" / "fashion-dit"
TOKENIZER_DIR = "tokenizer"


FAMILIES = ("dit", "pixart")


@functools.lru_cache(maxsize=1)
def _family_classes() -> dict[str, tuple[type, type]]:
    """family -> (config class, model class); PixArt imported on first use."""
    from dit_jax.models.pixart import PixArt, PixArtConfig

    return {"dit": (DiTConfig, DiT), "pixart": (PixArtConfig, PixArt)}


def _config_class(family: str) -> type:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; this version knows {', '.join(FAMILIES)}")
    return _family_classes()[family][0]


def family_of(config) -> str:
    """The family of a diffusion-transformer config ("dit" or "pixart")."""
    for family, (config_class, _) in _family_classes().items():
        if isinstance(config, config_class):
            return family
    raise TypeError(f"{type(config).__name__} is not the config of a known family ({', '.join(FAMILIES)})")


def model_class(config):
    """The NNX module class of a diffusion-transformer config (DiT or PixArt)."""
    return _family_classes()[family_of(config)][1]


@dataclasses.dataclass(frozen=True)
class BundleConfig:
    """Everything about a bundle that is not an array. Hashable: it is the static part of `Weights`."""

    dit: Any  # the diffusion transformer's config: DiTConfig, or PixArtConfig (family "pixart")
    vae: Any = None  # dit_jax.models.vae.VAEConfig, or None for pixel-space models
    class_names: tuple[str, ...] | None = None  # None: ImageNet (the prompts module knows its names)
    info_json: str = "{}"  # provenance (converted from, trained with...), as JSON text
    text_encoder: Any = None  # dit_jax.models.t5.T5Config for text families
    tokenizer_dir: str | None = None  # where the tokenizer files are (set by load; text families)

    @property
    def info(self) -> dict:
        return json.loads(self.info_json)

    @property
    def family(self) -> str:
        return family_of(self.dit)

    @property
    def text_conditioned(self) -> bool:
        return self.family != "dit"

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
        """The config.json contents (the tokenizer's place is not stored: it is the bundle's tokenizer/)."""
        d = {
            "format_version": FORMAT_VERSION,
            "family": self.family,
            "dit": self.dit.to_dict(),
            "vae": None if self.vae is None else self.vae.to_dict(),
            "class_names": None if self.class_names is None else list(self.class_names),
            "info": self.info,
        }
        if self.text_encoder is not None:
            d["text_encoder"] = self.text_encoder.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict, tokenizer_dir: str | None = None) -> BundleConfig:
        vae = text_encoder = None
        if d.get("vae") is not None:
            from dit_jax.models.vae import VAEConfig

            vae = VAEConfig.from_dict(d["vae"])
        if d.get("text_encoder") is not None:
            from dit_jax.models.t5 import T5Config

            text_encoder = T5Config.from_dict(d["text_encoder"])
        names = d.get("class_names")
        return cls(
            dit=_config_class(d.get("family", "dit")).from_dict(d["dit"]),
            vae=vae,
            class_names=None if names is None else tuple(names),
            info_json=json.dumps(d.get("info", {}), sort_keys=True),
            text_encoder=text_encoder,
            tokenizer_dir=tokenizer_dir,
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Weights:
    """Parameter trees (pure nested dicts of arrays) with their static config."""

    dit: dict
    vae: dict | None = None
    config: BundleConfig = dataclasses.field(default=None, metadata=dict(static=True))
    text_encoder: dict | None = None

    @property
    def dtype(self):
        return jax.tree.leaves(self.dit)[0].dtype


class _OneKey:
    """Stands in for `nnx.Rngs` where a module is built for its shapes only: every stream
    (`rngs.params()`, `rngs()`, ...) returns the same key, and no counter is updated."""

    def __call__(self) -> jax.Array:
        return jax.random.key(0)

    def __getattr__(self, stream: str):
        if stream.startswith("_"):
            raise AttributeError(stream)
        return self


def abstract_module(cls: type[nnx.Module], config, dtype) -> nnx.Module:
    """`cls(config, rngs=..., dtype=dtype)` with shapes in place of arrays (`nnx.eval_shape`).

    Built with `_OneKey`, not `nnx.Rngs`: inside the trace every `nnx.Rngs` draw updates a traced
    counter, and flax's update asks that tracer for its sharding, which jax answers with an error
    message that walks every op traced so far: the build grew with the draws times the ops
    (PixArt-XL/2 on a 2-core CPU: 7-8 s against 0.7-0.8 s, once per process). The module comes
    out the same: the same graph, parameter shapes and dtypes.
    """
    return nnx.eval_shape(lambda: cls(config, rngs=_OneKey(), dtype=dtype))


@functools.lru_cache(maxsize=None)
def _abstract_split(cls: type[nnx.Module], config, dtype) -> tuple[nnx.GraphDef, dict]:
    """(graph, parameter shapes as a pure dict) of `cls(config)` in `dtype`, once per process."""
    graph, state = nnx.split(abstract_module(cls, config, dtype))
    return graph, nnx.to_pure_dict(state)


def _component_class(component: str, config) -> type[nnx.Module]:
    """The module class of a bundle component ("dit", "vae" or "text_encoder") with that config."""
    if component == "dit":
        return model_class(config)
    if component == "vae":
        from dit_jax.models.vae import AutoencoderKL

        return AutoencoderKL
    from dit_jax.models.t5 import T5Encoder

    return T5Encoder


def _graph(component: str, config, dtype) -> nnx.GraphDef:
    return _abstract_split(_component_class(component, config), config, dtype)[0]


def dit_module(weights: Weights):
    """The diffusion transformer (DiT or PixArt) as an NNX module over `weights.dit` (cheap: no
    parameter is copied)."""
    return nnx.merge(_graph("dit", weights.config.dit, jnp.dtype(weights.dtype)), weights.dit)


def text_encoder_module(weights: Weights):
    """The T5 text encoder as an NNX module over `weights.text_encoder` (text families)."""
    if weights.text_encoder is None:
        raise ValueError("this bundle has no text encoder (a class-conditioned model)")
    dtype = jnp.dtype(jax.tree.leaves(weights.text_encoder)[0].dtype)
    return nnx.merge(_graph("text_encoder", weights.config.text_encoder, dtype), weights.text_encoder)


def vae_module(weights: Weights):
    """The VAE as an NNX module over `weights.vae`."""
    if weights.vae is None:
        raise ValueError("this bundle has no VAE (a pixel-space model)")
    dtype = jnp.dtype(jax.tree.leaves(weights.vae)[0].dtype)
    return nnx.merge(_graph("vae", weights.config.vae, dtype), weights.vae)


def use_compilation_cache(directory: str | os.PathLike, min_compile_seconds: float = 0.5) -> None:
    """Keep compiled programs in `directory` (JAX's persistent compilation cache): a later process
    that compiles the same sampler for the same device reads it back instead of compiling.
    Call it before the first compilation of the process."""
    if Path(directory).exists() and not Path(directory).is_dir():
        raise ValueError(f"compilation cache {directory} is a file; give a folder (made if missing)")
    Path(directory).mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(directory))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def init_dit_params(config: DiTConfig, seed: int = 0, dtype=jnp.float32) -> dict:
    """Freshly initialised DiT parameters as a pure dict (random weights for tests and benchmarks)."""
    return nnx.to_pure_dict(nnx.state(DiT(config, rngs=nnx.Rngs(seed), dtype=dtype)))


def component_dtype(component: str, dtype):
    """The dtype `load` and `cast` give a bundle's component ("dit", "vae" or "text_encoder")
    when `dtype` is asked for: `dtype` itself, except float16, the type of GPUs without bfloat16
    tensor cores (a T4, a V100), where the T5 encoder stays bfloat16 (T5 v1.1 overflows float16's
    range; transformers keeps parts of it in float32 for that) and the VAE float32 (SDXL's VAE
    overflows float16 too, and a VAE is small). None stays None (what is stored)."""
    if dtype is not None and jnp.dtype(dtype) == jnp.float16:
        return {"text_encoder": jnp.bfloat16, "vae": jnp.float32}.get(component, dtype)
    return dtype


def _floating(dtype) -> bool:
    try:
        return bool(jnp.issubdtype(jnp.dtype(dtype), jnp.floating))
    except TypeError:  # not a dtype at all ("bf16")
        return False


def cast(weights: Weights, dtype) -> Weights:
    """Floating-point leaves cast to `dtype` (integer leaves untouched; float16: see `component_dtype`)."""

    def one(component: str, tree):
        if tree is None:
            return None
        to = component_dtype(component, dtype)
        return jax.tree.map(lambda a: a.astype(to) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)

    return dataclasses.replace(weights, dit=one("dit", weights.dit), vae=one("vae", weights.vae),
                               text_encoder=one("text_encoder", weights.text_encoder))


def layout_mismatch(source: str, got: dict[str, tuple], expected: dict[str, tuple], *, found: str = "has") -> str | None:
    """A message naming every missing key, unexpected key and shape mismatch of `got` (key ->
    shape) against `expected` ("key: <found> (shape), expected (shape)"), or None when they agree."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = [
        f"  {k}: {found} {tuple(got[k])}, expected {tuple(expected[k])}"
        for k in sorted(set(got) & set(expected))
        if tuple(got[k]) != tuple(expected[k])
    ]
    if not (missing or unexpected or mismatched):
        return None
    lines = [f"{source} does not match the expected layout:"]
    if missing:
        lines += [f"missing keys ({len(missing)}):", *(f"  {k}" for k in missing)]
    if unexpected:
        lines += [f"unexpected keys ({len(unexpected)}):", *(f"  {k}" for k in unexpected)]
    if mismatched:
        lines += [f"shape mismatches ({len(mismatched)}):", *mismatched]
    return "\n".join(lines)


def _shapes(tree: dict) -> dict[str, tuple]:
    """{"blocks/attn/qkv/kernel": shape, ...} of a parameter tree."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", k)) for k in keys): tuple(leaf.shape) for keys, leaf in leaves}


def check_bundle(weights: Weights, source: str) -> None:
    """Raise a ValueError unless every component's parameters are the ones its config describes
    (every missing or unexpected key by name, every shape mismatch with both shapes)."""
    config = weights.config
    described = {"dit": config.dit, "vae": config.vae, "text_encoder": config.text_encoder}
    problems = []
    for name, component_config in described.items():
        tree = getattr(weights, name)
        if (tree is None) != (component_config is None):
            problems.append(f"config.json {'describes' if tree is None else 'has no'} a {name}, "
                            f"but params/ {'holds none' if tree is None else 'holds one'}")
            continue
        if tree is None:
            continue
        dtype = jnp.dtype(jax.tree.leaves(tree)[0].dtype)
        expected = _abstract_split(_component_class(name, component_config), component_config, dtype)[1]
        message = layout_mismatch(f"its {name} parameters", _shapes(tree), _shapes(expected), found="stored")
        if message:
            problems.append(message)
    if problems:
        raise ValueError(f"{source}: the stored parameters do not fit its config.json (convert the checkpoint "
                         "again):\n" + "\n".join(problems))


def _string_keys(tree):
    if isinstance(tree, dict):
        return {str(k): _string_keys(v) for k, v in tree.items()}
    return tree


def _restore_keys(tree):
    # nnx.List children have int keys; orbax stores every key as a string.
    if isinstance(tree, dict):
        return {(int(k) if isinstance(k, str) and k.isdigit() else k): _restore_keys(v) for k, v in tree.items()}
    return tree


def _array_checkpointer():
    """An orbax checkpointer that writes host arrays as they are: synchronously, without the
    defensive copy of every array its default handler makes, and one tensorstore array per
    parameter instead of one OCDBT database (which holds the data in memory until it commits).
    Measured by hand on the arrays of a PixArt bundle with a one-layer T5 (3.2 GB): orbax's
    default checkpointer added 4.6 GB to the process while saving them, this one 0.2 GB."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint import type_handlers

    registry = type_handlers.create_type_handler_registry(
        (np.ndarray, type_handlers.NumpyHandler(deepcopy_host_arrays=False))
    )
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_ocdbt=False))


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
        tree = {"dit": weights.dit, "vae": weights.vae, "text_encoder": weights.text_encoder}
        tree = jax.tree.map(np.asarray, _string_keys({k: v for k, v in tree.items() if v is not None}))
        if weights.config.tokenizer_dir is not None:
            shutil.copytree(weights.config.tokenizer_dir, staging / TOKENIZER_DIR)
        with _array_checkpointer() as ckptr:
            ckptr.save(staging / "params", args=ocp.args.PyTreeSave(tree))
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
    `jnp.bfloat16` on accelerators, `jnp.float16` on GPUs without bfloat16 tensor cores (T4,
    V100; the T5 encoder then stays bfloat16 and the VAE float32, see `component_dtype`);
    "auto" picks one of those for the device (`dit_jax.devices.auto_dtype`); None keeps what is
    on disk (the shipped model is stored bf16).
    Each array is read, cast to `dtype` and put on the default device (`jax.default_device`
    where one is set, else the first local device) one at a time, so the host never holds the
    whole bundle (a GPU run needs host memory for a few arrays, not for the model).
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
    tokenizer = path / TOKENIZER_DIR
    try:
        stored_config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON ({e}): convert the checkpoint again") from e
    if not isinstance(stored_config, dict):
        raise ValueError(f"{config_file} holds a {type(stored_config).__name__}, not a bundle config (a JSON object)")
    version = stored_config.get("format_version", 1)
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} is a format-{version} bundle, newer than this dit-jax reads "
                         f"(format {FORMAT_VERSION}): upgrade dit-jax")
    try:
        config = BundleConfig.from_dict(stored_config, tokenizer_dir=str(tokenizer) if tokenizer.is_dir() else None)
    except KeyError as e:
        raise ValueError(f"{config_file} has no {e.args[0]!r} entry: convert the checkpoint again") from e
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_file} is not a valid bundle config: {e}") from e
    if config.text_encoder is not None and config.tokenizer_dir is None:
        raise FileNotFoundError(f"{path} has a text encoder but no {TOKENIZER_DIR}/ folder: convert it again")
    default = jax.config.jax_default_device  # a Device, a platform name or None
    device = default if isinstance(default, jax.Device) else jax.local_devices(backend=default)[0]
    if isinstance(dtype, str) and dtype == "auto":
        dtype = auto_dtype(device)
    elif dtype is not None and not _floating(dtype):
        raise ValueError(f"dtype {dtype!r} is not a floating-point dtype: use jnp.float32, jnp.bfloat16, "
                         "jnp.float16, \"auto\" or None (what is stored)")
    device = jax.sharding.SingleDeviceSharding(device)

    def target(path, meta):  # what to read each stored array into
        to = component_dtype(path[0].key, dtype)
        floating = to is not None and jnp.issubdtype(meta.dtype, jnp.floating)
        return jax.ShapeDtypeStruct(meta.shape, to if floating else meta.dtype, sharding=device)

    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        stored = ckptr.metadata(path / "params").item_metadata
        tree = _restore_keys(ckptr.restore(path / "params", jax.tree_util.tree_map_with_path(target, stored)))
    if version == 1:  # blocks stored one tree each: stacked here (re-save the bundle to skip this)
        tree["dit"]["blocks"] = stack_trees(tree["dit"].pop("blocks"))
    weights = Weights(dit=tree["dit"], vae=tree.get("vae"), config=config, text_encoder=tree.get("text_encoder"))
    check_bundle(weights, str(path))
    return weights
