"""jit speed benchmarks: the whole sampler, one forward pass, or merging alone.

    python -m dit_jax.bench sample --variant DiT-XL/2 --image-size 512 --batch 8 --dtype bfloat16 \
        --strategies baseline,sdtm,tome:0.5 --steps 20 --repeats 5
    python -m dit_jax.bench forward --variant DiT-XL/2 --image-size 256 --batch 2 --torch
    python -m dit_jax.bench sample --variant PixArt-alpha-XL/2-512 --image-size 512 --batch 2 --steps 20

Variants: DiT-{S,B,L,XL}/{2,4,8} and PixArt-{alpha,Sigma}-XL/2-{256,512,1024} (dit_jax.models.*.VARIANTS).
PixArt runs on random T5 embeddings of its full text length (the text encoder runs once per
prompt, outside the sampling loop, so it is not timed).

Random weights (speed does not depend on their values). Every strategy is compiled first, from
scratch in `--compile-rounds` round-robin rounds (the median reported apart, with `fusions`: the
distinct fused kernels XLA compiled, which compile time grows with), then the strategies run
interleaved, `repeats` rounds, and the table gives the median / min / max run time and the
speed-up against the baseline of the same run. Latent models are timed without the VAE. FLOPs
are counted from the config and the merge counts (matmul and attention FLOPs); XLA's own count
is shown where it has one. `--profile` then traces each strategy and splits its op time by
region (attention, MLP, merge plans, merge, unmerge, IDM's key attention, other;
dit_jax.profiling): where a merged forward's time goes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sdtm as sdtm_lib
from dit_jax.devices import DTYPE_NAMES
from dit_jax.models import dit as dit_models
from dit_jax.models.dit import DiTConfig
from dit_jax.nn.attention import IMPLEMENTATIONS, attention_implementation
from dit_jax.outputs import check_output
from dit_jax.pipeline import FAMILY_DEFAULTS, _run, prepare
from dit_jax.profiling import OTHER, REGIONS, distinct_fusions, loop_ops, profile_regions
from dit_jax.weights import BundleConfig, Weights, dit_module, model_class, use_compilation_cache
from sdtm.config import parse_fields

MODES = ("sample", "forward", "merge")
# Dense bf16 tensor-core peaks (vendor datasheets: half the "with sparsity" figures), for the
# share-of-peak column; matched against jax's device_kind in this order, so the PCIe and NVL
# parts come before the SXM ones whose names they contain.
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12, "H100 NVL": 835e12, "H200 NVL": 835e12,
    "H100": 989e12, "H200": 989e12, "A100": 312e12,
}


@dataclasses.dataclass
class Case:
    """One timed strategy: `run()` makes one call of the compiled function."""

    name: str
    run: Callable[[], object]
    compile_s: float  # median of compile_times_s (PyTorch: its warm-up call)
    attn_share: float  # share of the attention queries left
    mlp_share: float
    flops: float  # counted from the config, per call
    xla_flops: float | None  # XLA's cost analysis, where it has one
    compiled: object | None = None  # the XLA executable (None for PyTorch), for --profile
    compile_times_s: tuple[float, ...] = ()  # every round's compile (trace + lower + XLA)


@dataclasses.dataclass
class Result:
    case: Case
    times_s: list[float]
    speedup: float = 1.0

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    def row(self, peak: float | None) -> dict:
        case = self.case
        achieved = case.flops / self.median_s
        return {
            "strategy": case.name,
            "compile_s": round(case.compile_s, 3),
            "compile_times_s": [round(t, 3) for t in case.compile_times_s],
            # Distinct fused kernels XLA compiled for the call: what compile time grows with.
            "fusions": None if case.compiled is None else sum(distinct_fusions(case.compiled.as_text()).values()),
            # Ops per iteration of each loop (the scanned block's: kernel launches per block on a GPU).
            "loop_ops": None if case.compiled is None else loop_ops(case.compiled.as_text()),
            "median_s": self.median_s,
            "min_s": min(self.times_s),
            "max_s": max(self.times_s),
            "speedup": round(self.speedup, 4),
            "token_share_attn": round(case.attn_share, 4),
            "token_share_mlp": round(case.mlp_share, 4),
            "flops": case.flops,
            "xla_flops": case.xla_flops,
            # XLA's buffer assignment: device memory the call needs beside its arguments (weights).
            "temp_bytes": None if case.compiled is None else _temp_bytes(case.compiled),
            "achieved_flops_per_s": achieved,
            "share_of_peak": None if peak is None else achieved / peak,
        }


def split_strategies(text: str) -> list[str]:
    """The --strategies list: comma-separated, where an item with "=" and no ":" continues the
    strategy before it ("baseline,sdtm:max_phases=2,deviation=0" is two strategies)."""
    strategies: list[str] = []
    for item in (part.strip() for part in text.split(",")):
        if strategies and "=" in item and ":" not in item:
            strategies[-1] += "," + item
        elif item:
            strategies.append(item)
    return strategies


def parse_strategy(text: str):
    """NAME[:RATIO][*EVERY][/ATTENTION] -> what `sample(sdtm=...)` takes, or ("ssm"|"idm", config).

    NAME: baseline, sdtm, tome, or (forward and merge modes only) ssm / idm, one stage at a fixed
    ratio; EVERY: blocks sharing one plan (plan_every); ATTENTION: xla, cudnn or chunked (see attention_of).
    A trailing "+unrolled" runs the blocks as a Python loop instead of a scan (see unrolled).
    sdtm and tome also take config fields instead of RATIO: "sdtm:max_phases=2,protect_every=3"
    (sdtm.config.parse_fields); so do ssm and idm, as SDTMConfig fields ("idm:ratio=0.5,merge_sum=matmul";
    deviation and switch_step are theirs to set).
    """
    given = text
    text = text.partition("+")[0].partition("/")[0]
    text, _, every = text.partition("*")
    name, _, value = text.partition(":")
    if every and not every.isdigit():
        raise ValueError(f"strategy {given!r}: what follows '*' is how many blocks share a plan, an int such as *4")
    plan_every = int(every) if every else 1
    if name == "baseline":
        return False
    if name not in ("sdtm", "tome", "ssm", "idm"):
        raise ValueError(
            f"unknown strategy {text!r}; use baseline, sdtm[:RATIO], tome[:RATIO], ssm:RATIO or idm:RATIO, "
            "sdtm|ssm|idm|tome:key=value,..., optionally with *EVERY (plan sharing) and /xla or /cudnn"
        )
    cls = sdtm_lib.ToMeConfig if name == "tome" else sdtm_lib.SDTMConfig
    stage = name in ("ssm", "idm")  # one stage at a fixed ratio: no deviation, no switch
    try:
        fields = parse_fields(cls, value) if "=" in value else ({"ratio": float(value)} if value else {})
    except ValueError as e:
        raise ValueError(f"strategy {text!r}: {e}") from None
    if every and "plan_every" in fields:
        raise ValueError(f"strategy {text!r} sets plan_every twice (*{every} and plan_every=)")
    fields.setdefault("plan_every", plan_every)
    if stage:
        if {"deviation", "switch_step"} & set(fields):
            raise ValueError(f"strategy {text!r}: {name} runs one stage at a fixed ratio; drop deviation and switch_step")
        fields.update(deviation=0.0, switch_step=1.0 if name == "ssm" else 0)
    try:
        config = cls(**fields)
    except (TypeError, ValueError) as e:
        raise ValueError(f"strategy {text!r}: {e}") from None
    return (name, config) if stage else config


def _text_length(cfg) -> int:
    """Text tokens a text-conditioned model's cross-attention reads (0 for class models)."""
    return 0 if isinstance(cfg, DiTConfig) else cfg.max_text_length


