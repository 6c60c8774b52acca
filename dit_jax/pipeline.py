"""sample(): prompts -> conditioning, noise, the compiled phase loop with guidance, VAE decode.

The whole denoising loop is one jitted function. Token merging enters as a static tuple of
phases (`sdtm.schedule`): each phase is a `lax.scan` over its steps with its own static merge
counts, and the merge state (frequency counters) travels in the scan carry. Prompts, seed and
guidance scale are traced values: changing them never recompiles.

Two families share the loop: class-conditional DiT (conditioning: class ids) and text-conditional
PixArt (conditioning: T5 embeddings of the prompt with its mask, computed once before the loop,
and the empty prompt's for guidance). Each family has its own defaults (sampler, steps, guidance,
timestep spacing): see `FAMILY_DEFAULTS`.

Data parallelism: when the batch divides over the devices, the images are split over them along
a mesh axis named "data" (weights replicated) and jit partitions the loop; every random draw is
made for the whole batch, so the result does not depend on the device layout.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import sdtm as sdtm_lib
from dit_jax.diffusion.samplers import SAMPLER_NAMES, Sampler, make_sampler
from dit_jax.diffusion.schedule import linear_betas
from dit_jax.models.dit import guide
from dit_jax.prompts import Prompt, class_ids, text_condition
from dit_jax.weights import Weights, dit_module, load, vae_module

OUTPUTS = ("images", "latents")
DATA_AXIS = "data"  # the mesh axis the images are split over


@dataclasses.dataclass(frozen=True)
class FamilyDefaults:
    sampler: str
    steps: int
    cfg_scale: float
    timestep_spacing: str  # see make_sampler
    guide_all_channels: bool  # CFG on every output channel (else DiT's first three)


# DiT: the paper's DDIM sampling with IDDPM respacing and CFG on 3 of 4 latent channels.
# PixArt: what its diffusers checkpoints ship (DPMSolverMultistepScheduler defaults, 20 steps,
# guidance 4.5 on every channel before the learned variance is dropped).
FAMILY_DEFAULTS = {
    "dit": FamilyDefaults("ddim", 50, 4.0, "dit", False),
    "pixart": FamilyDefaults("dpm++", 20, 4.5, "linspace", True),
}


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
    """Everything static about a sampling run: what one compilation covers."""

    sampler: Sampler
    phases: tuple  # of sdtm.Phase; one phase with merger None when nothing is merged
    guided: bool  # classifier-free guidance ([cond; uncond] batch)
    decode: bool  # run the VAE (or map pixels) to uint8 images
    progress: bool = False  # print a line per step from inside the compiled loop
    scan_blocks: bool = True  # one compiled block scanned over the depth (see DiT.forward_merged)
    batch_sharding: NamedSharding | None = None  # images split over devices; None: one device
    protect_every: int | None = None  # SDTM's protected full-resolution steps (official release)
    cache_weight: float = 1.0  # blend of merged outputs with the protected steps' cache
    guided_channels: int = 3  # output channels classifier-free guidance mixes
    prompt_weights: tuple[float, ...] | None = None  # per phase (text families); None: all 1


def denoise(weights: Weights, x: jax.Array, t: jax.Array, cond, *, sdtm_plan=None) -> jax.Array:
    """One network evaluation: x (B, H, W, C) NHWC, t (B,) timesteps, cond -> (B, H, W, C_out),
    all channels the network produces (2C with learned sigma).

    cond: class ids (B,) for DiT; for PixArt a dict {"text": (B, L, caption_channels) T5
    embeddings, "text_mask": (B, L)} (plus "resolution" (B, 2) and "aspect_ratio" (B, 1) for
    models with micro-conditions), e.g. from `dit_jax.prompts.text_condition`.
    sdtm_plan: an `sdtm.Phase` (or a bare `BlockMerger`) to run with token merging from a fresh
    merge state; None runs the plain network.
    """
    _check_weights(weights)
    cfg = weights.config.dit
    shape = (cfg.input_size, cfg.input_size, cfg.in_channels)
    if jnp.ndim(x) != 4 or tuple(jnp.shape(x)[1:]) != shape:
        raise ValueError(f"x has shape {tuple(jnp.shape(x))}; this model takes (B, {', '.join(map(str, shape))}): "
                         "NHWC, channels last")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"x must be floating-point noisy latents, got {jnp.result_type(x)}")
    batch = jnp.shape(x)[0]
    if jnp.ndim(t) > 1 or jnp.size(t) not in (1, batch):
        raise ValueError(f"t has shape {tuple(jnp.shape(t))}; give one timestep or {batch} (one per row of x)")
    if not (weights.config.text_conditioned or isinstance(cond, jax.core.Tracer)):
        ids = np.asarray(cond)
        rows = cfg.num_classes + (cfg.class_dropout_prob > 0)  # the null class, where the model has one
        if not np.issubdtype(ids.dtype, np.integer) or ids.shape not in ((), (batch,)) or ids.min() < 0 \
                or ids.max() >= rows:
            raise ValueError(f"cond must be {batch} integer class ids in 0..{rows - 1} (dit_jax.prompts.class_ids "
                             f"turns names into ids), got {cond!r}")
    if sdtm_plan is not None and not hasattr(getattr(sdtm_plan, "merger", sdtm_plan), "build"):
        raise ValueError(f"sdtm_plan must be an sdtm.Phase (from sdtm.schedule(config, steps, num_tokens)) or a "
                         f"BlockMerger, got {type(sdtm_plan).__name__}")
    model = dit_module(weights)
    x = jnp.asarray(x, weights.dtype)
    t = jnp.broadcast_to(jnp.asarray(t), (batch,))
    if weights.config.text_conditioned:
        cond = jax.tree.map(jnp.asarray, cond)
    else:
        cond = jnp.broadcast_to(jnp.asarray(cond, jnp.int32), (batch,))
    if sdtm_plan is None:
        return model(x, t, cond)
    merger = getattr(sdtm_plan, "merger", sdtm_plan)
    state = sdtm_lib.init_state(x.shape[0], weights.config.dit.num_tokens)
    return model.forward_merged(x, t, cond, merger, state)[0]


def _to_uint8(images: jax.Array) -> jax.Array:
    return jnp.round((jnp.clip(images.astype(jnp.float32), -1, 1) + 1) * 127.5).astype(jnp.uint8)


@functools.partial(jax.jit, static_argnames=("plan",))
def _run(weights: Weights, x_T, cond, cfg_scale, key, plan: SamplingPlan):
    """The compiled sampler: x_T (B, H, W, C), cond (the model batch's conditioning) -> uint8
    images or final latents.

    With guidance the network sees 2B rows in pairs, image i's conditional row at 2i and its
    unconditional row at 2i + 1 (not [cond; uncond]), so that a batch split over devices keeps
    both rows of an image, and their merge counters, on the device that holds the image.
    `cond` comes laid out that way (see `prepare`).
    """
    model = dit_module(weights)
    cfg = weights.config.dit
    batch = x_T.shape[0]

    def split_images(a):  # pin an array with one row (or row pair) per image to the batch layout
        return a if plan.batch_sharding is None else jax.lax.with_sharding_constraint(a, plan.batch_sharding)

    model_batch = jax.tree.leaves(cond)[0].shape[0]
    state = sdtm_lib.init_state(model_batch, cfg.num_tokens, jax.random.fold_in(key, 1))
    state = {**state, "counter": split_images(state["counter"])}  # (2B, N)
    carry = plan.sampler.init(split_images(x_T.astype(jnp.float32)))
    noise_key = jax.random.fold_in(key, 2)
    # The official release's protected steps: every protect_every-th step runs at full
    # resolution and refreshes the per-block cache that merged tokens blend with.
    cache = None
    if plan.protect_every:
        cache = jnp.zeros((cfg.depth, model.CACHED_BRANCHES, model_batch, cfg.num_tokens, cfg.hidden_size), weights.dtype)

    for phase_index, phase in enumerate(plan.phases):
        merger = phase.merger
        if merger is not None and plan.batch_sharding is not None:
            # Plans are built per row: each device builds its own rows' plans, nothing crosses devices.
            merger = sdtm_lib.BatchParallel(merger, plan.batch_sharding.mesh, DATA_AXIS)
        # SDTM's prompt reweighting (text families): the phase's stage weight on the prompt.
        extra = {} if plan.prompt_weights is None else {"prompt_weight": plan.prompt_weights[phase_index]}

        def network(x, t, i, state, cache, merger=merger, extra=extra):
            """The network at step i -> (output, merge state, cache)."""
            if cache is None or merger is None:
                return (*model.forward_merged(x, t, cond, merger, state, scan_blocks=plan.scan_blocks, **extra), cache)

            def protected(state, cache):  # full resolution; its branches become the cache
                out, _, branches = model.forward_merged(
                    x, t, cond, scan_blocks=plan.scan_blocks, return_branches=True, **extra)
                return out, state, branches.astype(cache.dtype)

            def merged(state, cache):
                out, state = model.forward_merged(
                    x, t, cond, merger, state, scan_blocks=plan.scan_blocks, cache=cache,
                    cache_weight=plan.cache_weight, **extra,
                )
                return out, state, cache

            return jax.lax.cond(i % plan.protect_every == 0, protected, merged, state, cache)

        def body(loop, i, network=network):
            carry, state, cache = loop
            x = plan.sampler.sample(carry).astype(weights.dtype)
            if plan.guided:
                x = jnp.repeat(x, 2, axis=0)  # (2B, H, W, C): each image twice, side by side
            t = jnp.full((model_batch,), plan.sampler.timestep(i))
            out, state, cache = network(split_images(x), t, i, state, cache)
            out = out.astype(jnp.float32)
            if plan.guided:
                pairs = out.reshape(batch, 2, *out.shape[1:])  # (B, 2, H, W, C_out): [cond, uncond]
                out = jax.vmap(lambda pair: guide(pair, cfg_scale, guided_channels=plan.guided_channels)[0])(pairs)
            carry = plan.sampler.step(carry, out, i, jax.random.fold_in(noise_key, i))
            if plan.progress:
                jax.debug.callback(_report_step, i, plan.sampler.num_steps)
            return (carry, state, cache), None

        (carry, state, cache), _ = jax.lax.scan(body, (carry, state, cache), jnp.arange(phase.start, phase.stop))

    latents = plan.sampler.sample(carry)
    if not plan.decode:
        return latents
    if weights.vae is None:  # pixel-space model
        return _to_uint8(latents)
    vae = vae_module(weights)
    scale = weights.config.vae.scaling_factor
    return _to_uint8(vae.decode((latents / scale).astype(jax.tree.leaves(weights.vae)[0].dtype)))


def _report_step(i, total):
    i = int(i)
    if i == 0 or (i + 1) % max(1, total // 10) == 0 or i + 1 == total:
        print(f"  step {i + 1}/{total}", flush=True)


def merge_phases(sdtm, steps: int, num_tokens: int, grid: tuple[int, int]) -> tuple:
    """`sdtm` as sample() takes it -> the static phases of the loop."""
    if sdtm is False or sdtm is None:
        return (sdtm_lib.Phase(0, steps, "none", 0, None),)
    if sdtm is True:
        sdtm = sdtm_lib.SDTMConfig()
    if not isinstance(sdtm, (sdtm_lib.SDTMConfig, sdtm_lib.ToMeConfig)):
        raise ValueError(f"sdtm must be False, True, an SDTMConfig or a ToMeConfig, got {sdtm!r}")
    return tuple(sdtm_lib.schedule(sdtm, steps, num_tokens, grid=grid))


def split_phases(phases: tuple, step: int) -> tuple:
    """The phases with the one that spans `step` cut in two there (a run of unmerged steps can
    cross the stage switch; per-stage settings such as the prompt weight need the cut)."""
    out = []
    for p in phases:
        if p.start < step < p.stop:
            out += [dataclasses.replace(p, stop=step), dataclasses.replace(p, start=step)]
        else:
            out.append(p)
    return tuple(out)


def data_sharding(batch: int, mesh: Mesh | None = None) -> NamedSharding | None:
    """How `batch` images are split: over `mesh`'s "data" axis, or (mesh None) over all of
    `jax.devices()` when the batch divides evenly by their number; None means one device."""
    if mesh is None:
        devices = jax.devices()
        if len(devices) == 1 or batch % len(devices):
            return None  # one device: nothing to split, or a batch that does not divide
        mesh = Mesh(np.array(devices), (DATA_AXIS,))
    elif not isinstance(mesh, Mesh) or DATA_AXIS not in mesh.axis_names:
        raise ValueError(f"mesh must be a jax.sharding.Mesh with an axis named {DATA_AXIS!r}, got {mesh!r}")
    elif batch % mesh.shape[DATA_AXIS]:
        raise ValueError(
            f"{batch} image(s) do not split over the {mesh.shape[DATA_AXIS]} devices of the mesh's "
            f"{DATA_AXIS!r} axis: use a multiple of {mesh.shape[DATA_AXIS]} images, or mesh=None"
        )
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def _pairs(cond, uncond):
    """Interleave per-image conditioning with the unconditional one: row 2i image i's, 2i+1 the
    unconditional row (cond leaves (B, ...), uncond leaves (1, ...) or (B, ...)) -> (2B, ...)."""

    def one(c, u):
        u = jnp.broadcast_to(u, c.shape)
        return jnp.stack([c, u], axis=1).reshape(-1, *c.shape[1:])

    return jax.tree.map(one, cond, uncond)


def _check_prompt_weight(weights: Weights, sdtm) -> None:
    if isinstance(sdtm, sdtm_lib.SDTMConfig) and sdtm.prompt_weight != (1.0, 1.0) and not weights.config.text_conditioned:
        raise ValueError(
            f"prompt_weight {sdtm.prompt_weight} reweights a text prompt; this {weights.config.family} model is "
            "class-conditioned: leave prompt_weight at (1.0, 1.0)"
        )


def prepare(
    weights: Weights,
    prompt: Prompt | Sequence[Prompt],
    *,
    sdtm=False,
    sampler: str | None = None,
    steps: int | None = None,
    cfg_scale: float | None = None,
    seed: int = 0,
    num_images: int | None = None,
    latents=None,
    output: str = "images",
    progress: bool = False,
    mesh: Mesh | None = None,
    negative_prompt: str | dict = "",
):
    """Validate every argument (before anything compiles) and build the static plan and the
    traced inputs of `_run`, placed on the devices they run on. Returns (plan, args).
    None for sampler / steps / cfg_scale takes the family's default (FAMILY_DEFAULTS)."""
    _check_inputs(weights, prompt, seed, num_images, cfg_scale)
    cfg = weights.config.dit
    defaults = FAMILY_DEFAULTS[weights.config.family]
    sampler = defaults.sampler if sampler is None else sampler
    steps = defaults.steps if steps is None else steps
    cfg_scale = defaults.cfg_scale if cfg_scale is None else cfg_scale
    if sampler not in SAMPLER_NAMES:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLER_NAMES)}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    embedded = isinstance(prompt, dict)  # text models: precomputed conditioning (text_condition)
    if embedded and not weights.config.text_conditioned:
        raise ValueError("a conditioning dict is for text-conditioned models; give class names or ids")
    single = isinstance(prompt, (str, int, np.integer))
    given = len(jax.tree.leaves(prompt)[0]) if embedded else (1 if single else len(prompt))
    if not single and num_images is not None and given != num_images:
        raise ValueError(
            f"{given} prompts for num_images={num_images}: give one prompt per image, or one prompt "
            "to repeat num_images times"
        )
    count = (num_images or 1) if single else given
    prompts = None if embedded else ([prompt] * count if single else list(prompt))
    if count == 0:
        raise ValueError("no prompt given")
    shape = (count, cfg.input_size, cfg.input_size, cfg.in_channels)
    if latents is None:
        x_T = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
    else:
        x_T = jnp.asarray(latents, jnp.float32)
        if x_T.shape != shape:
            raise ValueError(
                f"latents have shape {tuple(x_T.shape)}; this model samples {shape} "
                f"(batch, {cfg.input_size}, {cfg.input_size}, {cfg.in_channels}) for {count} image(s)"
            )
        if not bool(jnp.isfinite(x_T).all()):
            raise ValueError("latents hold NaN or infinite values")
    sharding = data_sharding(count, mesh)
    guided = float(cfg_scale) != 1.0  # static: whether the program guides at all
    sdtm = sdtm_lib.SDTMConfig() if sdtm is True else sdtm
    _check_prompt_weight(weights, sdtm)
    phases = merge_phases(sdtm, int(steps), cfg.num_tokens, cfg.grid)
    if embedded:
        if guided and not isinstance(negative_prompt, dict):
            raise ValueError("with a conditioning dict as the prompt, guidance needs negative_prompt as one too "
                             "(text_condition's second result), or cfg_scale=1.0")
        cond, uncond = jax.tree.map(jnp.asarray, prompt), negative_prompt
    elif weights.config.text_conditioned:
        cond, uncond = text_condition(weights, prompts, negative_prompt if guided else None)
    else:
        if not isinstance(negative_prompt, str) or negative_prompt:
            raise ValueError("negative_prompt needs a text-conditioned model; a class model guides with its null class")
        labels = class_ids(prompts, weights.config.class_names, cfg.num_classes)
        if guided and cfg.class_dropout_prob <= 0:
            raise ValueError("this model has no null class (trained without label dropout): use cfg_scale=1.0")
        cond, uncond = jnp.asarray(labels), jnp.full((1,), cfg.null_class, jnp.int32)
    prompt_weights = None  # SDTM's prompt reweighting, per phase (text models; checked above)
    if isinstance(sdtm, sdtm_lib.SDTMConfig) and sdtm.prompt_weight != (1.0, 1.0):
        phases = split_phases(phases, sdtm.switch_index(int(steps)))
        prompt_weights = tuple(sdtm.stage_prompt_weight(p.start, int(steps)) for p in phases)
    if guided:
        cond = _pairs(cond, uncond)
    protect = isinstance(sdtm, sdtm_lib.SDTMConfig) and sdtm.protect_every is not None
    plan = SamplingPlan(
        sampler=make_sampler(sampler, steps=int(steps), betas=linear_betas(), timestep_spacing=defaults.timestep_spacing),
        phases=phases,
        guided=guided,
        decode=output == "images",
        progress=progress,
        batch_sharding=sharding,
        protect_every=sdtm.protect_every if protect else None,
        cache_weight=sdtm.cache_weight if protect else 1.0,
        guided_channels=cfg.out_channels if defaults.guide_all_channels else min(3, cfg.in_channels),
        prompt_weights=prompt_weights,
    )
    args = (weights, x_T, cond, jnp.float32(cfg_scale), jax.random.key(seed))
    if sharding is not None:
        # Inputs placed, jit propagates: images split, weights / scale / key on every device.
        # Placing already-placed weights again is free; on several hosts every process must pass
        # the same values (the same seed and prompts), which device_put checks.
        replicated = NamedSharding(sharding.mesh, PartitionSpec())
        args = (jax.device_put(weights, replicated), jax.device_put(x_T, sharding),
                jax.device_put(cond, sharding), *jax.device_put(args[3:], replicated))
    return plan, args


