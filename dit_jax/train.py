"""Train a small class-conditional DiT in pixel space on Fashion-MNIST (how the embedded default is made).

    python -m dit_jax.train --out out/fashion-dit --time-limit 300 --export-dtype bfloat16
    python -m dit_jax.train --out out/fashion-pixart --family pixart --patch-size 4 --hidden-size 128 --depth 6

`--family pixart` trains a text-conditioned PixArt on the same images instead, captioned from
their class ("a photo of a sneaker", four templates: `dit_jax.data.CAPTION_TEMPLATES`). Its text
encoder is a tiny T5 with random weights that stays frozen (the transformer learns to read its
features), with a word-level tokenizer over the captions' words; the caption of a dropped label
is the empty prompt, whose features are what guidance samples against. A toy text-to-image model
to measure prompt-side SDTM options on (`SDTMConfig(prompt_weight=...)`), which no downloadable
checkpoint allows here.

DiT's recipe, scaled down: epsilon-prediction MSE on DiT's linear-beta 1000-step chain, uniform
timesteps, labels dropped to the null class for classifier-free guidance, AdamW with gradient
clipping, an EMA of the weights that becomes the shipped model. With a learned sigma (the default,
as in DiT) IDDPM's variational bound trains the variance channels, with the mean frozen.

Everything one step needs happens in one compiled program: the whole data set sits on the device
and each step draws its own batch, timesteps, noise and label dropout from a key folded with the
step number (so a resumed run draws exactly what an uninterrupted one would have).

Outputs under --out:
    train_config.json   the arguments of the run (checked on --resume)
    train_state/        orbax checkpoints of params, EMA, optimizer state, step
    final/              the EMA weights as a dit-jax bundle (`dit_jax.load(OUT / "final")`)
"""

from __future__ import annotations

import time

_PROCESS_START = time.monotonic()  # --time-limit counts from here (python -m: after jax is imported)

import argparse
import dataclasses
import datetime
import functools
import json
import math
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dit_jax.data import CAPTION_TEMPLATES, CLASS_NAMES, caption, load_fashion_mnist
from dit_jax.diffusion.losses import DiffusionTables, diffusion_loss
from dit_jax.diffusion.schedule import linear_betas
from dit_jax.models.dit import DiTConfig
from dit_jax.models.pixart import PixArtConfig
from dit_jax.models.t5 import T5Config, T5Encoder
from dit_jax.nn.stack import layer_of, stack_trees
from dit_jax.weights import BundleConfig, Weights, abstract_module, cast, model_class, save

NUM_TRAIN_TIMESTEPS = 1000
IMAGE_SIZE = 32  # Fashion-MNIST padded to 32x32 by dit_jax.data
DATASET_NAME = "Fashion-MNIST train (60,000)"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_LOSS_SMOOTHING = 0.99  # EMA factor of the logged loss
FAMILIES = ("dit", "pixart")
# --family pixart: the frozen random caption encoder (a tiny T5 v1.1; its vocabulary is the
# captions' words) and the caption length the model reads.
CAPTION_ENCODER = {"d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_heads": 4,
                   "relative_attention_num_buckets": 8, "relative_attention_max_distance": 16}