class BlockTokens(NamedTuple):
    """Tokens one block processes: its self-attention's queries (PixArt's cross-attention's
    too) and slots (the keys and values), and the MLP's."""

    queries: int
    slots: int
    mlp: int

    @classmethod
    def full(cls, num_tokens: int) -> BlockTokens:
        return cls(num_tokens, num_tokens, num_tokens)


def block_flops(cfg, tokens: BlockTokens) -> float:
    """Matmul + attention FLOPs of one block for one sample (with PixArt's cross-attention)."""
    d = cfg.hidden_size
    hidden = int(d * cfg.mlp_ratio)
    q, n = tokens.queries, tokens.slots
    attn = 2 * q * d * d + 2 * n * d * 2 * d + 4 * q * n * d + 2 * q * d * d  # q, kv, attention, out
    text = _text_length(cfg)
    if text:
        attn += 2 * q * d * d + 2 * text * d * 2 * d + 4 * q * text * d + 2 * q * d * d
    return attn + 4 * tokens.mlp * d * hidden


def forward_flops(cfg, tokens: BlockTokens) -> float:
    n, d, p = cfg.num_tokens, cfg.hidden_size, cfg.patch_size
    ends = 2 * n * d * p * p * (cfg.in_channels + cfg.out_channels)
    if _text_length(cfg):  # the caption projection
        ends += 2 * cfg.max_text_length * (cfg.caption_channels * d + d * d)
    return cfg.depth * block_flops(cfg, tokens) + ends