def _is_int(value) -> bool:
    return not isinstance(value, (bool, np.bool_)) and (
        isinstance(value, (int, np.integer))
        or (isinstance(value, jax.Array) and value.ndim == 0 and jnp.issubdtype(value.dtype, jnp.integer)))


def _check_weights(weights) -> None:
    if not isinstance(weights, Weights):
        hint = f": load it first, load({weights!r})" if isinstance(weights, (str, os.PathLike)) else ""
        raise ValueError(f"weights must be a dit_jax Weights (what load() returns), got {type(weights).__name__}{hint}")


def _check_inputs(weights, prompt, seed, num_images, cfg_scale) -> None:
    """Clear errors for arguments of the wrong kind (before anything else reads them)."""
    _check_weights(weights)
    one = (str, int, np.integer)
    if not isinstance(prompt, dict) and (isinstance(prompt, bool) or not (
            isinstance(prompt, one) or (isinstance(prompt, (list, tuple))
                                       and all(isinstance(p, one) and not isinstance(p, bool) for p in prompt)))):
        raise ValueError(f"prompt must be a class name or id, a text, or a list of them (or text_condition's dict), "
                         f"got {prompt!r}")
    if not _is_int(seed) or not -(2**63) <= int(seed) < 2**63:
        raise ValueError(f"seed must be an int (64-bit), got {seed!r}")
    if num_images is not None and (not _is_int(num_images) or int(num_images) < 1):
        raise ValueError(f"num_images must be an int >= 1 (or None: one image per prompt), got {num_images!r}")
    if cfg_scale is not None:
        number = isinstance(cfg_scale, (int, float, np.integer, np.floating)) or (
            isinstance(cfg_scale, jax.Array) and cfg_scale.ndim == 0)
        if isinstance(cfg_scale, (bool, np.bool_)) or not number or not np.isfinite(float(cfg_scale)):
            raise ValueError(f"cfg_scale must be a finite number (1.0: no guidance), got {cfg_scale!r}")