MAX_TEXT_LENGTH = 16
_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as T5's


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every option of a run; the CLI flags have the same names (`--batch-size` for batch_size)."""

    out: str
    family: str = "dit"  # "dit": class-conditional DiT; "pixart": text-conditioned PixArt (captions)
    steps: int = 100_000  # total steps (a resumed run counts the steps already done)
    batch_size: int = 128
    lr: float = 3e-4
    warmup: int = 1000  # linear warm-up steps from 0 to lr
    lr_schedule: str = "constant"  # "constant" (as DiT) or "cosine" (to 0.1 lr at --steps)
    weight_decay: float = 0.0  # DiT trains with none
    grad_clip: float = 1.0
    ema_decay: float = 0.9999  # ceiling; warmed up as min(decay, (1 + step) / (10 + step))
    hidden_size: int = 256
    depth: int = 8
    num_heads: int = 4
    patch_size: int = 2
    learn_sigma: bool = True
    class_dropout: float = 0.1
    seed: int = 0
    log_every: int = 100
    ckpt_every: int = 2000
    dtype: str = "float32"  # compute dtype; parameters and optimizer state stay float32
    export_dtype: str = "float32"  # dtype of the params in the final bundle
    limit: int | None = None  # train on the first N images only
    resume: bool = False
    time_limit: float | None = None  # seconds of wall time for the whole run, final save included
    time_reserve: float = 20.0  # seconds kept back from --time-limit for the final saves
    data_root: str | None = None  # folder of the idx files (default: $DIT_JAX_DATA, then the Debian package's)

    def validate(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        for name in ("steps", "batch_size", "log_every", "ckpt_every", "hidden_size", "depth", "num_heads", "patch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if not 0.0 <= self.class_dropout < 1.0:
            raise ValueError(f"class_dropout must be in [0, 1), got {self.class_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        for name in ("dtype", "export_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name} must be one of {sorted(_DTYPES)}, got {getattr(self, name)!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1 images, got {self.limit}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"time_limit must be > 0 seconds, got {self.time_limit}")
        if not self.time_reserve >= 0:
            raise ValueError(f"time_reserve must be >= 0 seconds, got {self.time_reserve}")
        self.dit_config().validate()  # sizes the model cannot take (hidden not divisible by heads, ...)

    def dit_config(self) -> DiTConfig | PixArtConfig:
        """The model this run trains: 32x32 single-channel pixels; a DiT with 10 classes (+ the
        null class), or a PixArt reading MAX_TEXT_LENGTH caption tokens."""
        if self.family == "pixart":
            return PixArtConfig(
                input_size=IMAGE_SIZE,
                patch_size=self.patch_size,
                in_channels=1,
                out_channels=2 if self.learn_sigma else 1,
                hidden_size=self.hidden_size,
                depth=self.depth,
                num_heads=self.num_heads,
                caption_channels=CAPTION_ENCODER["d_model"],
                interpolation_scale=1.0,
                max_text_length=MAX_TEXT_LENGTH,
            )
        return DiTConfig(
            input_size=IMAGE_SIZE,
            patch_size=self.patch_size,
            in_channels=1,
            hidden_size=self.hidden_size,
            depth=self.depth,
            num_heads=self.num_heads,
            class_dropout_prob=self.class_dropout,
            num_classes=len(CLASS_NAMES),
            learn_sigma=self.learn_sigma,
        )


# ---------------------------------------------------------------------------------------------
# Parameters: DiT's initialisation over nested dicts with string keys (orbax- and optax-friendly)


def _dit_style_init(path: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """DiT's initialize_weights for one float32 parameter, by its path ("blocks/attn/qkv/kernel";
    a block parameter's shape is one block's, see `init_params`).

    Xavier-uniform linears with zero biases; the patch embedding xavier-uniform as a flattened
    (in*p*p -> hidden) linear; label table and timestep MLP weights N(0, 0.02); every adaLN
    modulation and the final linear zero (adaLN-Zero: each block starts as the identity and
    the network's first output is 0).
    """
    parts = path.split("/")
    if "adaLN_modulation" in parts or parts[:2] == ["final_layer", "linear"] or parts[-1] == "bias":
        return np.zeros(shape, np.float32)
    if parts[0] == "y_embedder" or (parts[0] == "t_embedder" and parts[-1] == "kernel"):
        return rng.normal(0.0, 0.02, shape).astype(np.float32)
    if parts[-1] == "kernel":
        return _xavier_uniform(shape, rng)
    raise ValueError(f"no DiT initialisation rule for parameter {path!r}")


def _pixart_style_init(path: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """PixArt's initialize_weights for one float32 parameter, by its path.

    As DiT's (xavier-uniform linears and patch embedding, zero biases, the timestep MLP N(0, 0.02),
    the final linear zero), plus: t_block and the caption projection N(0, 0.02), every block's
    cross-attention output projection zero (each block starts without its text branch), and the
    scale-shift tables N(0, 1) / sqrt(hidden).
    """
    parts = path.split("/")
    if parts[-1] == "scale_shift_table":
        return (rng.standard_normal(shape) / math.sqrt(shape[-1])).astype(np.float32)
    if parts[-1] == "bias" or parts[:2] == ["final_layer", "linear"] or parts[-3:-1] == ["cross_attn", "proj"]:
        return np.zeros(shape, np.float32)
    if parts[0] in ("t_embedder", "t_block", "y_embedder") and parts[-1] == "kernel":
        return rng.normal(0.0, 0.02, shape).astype(np.float32)
    if parts[-1] == "kernel":
        return _xavier_uniform(shape, rng)
    raise ValueError(f"no PixArt initialisation rule for parameter {path!r}")


def _xavier_uniform(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    fan_in, fan_out = int(np.prod(shape[:-1])), shape[-1]  # conv kernels: (p, p, C_in, D)
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return rng.uniform(-bound, bound, shape).astype(np.float32)


def _map_with_path(fn: Callable[[str, Any], Any], tree: dict, prefix: str = "") -> dict:
    return {
        k: _map_with_path(fn, v, f"{prefix}{k}/") if isinstance(v, dict) else fn(f"{prefix}{k}", v)
        for k, v in tree.items()
    }


def init_params(config: DiTConfig | PixArtConfig, seed: int = 0) -> tuple[dict, dict]:
    """float32 (params, buffers) initialised as DiT (or PixArt) does, nested dicts with string keys.

    params are the trained nnx.Param leaves; buffers the rest (DiT's fixed pos_embed).
    """
    cls = model_class(config)
    rule = _pixart_style_init if isinstance(config, PixArtConfig) else _dit_style_init

    def make_split():
        _, params, buffers = nnx.split(cls(config, rngs=nnx.Rngs(0), dtype=jnp.float32), nnx.Param, ...)
        return nnx.to_pure_dict(params), nnx.to_pure_dict(buffers)

    # Only shapes are needed from the module's own initialisers: building it eagerly would
    # compile one small program per parameter shape (seconds on CPU).
    param_shapes = jax.eval_shape(lambda: make_split()[0])
    buffers = jax.jit(lambda: make_split()[1])()  # constants; the random parameters are dead code
    rng = np.random.default_rng(seed)

    def init(path, a):  # the blocks are stored stacked (depth, ...): each block initialised as one layer
        if path.startswith("blocks/"):
            return jnp.asarray(np.stack([rule(path, a.shape[1:], rng) for _ in range(a.shape[0])]))
        return jnp.asarray(rule(path, a.shape, rng))

    params = _map_with_path(init, param_shapes)
    return params, buffers


@functools.lru_cache(maxsize=None)
def _graphdef(config: DiTConfig | PixArtConfig, dtype) -> nnx.GraphDef:
    return nnx.split(abstract_module(model_class(config), config, dtype), nnx.Param, ...)[0]


def build_module(config: DiTConfig | PixArtConfig, params: dict, buffers: dict, dtype=jnp.float32) -> nnx.Module:
    """The DiT (or PixArt) over `params` and `buffers` (string-keyed), computing in `dtype` (leaves are cast).
    params are in the model's layout (`init_params`; a train state's: `blocks_stacked` first)."""
    if "0" in params.get("blocks", {}):
        raise ValueError(
            "these params hold their blocks one tree per layer, as a train state does: pass "
            "blocks_stacked(params) to build_module"
        )

    def to(a):
        return a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a

    return nnx.merge(
        _graphdef(config, dtype), jax.tree.map(to, params), jax.tree.map(to, buffers)
    )


def blocks_per_layer(params: dict) -> dict:
    """Model params (blocks stacked, leaves (depth, ...)) -> the train state's layout: the same
    with "blocks" one tree per layer, {"0": tree, "1": tree, ...}.

    Why the train state keeps its blocks apart: the step runs them unrolled (a scanned step
    compiled slower and ran slower), and an unrolled step over the stacked leaves reads each
    block's parameters as slices that XLA fuses into that block's own kernels, one kernel per
    block instead of one per kind: for the default config 461 distinct fusions and a 9.4-10.2 s
    compile against 255 and 6.8-7.7 s, at the same step time (docs/benchmarks.md)."""
    depth = jax.tree.leaves(params["blocks"])[0].shape[0]
    return {**params, "blocks": {str(i): layer_of(params["blocks"], i) for i in range(depth)}}


def blocks_stacked(params: dict) -> dict:
    """The train state's params (`blocks_per_layer`) -> the model's (blocks stacked). Inside the
    compiled step this stacking and the model's reading of each block cancel out (XLA forwards a
    slice of a concatenation to the concatenated array), so no copy is made."""
    return {**params, "blocks": stack_trees(dict(params["blocks"]))}


def count_params(params: dict) -> int:
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))


# ---------------------------------------------------------------------------------------------
# Optimiser, train state and the compiled step


def learning_rate(cfg: TrainConfig) -> optax.Schedule:
    """Linear warm-up from 0, then constant (DiT) or cosine down to 0.1 lr at --steps."""
    if cfg.lr_schedule == "cosine":
        after = optax.cosine_decay_schedule(cfg.lr, max(cfg.steps - cfg.warmup, 1), alpha=0.1)
    else:
        after = optax.constant_schedule(cfg.lr)
    if cfg.warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup), after], [cfg.warmup])


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adamw(learning_rate(cfg), b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay),
    )


def ema_decay_at(step: jax.Array, ceiling: float) -> jax.Array:
    """EMA decay at `step`: the (1+s)/(10+s) warm-up capped at `ceiling`.

    A fixed 0.9999 would keep e^-2 of the random initial weights after 20k steps; the warm-up
    averages over roughly the last tenth of the run instead, until the run is long enough.
    """
    s = step.astype(jnp.float32)
    return jnp.minimum(ceiling, (1.0 + s) / (10.0 + s))


# ---------------------------------------------------------------------------------------------
# --family pixart: captions, their tokenizer and the frozen caption encoder


@dataclasses.dataclass(frozen=True)
class Captions:
    """The text side of a text-conditioned run: every caption's features, computed once.

    Row label * len(CAPTION_TEMPLATES) + template of `text` and `mask` is that caption's; the
    last row (`null_row`) is the empty caption's.
    """

    tokenizer_dir: Path  # holds tokenizer.json (copied into the bundle)
    encoder_config: T5Config
    encoder_params: dict  # the frozen T5's state (float32), as a bundle stores it
    text: np.ndarray  # (classes * templates + 1, MAX_TEXT_LENGTH, d_model) float32 T5 features
    mask: np.ndarray  # (classes * templates + 1, MAX_TEXT_LENGTH) int32

    @property
    def null_row(self) -> int:
        return self.text.shape[0] - 1


def write_caption_tokenizer(folder: Path) -> int:
    """A T5-style word-level tokenizer over the captions' words (<pad> 0, </s> 1, <unk> 2; lower-cased;
    </s> appended), written as folder/tokenizer.json (what `dit_jax.tokenizer.Tokenizer` reads).
    Returns its vocabulary size."""
    try:
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    except ImportError as e:
        raise ImportError("--family pixart builds a tokenizer with the `tokenizers` package: "
                          "pip install 'dit-jax[text]'") from e
    split = pre_tokenizers.Whitespace()
    words = sorted({
        piece for label in range(len(CLASS_NAMES)) for template in range(len(CAPTION_TEMPLATES))
        for piece, _ in split.pre_tokenize_str(caption(label, template).lower())
    })
    vocab = {token: i for i, token in enumerate([*_SPECIAL_TOKENS, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = split
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return len(vocab)


def make_captions(folder: Path, seed: int) -> Captions:
    """Write the caption tokenizer to `folder`, draw the frozen T5 from `seed` (the same seed gives
    the same encoder, so a resumed run reads the same features) and encode every caption."""
    from dit_jax.tokenizer import Tokenizer

    encoder_config = T5Config(vocab_size=write_caption_tokenizer(folder), **CAPTION_ENCODER)
    tokenizer = Tokenizer.from_dir(folder)
    encoder = T5Encoder(encoder_config, rngs=nnx.Rngs(seed), dtype=jnp.float32)
    texts = [caption(label, template) for label in range(len(CLASS_NAMES)) for template in range(len(CAPTION_TEMPLATES))]
    input_ids, mask = tokenizer([*texts, ""], max_length=MAX_TEXT_LENGTH)
    features = jax.jit(lambda e, i, m: e(i, m))(encoder, jnp.asarray(input_ids), jnp.asarray(mask))
    return Captions(
        tokenizer_dir=folder, encoder_config=encoder_config,
        encoder_params=jax.device_get(nnx.to_pure_dict(nnx.state(encoder))),
        text=np.asarray(features, np.float32), mask=mask,
    )


def init_train_state(cfg: TrainConfig) -> tuple[dict, dict]:
    """(state, buffers): state = params, ema, opt_state, step, loss_ema, grad_norm (what is
    checkpointed); params and ema hold their blocks one tree per layer (`blocks_per_layer`)."""
    params, buffers = init_params(cfg.dit_config(), cfg.seed)
    params = jax.jit(blocks_per_layer)(params)
    state = {
        "params": params,
        "ema": jax.tree.map(jnp.copy, params),
        "opt_state": jax.jit(optimizer(cfg).init)(params),  # one program, not one per leaf
        "step": jnp.zeros((), jnp.int32),
        "loss_ema": jnp.full((), jnp.nan, jnp.float32),  # nan until the first step sets it
        "grad_norm": jnp.zeros((), jnp.float32),
    }
    return state, buffers


def make_train_step(
    cfg: TrainConfig, buffers: dict, captions: Captions | None = None
) -> Callable[[dict, jax.Array, jax.Array], dict]:
    """The pure train step `(state, images uint8 (N,H,W,C), labels (N,)) -> state` (not yet jitted).

    The batch, timesteps, noise and label dropout all come from fold_in(key(seed), step).
    captions (--family pixart): each image is conditioned on its class's caption in a random
    template, or on the empty caption where its label is dropped.
    """
    dit_cfg = cfg.dit_config()
    compute_dtype = _DTYPES[cfg.dtype]
    tables = DiffusionTables.from_betas(linear_betas(NUM_TRAIN_TIMESTEPS))
    tx = optimizer(cfg)
    base_key = jax.random.key(cfg.seed)
    if captions is not None:  # constants of the compiled step
        text_table, mask_table = jnp.asarray(captions.text), jnp.asarray(captions.mask)

    def loss_of(params, x0, t, cond, noise):
        return diffusion_loss(
            build_module(dit_cfg, blocks_stacked(params), buffers, compute_dtype), tables, x0, t, cond, noise
        )

    def train_step(state: dict, images: jax.Array, labels: jax.Array) -> dict:
        step = state["step"]
        key_index, key_t, key_noise, key_drop = jax.random.split(jax.random.fold_in(base_key, step), 4)
        index = jax.random.randint(key_index, (cfg.batch_size,), 0, images.shape[0])
        x0 = images[index].astype(jnp.float32) / 127.5 - 1.0  # (B, H, W, C) in [-1, 1]
        y = labels[index]
        if captions is None:
            if dit_cfg.class_dropout_prob > 0:
                dropped = jax.random.bernoulli(key_drop, dit_cfg.class_dropout_prob, (cfg.batch_size,))
                y = jnp.where(dropped, dit_cfg.null_class, y)
            cond = y
        else:
            key_drop, key_template = jax.random.split(key_drop)
            templates = len(CAPTION_TEMPLATES)
            row = y * templates + jax.random.randint(key_template, (cfg.batch_size,), 0, templates)
            if cfg.class_dropout > 0:
                row = jnp.where(jax.random.bernoulli(key_drop, cfg.class_dropout, (cfg.batch_size,)), captions.null_row, row)
            cond = {"text": text_table[row], "text_mask": mask_table[row]}
        t = jax.random.randint(key_t, (cfg.batch_size,), 0, tables.num_timesteps)
        noise = jax.random.normal(key_noise, x0.shape, jnp.float32)
        (loss, _), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"], x0, t, cond, noise)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        keep = ema_decay_at(step, cfg.ema_decay)
        ema = jax.tree.map(lambda e, p: keep * e + (1.0 - keep) * p, state["ema"], params)
        loss_ema = jnp.where(
            jnp.isnan(state["loss_ema"]), loss, _LOSS_SMOOTHING * state["loss_ema"] + (1 - _LOSS_SMOOTHING) * loss
        )
        return {
            "params": params,
            "ema": ema,
            "opt_state": opt_state,
            "step": step + 1,
            "loss_ema": loss_ema,
            "grad_norm": optax.global_norm(grads),
        }

    return train_step


# ---------------------------------------------------------------------------------------------
# The run: data on device, checkpoints, logging, time limit, final bundle


@dataclasses.dataclass
class TrainResult:
    step: int
    loss: float  # the smoothed loss at the end
    wall_s: float
    compile_s: float
    steps_per_s: float  # over the steps this process ran, compile excluded
    state: dict  # the final train state (host arrays)
    bundle_path: Path
    stopped_by: str  # "steps", "time_limit" or "signal"


# Compiled train steps of this process, by everything the program depends on (a resumed run in
# the same process, as in the tests, does not compile again).
_COMPILED_STEPS: dict[tuple, Any] = {}


def _step_defining(cfg: TrainConfig) -> TrainConfig:
    """cfg with the fields the compiled step does not depend on set to fixed values."""
    return dataclasses.replace(
        cfg, out="", resume=False, log_every=1, ckpt_every=1, time_limit=None, time_reserve=0.0,
        limit=None, data_root=None, export_dtype="float32",
        steps=cfg.steps if cfg.lr_schedule == "cosine" else 1,  # only the cosine schedule reads it
    )


class _StopFlag:
    """Set by SIGTERM so the loop ends at a step boundary and still writes the final bundle."""

    def __init__(self) -> None:
        self.reason: str | None = None

    def __call__(self, signum, frame) -> None:
        self.reason = "signal"


def _check_resume_config(out: Path, cfg: TrainConfig) -> None:
    saved_file = out / "train_config.json"
    if not saved_file.is_file():
        return
    saved = json.loads(saved_file.read_text()).get("dit")
    if saved is not None and saved != cfg.dit_config().to_dict():
        raise ValueError(
            f"--resume: the checkpoints in {out} are of another model ({saved}); this run asks for "
            f"{cfg.dit_config().to_dict()}. Use the same model flags or another --out."
        )


def _holds_blocks(tree: Any) -> bool:
    return isinstance(tree, dict) and "blocks" in tree


def _map_params(fn: Callable[[dict], dict], state: Any) -> Any:
    """fn applied to every params-shaped dict of a train state (params, EMA, optimiser moments)."""
    return jax.tree.map(lambda x: fn(x) if _holds_blocks(x) else x, state, is_leaf=_holds_blocks)


def _restore_train_state(manager, step: int, like: dict) -> dict:
    """The train state checkpointed at `step`, restored into the structure of `like` (a fresh
    state). States written with the blocks stacked (commits 973d673 to 0e0e71e) restore too:
    their params, EMA and optimiser moments are read stacked and then split per layer."""
    import orbax.checkpoint as ocp

    target = jax.device_get(like)
    try:
        restored = manager.restore(step, args=ocp.args.StandardRestore(target))
    except ValueError as error:
        stacked = _map_params(blocks_stacked, target)
        try:
            restored = manager.restore(step, args=ocp.args.StandardRestore(stacked))
        except ValueError:
            raise error from None
        restored = jax.jit(functools.partial(_map_params, blocks_per_layer))(restored)
    return jax.tree.map(jnp.asarray, restored)


def _bundle_info(
    cfg: TrainConfig, step: int, loss: float, wall_s: float, num_images: int, dataset_name: str | None = None
) -> dict:
    if dataset_name is None:
        dataset_name = DATASET_NAME if num_images == 60_000 else f"Fashion-MNIST train (first {num_images:,})"
    return {
        "trained_with": "python -m dit_jax.train",
        "train_config": dataclasses.asdict(cfg),
        "steps": step,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "final_loss": loss if math.isfinite(loss) else None,  # nan: no step was run
        "wall_time_s": round(wall_s, 1),
        "hardware": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "pixel_space": True,
        "dataset": dataset_name,
        "ema": True,
    }


def export_bundle(
    cfg: TrainConfig, state: dict, buffers: dict, path: Path, info: dict, captions: Captions | None = None
) -> Path:
    """Write the EMA weights as a dit-jax bundle (class names = Fashion-MNIST's; a text model's
    bundle also holds its caption encoder and tokenizer)."""
    dit_cfg = cfg.dit_config()
    module = build_module(dit_cfg, blocks_stacked(state["ema"]), buffers, jnp.float32)
    weights = Weights(
        dit=nnx.to_pure_dict(nnx.state(module)),
        vae=None,
        config=BundleConfig(
            dit=dit_cfg, vae=None, class_names=CLASS_NAMES, info_json=json.dumps(info, sort_keys=True),
            text_encoder=None if captions is None else captions.encoder_config,
            tokenizer_dir=None if captions is None else str(captions.tokenizer_dir),
        ),
        text_encoder=None if captions is None else captions.encoder_params,
    )
    if cfg.export_dtype != "float32":
        weights = cast(weights, _DTYPES[cfg.export_dtype])
    return save(weights, path, force=True)


def train(
    cfg: TrainConfig,
    *,
    dataset: tuple[np.ndarray, np.ndarray] | None = None,
    start_time: float | None = None,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
) -> TrainResult:
    """Run (or resume) a training run as `cfg` says; returns the final state and where the bundle went.

    dataset: (images uint8 (N, 32, 32, 1), labels int (N,)) instead of Fashion-MNIST from disk.
    start_time: time.monotonic() the --time-limit counts from (default: now).
    """
    import orbax.checkpoint as ocp

    cfg.validate()
    t_start = time.monotonic() if start_time is None else start_time
    out = Path(cfg.out).absolute()
    images, labels = load_fashion_mnist("train", cfg.data_root) if dataset is None else dataset  # before any folder
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {cfg.out} is a file; give a run folder")
    out.mkdir(parents=True, exist_ok=True)

    if cfg.limit is not None:
        images, labels = images[: cfg.limit], labels[: cfg.limit]
    images_on_device = jax.device_put(jnp.asarray(images, jnp.uint8))
    labels_on_device = jax.device_put(jnp.asarray(labels, jnp.int32))

    state, buffers = init_train_state(cfg)
    captions = make_captions(out / "tokenizer", cfg.seed) if cfg.family == "pixart" else None
    manager = ocp.CheckpointManager(out / "train_state", options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))
    latest = manager.latest_step()
    if latest is not None and not cfg.resume:
        manager.close()
        raise ValueError(
            f"{out / 'train_state'} already holds checkpoints (latest step {latest}): pass --resume to "
            "continue that run, or choose another --out."
        )
    if cfg.resume:
        _check_resume_config(out, cfg)
    if latest is not None:
        state = _restore_train_state(manager, latest, state)
        log(f"resumed from {out / 'train_state'} at step {int(state['step'])}")
    elif cfg.resume:
        log(f"--resume: no checkpoint in {out / 'train_state'} yet, starting from step 0")
    (out / "train_config.json").write_text(
        json.dumps({"train": dataclasses.asdict(cfg), "dit": cfg.dit_config().to_dict()}, indent=2) + "\n"
    )

    step = int(state["step"])
    log(
        f"{cfg.dit_config().family_name} {cfg.hidden_size}x{cfg.depth} (heads {cfg.num_heads}, patch {cfg.patch_size}, "
        f"learn_sigma {cfg.learn_sigma}): {count_params(state['params']):,} params; "
        f"{images.shape[0]:,} images; batch {cfg.batch_size}; {cfg.dtype} on {jax.devices()[0].device_kind}"
    )

    def out_of_time() -> bool:
        # The reserve pays for the final checkpoint and bundle, and for the steps still queued on
        # the device (the host runs ahead of it by at most --log-every steps).
        return cfg.time_limit is not None and time.monotonic() - t_start + cfg.time_reserve > cfg.time_limit

    stop = _StopFlag()
    # From here on SIGTERM ends the run cleanly (signal handlers can only be set on the main thread).
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, stop) if on_main_thread else None
    compiled_step, compile_s = None, 0.0
    first_step, last_saved = step, (latest if latest is not None else -1)
    stopped_by = "steps"
    try:
        if step < cfg.steps and not out_of_time():
            cache_key = (_step_defining(cfg), images_on_device.shape, labels_on_device.shape)
            compiled_step = _COMPILED_STEPS.get(cache_key)
            if compiled_step is None:
                t_compile = time.monotonic()
                compiled_step = (
                    jax.jit(make_train_step(cfg, buffers, captions), donate_argnums=0)
                    .lower(state, images_on_device, labels_on_device)
                    .compile()
                )
                compile_s = time.monotonic() - t_compile
                _COMPILED_STEPS.clear()  # keep one: a process rarely trains two configs
                _COMPILED_STEPS[cache_key] = compiled_step
                log(f"compiled the train step in {compile_s:.1f} s")
            else:
                log("reusing the train step compiled earlier in this process")
        t_loop = t_interval = time.monotonic()
        interval_start_step = step
        while step < cfg.steps:
            if stop.reason is not None:
                stopped_by = stop.reason
                break
            if compiled_step is None or out_of_time():
                stopped_by = "time_limit"
                break
            state = compiled_step(state, images_on_device, labels_on_device)
            step += 1
            if step % cfg.log_every == 0 or step == cfg.steps:
                loss = float(state["loss_ema"])  # waits for the device: the timing below is real
                now = time.monotonic()
                rate = (step - interval_start_step) / max(now - t_interval, 1e-9)
                log(
                    f"step {step:>7d}/{cfg.steps}  loss {loss:.4f}  grad_norm {float(state['grad_norm']):.3f}  "
                    f"{rate:7.2f} steps/s  {rate * cfg.batch_size:9.0f} img/s  elapsed {now - t_start:7.1f} s"
                )
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at step {step}: lower --lr or use --dtype float32")
                t_interval, interval_start_step = now, step
            if step % cfg.ckpt_every == 0:
                manager.save(step, args=ocp.args.StandardSave(jax.device_get(state)))
                last_saved = step
    except KeyboardInterrupt:
        stopped_by = "signal"
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)

    host_state = jax.device_get(state)  # also waits for the last step
    loop_s = time.monotonic() - t_loop if compiled_step is not None else 0.0
    steps_per_s = (step - first_step) / loop_s if step > first_step and loop_s > 0 else 0.0
    if step != last_saved:
        manager.save(step, args=ocp.args.StandardSave(host_state), force=True)
    manager.wait_until_finished()
    manager.close()

    loss = float(host_state["loss_ema"])
    wall_s = time.monotonic() - t_start
    dataset_name = None if dataset is None else f"arrays given to train() ({images.shape[0]:,} images)"
    info = _bundle_info(cfg, step, loss, wall_s, images.shape[0], dataset_name)
    info["compile_s"] = round(compile_s, 1)
    info["steps_per_s"] = round(steps_per_s, 2)
    if captions is not None:
        info["captions"] = {"templates": list(CAPTION_TEMPLATES), "dropped": "the empty caption",
                            "text_encoder": f"random T5 (nnx.Rngs({cfg.seed})), frozen"}
    bundle = export_bundle(cfg, host_state, buffers, out / "final", info, captions)
    log(
        f"stopped at step {step} ({stopped_by}); loss {loss:.4f}; {steps_per_s:.2f} steps/s "
        f"({steps_per_s * cfg.batch_size:.0f} img/s) after {compile_s:.1f} s compile; "
        f"wall {time.monotonic() - t_start:.1f} s; EMA weights ({cfg.export_dtype}) in {bundle}"
    )
    return TrainResult(
        step=step, loss=loss, wall_s=wall_s, compile_s=compile_s, steps_per_s=steps_per_s,
        state=host_state, bundle_path=bundle, stopped_by=stopped_by,
    )


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Command-line flags -> TrainConfig (defaults from TrainConfig)."""
    d = TrainConfig(out="")
    p = argparse.ArgumentParser(prog="python -m dit_jax.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="run folder: train_state/ checkpoints and the final/ bundle")
    p.add_argument("--family", choices=FAMILIES, default=d.family,
                   help="dit: class-conditional DiT (default); pixart: text-conditioned PixArt on class captions")
    p.add_argument("--steps", type=int, default=d.steps, help="total train steps")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear lr warm-up steps")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default=d.lr_schedule)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay, help="ceiling of the warmed-up EMA decay")
    p.add_argument("--hidden-size", type=int, default=d.hidden_size)
    p.add_argument("--depth", type=int, default=d.depth)
    p.add_argument("--num-heads", type=int, default=d.num_heads)
    p.add_argument("--patch-size", type=int, default=d.patch_size)
    p.add_argument("--learn-sigma", action=argparse.BooleanOptionalAction, default=d.learn_sigma,
                   help="predict the variance too (DiT's hybrid loss); --no-learn-sigma: eps only")
    p.add_argument("--class-dropout", type=float, default=d.class_dropout, help="null-label prob. (guidance)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=d.dtype, help="compute dtype (params stay float32)")
    p.add_argument("--export-dtype", choices=sorted(_DTYPES), default=d.export_dtype, help="dtype of the bundle")
    p.add_argument("--limit", type=int, default=d.limit, help="train on the first N images only")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--time-limit", type=float, default=d.time_limit,
                   help="seconds for the whole run (from process start), final saves included")
    p.add_argument("--time-reserve", type=float, default=d.time_reserve,
                   help="seconds of --time-limit kept for the final checkpoint and bundle")
    p.add_argument("--data-root", default=d.data_root, help="folder of the Fashion-MNIST idx files")
    args = p.parse_args(argv)
    return TrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)})


def main(argv: Sequence[str] | None = None) -> TrainResult:
    return train(parse_args(argv), start_time=_PROCESS_START)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, FileNotFoundError) as e:  # bad flags or data: one line, as the other commands print
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