def model_variant(name: str, **changes):
    """A DiT or PixArt config by its variant name."""
    if name.lower().startswith("pixart"):
        from dit_jax.models import pixart

        return pixart.variant(name, **changes)
    return dit_models.variant(name, **changes)


def random_condition(cfg, batch: int, seed: int = 0):
    """Conditioning for `batch` rows: class ids for DiT; for PixArt random T5-like embeddings of the
    full text length, every token valid (the cross-attention's cost does not depend on the mask)."""
    if isinstance(cfg, DiTConfig):
        return jnp.arange(batch) % cfg.num_classes
    key = jax.random.key(seed)
    cond = {
        "text": 0.1 * jax.random.normal(key, (batch, cfg.max_text_length, cfg.caption_channels), jnp.float32),
        "text_mask": jnp.ones((batch, cfg.max_text_length), jnp.int32),
    }
    if cfg.use_additional_conditions:
        side = float(cfg.input_size * 8)
        cond["resolution"] = jnp.full((batch, 2), side, jnp.float32)
        cond["aspect_ratio"] = jnp.ones((batch, 1), jnp.float32)
    return cond


def phase_tokens(phase, num_tokens: int, whole_cache: bool = False) -> BlockTokens:
    """The tokens a block processes in a phase. whole_cache: merged tokens take their outputs
    from the protected steps' cache (cache_weight 0), so an SSM block's MLP and attention
    queries are the lone slots only (`dit_jax.nn.branches`)."""
    merger, r = phase.merger, phase.merge_count
    if merger is None or r == 0:
        return BlockTokens.full(num_tokens)
    if isinstance(merger, sdtm_lib.ToMeMerger):
        attn = num_tokens - r if merger.merge_attn else num_tokens
        return BlockTokens(attn, attn, num_tokens - r if merger.merge_mlp else num_tokens)
    if isinstance(merger, sdtm_lib.IDMMerger):
        return BlockTokens(num_tokens, num_tokens, num_tokens - r)
    slots = num_tokens - r  # SSM: attention and MLP
    lone = slots - r // (merger.window[0] * merger.window[1] - 1)
    return BlockTokens(lone, slots, lone) if whole_cache else BlockTokens(slots, slots, slots)


def step_tokens(plan, num_tokens: int) -> list[BlockTokens]:
    """The tokens a block processes at every step of a sampling plan (`dit_jax.pipeline.prepare`):
    all of them on SDTM's protected steps, `phase_tokens` else."""
    whole_cache = bool(plan.protect_every) and plan.cache_weight == 0.0
    tokens = []
    for phase in plan.phases:
        merged = phase_tokens(phase, num_tokens, whole_cache)
        for step in range(phase.start, phase.stop):
            protected = plan.protect_every and step % plan.protect_every == 0
            tokens.append(BlockTokens.full(num_tokens) if protected else merged)
    return tokens