def to_host(result: jax.Array) -> np.ndarray:
    """A (possibly sharded, possibly multi-host) result as one NumPy array on this host."""
    if result.is_fully_addressable:
        return np.asarray(result)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(result, tiled=True))


def sample(
    weights: Weights | None = None,
    prompt: Prompt | Sequence[Prompt] = 0,
    *,
    sdtm=False,
    sampler: str | None = None,
    steps: int | None = None,
    cfg_scale: float | None = None,
    seed: int = 0,
    num_images: int | None = None,
    latents=None,
    output: str = "images",
    mesh: Mesh | None = None,
    negative_prompt: str | dict = "",
) -> np.ndarray:
    """Generate images for class prompts (DiT) or text prompts (PixArt).

    Args:
      weights: a bundle from `load()`; None loads the model shipped in the package.
      prompt: for class models a class name ("golden retriever", case-insensitive, synonyms
        allowed) or an int id; for text models free text ("a photo of a cat"); or a list of them
        (one per image). Text models also take precomputed conditioning, the dict
        `dit_jax.prompts.text_condition` returns (then negative_prompt is its second result).
      sdtm: False, True (SDTM with the defaults), an `SDTMConfig` or a `ToMeConfig`.
      sampler: "ddim", "ddpm" (learned variance) or "dpm++" (DPM-Solver++ 2M). Default: DiT
        "ddim" with DiT's respacing, PixArt "dpm++" with diffusers' "linspace" timesteps (its
        checkpoints' scheduler). The model is fed the original 0..999 timesteps.
      steps: network evaluations (default: DiT 50, PixArt 20); cfg_scale: classifier-free
        guidance, 1.0 turns it off (default: DiT 4.0 on the first three latent channels as DiT
        does, PixArt 4.5 on every channel).
      seed: initial noise and sampler noise; num_images: images for a single prompt (default 1).
      latents: optional initial noise (B, H, W, C) NHWC instead of the seed's.
      output: "images" (uint8 NHWC) or "latents" (float32 NHWC, before the VAE).
      mesh: a `jax.sharding.Mesh` with a "data" axis to split the images over (its size must
        divide the batch). None: split over all of `jax.devices()` when the batch divides evenly
        by their number, else run on one device. The split changes the images by float rounding
        only (every random draw is made for the whole batch). Weights already replicated on the
        mesh (`jax.device_put(w, NamedSharding(mesh, PartitionSpec()))`) are used in place.
      negative_prompt: text models: what guidance steers away from (default "", as PixArt does).
    """
    weights = load() if weights is None else weights
    plan, args = prepare(
        weights, prompt, sdtm=sdtm, sampler=sampler, steps=steps, cfg_scale=cfg_scale, seed=seed,
        num_images=num_images, latents=latents, output=output, mesh=mesh, negative_prompt=negative_prompt,
    )
    return to_host(_run(*args, plan=plan))


def compile_and_run(plan: SamplingPlan, args) -> tuple[np.ndarray, float, float]:
    """Run `_run` with compile time measured apart: (result, compile seconds, run seconds)."""
    start = time.perf_counter()
    compiled = _run.lower(*args, plan=plan).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    result = to_host(jax.block_until_ready(compiled(*args)))
    return result, compile_s, time.perf_counter() - start