def token_shares(tokens: list[BlockTokens], num_tokens: int) -> tuple[float, float]:
    """(attention queries, MLP tokens) over the steps of `step_tokens`, as a share of the baseline's."""
    total = num_tokens * len(tokens)
    return sum(t.queries for t in tokens) / total, sum(t.mlp for t in tokens) / total


def random_weights(cfg, dtype, seed: int = 0) -> Weights:
    """Random parameters (DiT or PixArt) made on the device in one compiled call (eager init is
    slow for XL)."""

    @jax.jit
    def init():
        model = model_class(cfg)(cfg, rngs=nnx.Rngs(seed), dtype=dtype)
        params = nnx.to_pure_dict(nnx.state(model))
        if isinstance(cfg, DiTConfig):
            # The official init zeroes adaLN: randomise it so the blocks do not run on zeros.
            modulation = params["blocks"]["adaLN_modulation"]  # kernel (depth, D, 6D)
            modulation["kernel"] = 0.02 * jax.random.normal(
                jax.random.key(seed + 1), modulation["kernel"].shape, dtype)
        return params

    return Weights(dit=init(), config=BundleConfig(dit=cfg))


def _xla_flops(compiled) -> float | None:
    try:
        analysis = compiled.cost_analysis()
        if isinstance(analysis, list):
            analysis = analysis[0]
        return float(analysis["flops"]) if analysis and "flops" in analysis else None
    except Exception:  # not every backend has a cost model
        return None


def _temp_bytes(compiled) -> int | None:
    """Temporaries of a compiled call, from XLA's memory analysis (None where it has none)."""
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # not every backend analyses memory
        return None


def unrolled(text: str) -> bool:
    """Whether a strategy asks for unrolled blocks ("+unrolled"); the default scans them."""
    suffix = text.partition("+")[2]
    if suffix not in ("", "unrolled"):
        raise ValueError(f"{text}: the only suffix after '+' is 'unrolled'")
    return suffix == "unrolled"


def attention_of(text: str) -> str:
    """The attention implementation a strategy names after "/" (default "auto")."""
    name = text.partition("+")[0].partition("/")[2] or "auto"
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"{text}: attention implementation after '/' must be one of {', '.join(IMPLEMENTATIONS[1:])}")
    return name


def _compile(text: str, lower: Callable):
    """Compile one strategy with its attention implementation; None (and a message) if it cannot
    be built here, e.g. cuDNN attention without a GPU, so the other strategies still run."""
    try:
        with attention_implementation(attention_of(text)):
            return lower().compile()
    except Exception as e:  # noqa: BLE001 - reported, the run goes on
        print(f"{text}: skipped, it does not compile here ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
              file=sys.stderr)
        return None


@dataclasses.dataclass
class Pending:
    """A strategy before compiling: `lower()` traces and lowers it, `call(compiled)` makes one
    call of the result; the rest becomes its Case."""

    text: str
    lower: Callable[[], object]
    call: Callable[[object], object]
    attn_share: float
    mlp_share: float
    flops: float


def compile_cases(pending: list[Pending], rounds: int) -> list[Case]:
    """Compile every strategy `rounds` times, round-robin, each time from scratch (jax's caches
    cleared: trace, lowering and XLA all counted), and report the median as its compile time.

    One compile per strategy in a fixed order is not a fair figure: on this project's CPU VM a
    process's first compiles ran about 2x slower than later ones (why is a guess: memory the VM
    had not touched yet), and a strategy compiled after a similar one about 40% faster, so the
    order decided the ratios.
    """
    times: dict[int, list[float]] = {i: [] for i in range(len(pending))}
    compiled: dict[int, object] = {}
    for _ in range(rounds):
        for i, item in enumerate(pending):
            if i in compiled and compiled[i] is None:
                continue  # does not compile here (reported once)
            jax.clear_caches()
            start = time.perf_counter()
            compiled[i] = _compile(item.text, item.lower)
            times[i].append(time.perf_counter() - start)
    return [
        Case(item.text, functools.partial(item.call, c), statistics.median(times[i]), item.attn_share,
             item.mlp_share, item.flops, _xla_flops(c), c, tuple(times[i]))
        for i, item in enumerate(pending) if (c := compiled[i]) is not None
    ]


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def sample_program(weights: Weights, text: str, *, batch: int, steps: int, sampler=None, cfg_scale=None):
    """What `sample` compiles for the strategy `text`, to latents: (plan, arguments of `_run`),
    the prompts `batch` class ids (DiT) or random T5-like embeddings (PixArt)."""
    cfg = weights.config.dit
    method = parse_strategy(text)
    if isinstance(method, tuple):
        raise ValueError(f"{text}: ssm/idm alone are forward-only strategies; use sdtm or tome for sample")
    if isinstance(cfg, DiTConfig):
        prompts, negative = [i % cfg.num_classes for i in range(batch)], ""
    else:
        prompts, negative = random_condition(cfg, batch), random_condition(cfg, 1, seed=1)
    plan, call_args = prepare(weights, prompts, sdtm=method, sampler=sampler, steps=steps, cfg_scale=cfg_scale,
                              output="latents", negative_prompt=negative)
    return dataclasses.replace(plan, scan_blocks=not unrolled(text)), call_args


def build_sample_cases(weights: Weights, strategies: list[str], args) -> list[Case]:
    cfg = weights.config.dit
    pending = []
    for text in strategies:
        plan, call_args = sample_program(weights, text, batch=args.batch, steps=args.steps, sampler=args.sampler,
                                         cfg_scale=args.cfg)
        model_batch = args.batch * (2 if plan.guided else 1)
        tokens = step_tokens(plan, cfg.num_tokens)
        flops = sum(forward_flops(cfg, t) for t in tokens) * model_batch
        pending.append(Pending(text, lambda a=call_args, p=plan: _run.lower(*a, plan=p), lambda c, a=call_args: c(*a),
                               *token_shares(tokens, cfg.num_tokens), flops))
    return compile_cases(pending, args.compile_rounds)


def build_forward_cases(weights: Weights, strategies: list[str], args):
    cfg = weights.config.dit
    n = cfg.num_tokens
    x = jax.random.normal(jax.random.key(0), (args.batch, cfg.input_size, cfg.input_size, cfg.in_channels), weights.dtype)
    t = jnp.full((args.batch,), 500)
    y = random_condition(cfg, args.batch)
    pending = []
    for text in strategies:
        phase = forward_phase(parse_strategy(text), cfg)
        fn = jax.jit(functools.partial(
            _forward, scan_blocks=not unrolled(text), merger=None if phase is None else phase.merger))
        tokens = BlockTokens.full(n) if phase is None else phase_tokens(phase, n)
        pending.append(Pending(text, lambda fn=fn: fn.lower(weights, x, t, y),
                               lambda c: c(weights, x, t, y), tokens.queries / n, tokens.mlp / n,
                               forward_flops(cfg, tokens) * args.batch))
    cases = compile_cases(pending, args.compile_rounds)
    if args.torch:
        cases.append(torch_case(weights, x, t, y, args))
    return cases


def forward_phase(method, cfg):
    """The merge phase one forward runs for a parsed strategy (`parse_strategy`): its first step's
    (for ssm:/idm: the stage alone at its ratio), or None for the baseline."""
    if method is False:
        return None
    config = method[1] if isinstance(method, tuple) else method
    return sdtm_lib.schedule(config, 1, cfg.num_tokens, grid=cfg.grid)[0]


def _forward(weights: Weights, x, t, y, *, scan_blocks, merger):
    """One forward pass (the blocks scanned, or unrolled), with a fresh merge state."""
    model = dit_module(weights)
    state = None if merger is None else sdtm_lib.init_state(x.shape[0], weights.config.dit.num_tokens)
    return model.forward_merged(x, t, y, merger, state, scan_blocks=scan_blocks)[0]


def build_merge_cases(weights: Weights, strategies: list[str], args):
    """Plan building + merge + unmerge for every block of one forward, without the network."""
    cfg = weights.config.dit
    n, d = cfg.num_tokens, cfg.hidden_size
    x = jax.random.normal(jax.random.key(0), (args.batch, n, d), weights.dtype)
    pending = []
    for text in strategies:
        method = parse_strategy(text)
        if method is False:
            continue
        config = method[1] if isinstance(method, tuple) else method
        phase = sdtm_lib.schedule(config, 1, n, grid=cfg.grid)[0]

        def blocks(x, merger=phase.merger):
            state = sdtm_lib.init_state(x.shape[0], n, jax.random.key(0))
            attention = jnp.full(x.shape[:2], 1.0 / n, jnp.float32)
            for _ in range(cfg.depth):
                attn_plan, mlp_plan, state = merger.build(
                    x, state, grid=cfg.grid, key_attention=attention if merger.needs_key_attention else None)
                for plan in (attn_plan, mlp_plan):
                    if plan is not None:
                        x = sdtm_lib.unmerge(plan, sdtm_lib.merge(plan, x) * 1.001)
            return x

        fn = jax.jit(blocks)
        pending.append(Pending(text, lambda fn=fn: fn.lower(x), lambda c: c(x), 1.0, 1.0, 0.0))
    return compile_cases(pending, args.compile_rounds)


def torch_case(weights: Weights, x, t, y, args):
    """diffusers' DiTTransformer2DModel with the same weights, SDPA attention, on the same hardware."""
    import torch
    from diffusers import DiTTransformer2DModel

    cfg = weights.config.dit
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if weights.dtype == jnp.bfloat16 else torch.float32
    model = DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth,
        sample_size=cfg.input_size, patch_size=cfg.patch_size, num_embeds_ada_norm=cfg.num_classes,
    ).to(device=device, dtype=dtype).eval()
    xt = torch.from_numpy(np.asarray(x.astype(jnp.float32)).transpose(0, 3, 1, 2)).to(device, dtype)
    tt = torch.from_numpy(np.asarray(t)).to(device)
    yt = torch.from_numpy(np.asarray(y)).to(device)

    def run():
        with torch.inference_mode():
            out = model(xt, timestep=tt, class_labels=yt).sample
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    start = time.perf_counter()
    run()  # warm-up: cuDNN/cuBLAS handles, kernel selection
    warm_s = time.perf_counter() - start
    n = cfg.num_tokens
    return Case("torch (diffusers)", run, warm_s, 1.0, 1.0, forward_flops(cfg, BlockTokens.full(n)) * args.batch, None)


def device_peak(kind: str | None = None) -> float | None:
    """Dense bf16 FLOP/s of the card named `kind` (default: the first device's device_kind), or
    None when PEAK_BF16_FLOPS does not know it (a CPU, another GPU)."""
    kind = jax.devices()[0].device_kind if kind is None else kind
    for name, peak in PEAK_BF16_FLOPS.items():
        if name in kind:
            return peak
    return None


def run_cases(cases: list[Case], repeats: int, warmup: int = 1) -> list[Result]:
    for case in cases:
        for _ in range(warmup):
            _timed(case.run)
    times = {case.name: [] for case in cases}
    for _ in range(repeats):  # interleaved: every strategy once per round
        for case in cases:
            times[case.name].append(_timed(case.run))
    results = [Result(case, times[case.name]) for case in cases]
    base = results[0].median_s
    for r in results:
        r.speedup = base / r.median_s
    return results


def bench_command(argv: list[str]) -> str:
    """The command line that reproduces this run, with the XLA_FLAGS it ran under (they change
    what XLA compiles)."""
    flags = os.environ.get("XLA_FLAGS", "").strip()
    return (f"XLA_FLAGS={shlex.quote(flags)} " if flags else "") + "python -m dit_jax.bench " + shlex.join(argv)


def software_versions() -> dict[str, str]:
    """jaxlib, flax and numpy, and torch when this process imported it (--torch)."""
    import jaxlib

    found = {"jaxlib": jaxlib.__version__, "flax": flax.__version__, "numpy": np.__version__}
    torch = sys.modules.get("torch")
    if torch is not None:
        found["torch"] = torch.__version__
    return found


def git_commit() -> str | None:
    """The checkout's commit (with -dirty for uncommitted changes), or None outside a git checkout."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def print_profiles(rows: list[dict]) -> None:
    """Op time per call by region (dit_jax.profiling), ms and share of the profiled total."""
    names = (*REGIONS, OTHER)
    width = max([18, *(len(row["strategy"]) for row in rows)])
    print(f"# profile: op time per call, ms (share of the traced op time; {OTHER}: norms, modulation, residuals, "
          "sampler, copies)")
    print(f"{'strategy':<{width}} {'traced ms':>9} " + " ".join(f"{n:>13}" for n in names))
    for row in rows:
        profile = row.get("profile_s")
        if profile is None:
            continue
        total = sum(profile.values())
        cells = " ".join(f"{1e3 * profile[n]:>7.2f} {100 * profile[n] / total if total else 0:>4.0f}%" for n in names)
        print(f"{row['strategy']:<{width}} {1e3 * total:>9.2f} {cells}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dit_jax.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=MODES)
    ap.add_argument("--variant", default="DiT-XL/2", help="DiT-XL/2, PixArt-alpha-XL/2-512, ... (see above)")
    ap.add_argument("--image-size", type=int, default=256, help="pixels (latent side = image size / 8)")
    ap.add_argument("--input-size", type=int, help="latent side directly (overrides --image-size)")
    ap.add_argument("--depth", type=int, help="override the variant's depth (tiny smoke runs)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=DTYPE_NAMES,
                    help="float16: GPUs without bfloat16 tensor cores (T4, V100)")
    ap.add_argument("--strategies", default="baseline,sdtm,tome:0.5",
                    help="comma-separated, baseline first: baseline, sdtm[:RATIO], tome[:RATIO], ssm:RATIO, idm:RATIO, "
                    "sdtm|ssm|idm:key=value,... (SDTMConfig fields), tome:key=value,...; suffixes *EVERY, /ATTENTION, +unrolled")
    ap.add_argument("--sampler", help="default: the family's (DiT ddim, PixArt dpm++)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, help="guidance scale (default: the family's, DiT 4.0, PixArt 4.5)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--torch", action="store_true", help="forward mode: add diffusers' DiT on the same hardware")
    ap.add_argument("--compile-rounds", type=int, default=3,
                    help="compile every strategy this many times, round-robin, from scratch; report the median "
                    "(with --compile-cache, rounds after the first load from the cache)")
    ap.add_argument("--compile-cache", metavar="DIR", help="persistent compilation cache folder (reused across runs)")
    ap.add_argument("--profile", action="store_true",
                    help="after timing, profile each strategy: op time per region (attention, MLP, merge plans, ...)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)

    try:
        if args.repeats < 1 or args.batch < 1 or args.compile_rounds < 1:
            raise ValueError("--repeats, --batch and --compile-rounds must be >= 1")
        if args.image_size % 8 and args.input_size is None:
            raise ValueError(f"--image-size {args.image_size} is not a multiple of 8 (the VAE's factor)")
        for flag, value in (("--image-size", args.image_size), ("--input-size", args.input_size), ("--depth", args.depth)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be >= 1, got {value}")
        changes = {"input_size": args.input_size if args.input_size is not None else args.image_size // 8}
        if args.depth is not None:
            changes["depth"] = args.depth
        cfg = model_variant(args.variant, **changes)
        cfg.validate()
        defaults = FAMILY_DEFAULTS["dit" if isinstance(cfg, DiTConfig) else "pixart"]
        args.sampler = args.sampler or defaults.sampler
        args.cfg = defaults.cfg_scale if args.cfg is None else args.cfg
        strategies = split_strategies(args.strategies)
        if args.mode != "merge" and (not strategies or parse_strategy(strategies[0]) is not False):
            raise ValueError("--strategies must start with baseline (speed-ups are against it)")
        for s in strategies:
            parse_strategy(s)
            attention_of(s)
            unrolled(s)
        if args.torch and args.mode != "forward":
            raise ValueError("--torch compares one forward pass: use it with the forward mode")
        if args.torch and not isinstance(cfg, DiTConfig):
            raise ValueError("--torch compares with diffusers' DiT: it takes DiT variants only")
        if args.json:
            check_output("--json", args.json)  # found out now, not after the run
        dtype = jnp.dtype(args.dtype)
        if args.compile_cache:
            use_compilation_cache(args.compile_cache)
        weights = random_weights(cfg, dtype)
        # The module graph is built once per process (DiT-XL/2: about a second on CPU): build it
        # now, so that the first strategy's compile time is its own.
        dit_module(weights)
        builder = {"sample": build_sample_cases, "forward": build_forward_cases, "merge": build_merge_cases}[args.mode]
        cases = builder(weights, strategies, args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    results = run_cases(cases, args.repeats)
    peak = device_peak() if args.dtype != "float32" else None  # dense fp16 peaks equal bf16's on these cards
    device = jax.devices()[0]
    header = {
        "mode": args.mode, "variant": args.variant, "input_size": cfg.input_size, "tokens": cfg.num_tokens,
        "batch": args.batch, "dtype": args.dtype, "steps": args.steps if args.mode == "sample" else None,
        "sampler": args.sampler if args.mode == "sample" else None, "cfg": args.cfg, "repeats": args.repeats,
        "device": f"{device.platform}:{device.device_kind}", "jax": jax.__version__, "host": platform.node(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": bench_command(sys.argv[1:] if argv is None else argv),
        "versions": software_versions(), "commit": git_commit(),
    }
    rows = [r.row(peak) for r in results]
    print(f"# {args.mode} {args.variant} {cfg.num_tokens} tokens, batch {args.batch}, {args.dtype}, "
          f"{header['device']}, jax {jax.__version__}" + (f", {args.steps} {args.sampler} steps" if args.mode == "sample" else ""))
    width = max([18, *(len(row["strategy"]) for row in rows)])
    print(f"{'strategy':<{width}} {'compile s':>9} {'fusions':>7} {'median s':>10} {'min s':>9} {'max s':>9} {'speed-up':>8} "
          f"{'attn tok':>8} {'mlp tok':>8} {'TFLOP/s':>8}" + (" %peak" if peak else ""))
    for row in rows:
        tflops = row["achieved_flops_per_s"] / 1e12
        fusions = "-" if row["fusions"] is None else row["fusions"]
        line = (f"{row['strategy']:<{width}} {row['compile_s']:>9.2f} {fusions:>7} {row['median_s']:>10.4f} {row['min_s']:>9.4f} "
                f"{row['max_s']:>9.4f} {row['speedup']:>7.2f}x {row['token_share_attn']:>8.3f} "
                f"{row['token_share_mlp']:>8.3f} {tflops:>8.2f}")
        if peak:
            line += f" {100 * row['share_of_peak']:5.1f}"
        print(line, flush=True)
    if args.profile:  # after the table, so that a profiler failure cannot lose the timings
        for result, row in zip(results, rows):
            if result.case.compiled is None:
                continue
            try:
                row["profile_s"] = profile_regions(result.case.compiled, result.case.run)
            except (RuntimeError, KeyError, ValueError, OSError) as e:
                row["profile_s"] = None
                print(f"profile of {row['strategy']} failed: {e}", file=sys.stderr)
        print_profiles(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": header, "results": rows}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
