"""Device memory of the whole PixArt pipeline on an accelerator, measured: does it fit a 16 GB card?

Builds a full-size PixArt-alpha pipeline (T5-XXL encoder, PixArt-XL/2, SD VAE) with bf16 weights
made straight on the device (no checkpoint: memory does not depend on the values), then
samples as the README's two routes do, one image at a time (batch 1, 20 DPM-Solver++ steps with
guidance, VAE decode), reading the device's allocator statistics after
each stage:

  encode-then-drop   the transformer and the VAE on the device, sampling from T5 embeddings
                     (`text_condition`, then `dataclasses.replace(w, text_encoder=None)`),
                     without and with SDTM
  whole pipeline     the T5 encoder on the device too: encode two prompts, then sample (baseline)

The first route runs first (its peak cannot include the encoder), then the encoder is built.
Each image size runs in a fresh process (the allocator's peak cannot be reset), with
XLA_PYTHON_CLIENT_PREALLOCATE=false so that the peak is what the programs took, not the pool.
A card fits a route when that route's peak is under the pool JAX may use there (by default 75%
of the card's memory: on a 16 GB card about 11 GiB).

    python docs/card_memory.py                      (512 and 1024 px; about a minute on an H100)
    python docs/card_memory.py --sizes 512 --t5-layers 2 --depth 2      (a quick CPU check: a CPU
        has no allocator statistics, so only XLA's memory analysis of each program is printed)

An experiment, not an API.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

GiB = 2**30


def child(size: int, t5_layers: int, depth: int | None, steps: int) -> None:
    """One image size, in this process: print a JSON line per stage."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dit_jax.bench import random_condition
    from dit_jax.models import pixart
    from dit_jax.models.t5 import T5_V1_1_XXL, T5Encoder
    from dit_jax.models.vae import AutoencoderKL, VAEConfig
    from dit_jax.pipeline import _run, prepare
    from dit_jax.prompts import _encode
    from dit_jax.weights import BundleConfig, Weights

    device = jax.devices()[0]
    dtype = jnp.bfloat16

    def report(stage: str, **extra) -> None:
        stats = device.memory_stats() or {}
        line = {"size": size, "stage": stage, "in_use": stats.get("bytes_in_use"),
                "peak": stats.get("peak_bytes_in_use"), "limit": stats.get("bytes_limit"), **extra}
        print("STAGE " + json.dumps(line), flush=True)

    # Each array filled with one small value: random draws would need temporaries as large as
    # the largest array (T5's 0.5 GiB embedding in float32 bits), which the allocator's peak
    # would keep; a fill needs none. Memory and speed do not depend on the values.
    leaf = jax.jit(lambda value, shape: jnp.full(shape, value, dtype), static_argnums=1)

    def filled_params(make) -> dict:
        """Arrays shaped like the module `make()` builds, made on the device one at a time."""
        shapes = nnx.to_pure_dict(nnx.state(nnx.eval_shape(make)))
        values = iter(np.linspace(0.01, 0.03, len(jax.tree.leaves(shapes))))
        return jax.block_until_ready(jax.tree.map(lambda s: leaf(next(values), tuple(s.shape)), shapes))

    changes = {} if depth is None else {"depth": depth}
    cfg = pixart.variant(f"PixArt-alpha-XL/2-{size}", **changes)
    t5_cfg = dataclasses.replace(T5_V1_1_XXL, num_layers=t5_layers)
    vae_cfg = VAEConfig()
    config = BundleConfig(dit=cfg, vae=vae_cfg, text_encoder=t5_cfg)
    report("start", device=str(device), platform=device.platform, jax=jax.__version__)

    w = Weights(dit=filled_params(lambda: pixart.PixArt(cfg, rngs=nnx.Rngs(0), dtype=dtype)),
                vae=filled_params(lambda: AutoencoderKL(vae_cfg, rngs=nnx.Rngs(0), dtype=dtype)), config=config)
    nbytes = lambda tree: sum(a.nbytes for a in jax.tree.leaves(tree))  # noqa: E731
    report("transformer and VAE built", transformer=nbytes(w.dit), vae=nbytes(w.vae))

    # T5-like embeddings of a prompt and of the empty one, as the bench samples from.
    cond, uncond = random_condition(cfg, 1, seed=0), random_condition(cfg, 1, seed=1)

    def run(route: str, strategies) -> None:
        for label, sdtm in strategies:
            # What sample(w, cond, sdtm=..., negative_prompt=uncond) runs, compiled once here so
            # that XLA's memory analysis of the very program can be printed beside the peak.
            plan, args = prepare(w, cond, sdtm=sdtm, steps=steps, output="images", negative_prompt=uncond)
            compiled = _run.lower(*args, plan=plan).compile()
            start = time.perf_counter()
            images = jax.block_until_ready(compiled(*args))
            report(f"{route}: sampled, {label}", seconds=round(time.perf_counter() - start, 2),
                   xla_temp=int(compiled.memory_analysis().temp_size_in_bytes), image=list(images.shape))

    run("encode-then-drop", (("baseline", False), ("sdtm=True", True)))
    w = dataclasses.replace(w, text_encoder=filled_params(lambda: T5Encoder(t5_cfg, rngs=nnx.Rngs(0), dtype=dtype)))
    report("T5 encoder built", t5=nbytes(w.text_encoder))
    ids = jnp.ones((2, cfg.max_text_length), jnp.int32)  # a prompt and the empty one
    temp = _encode.lower(w, ids, ids).compile().memory_analysis().temp_size_in_bytes
    jax.block_until_ready(_encode(w, ids, ids))
    report("whole pipeline: encoded 2 prompts", xla_temp=int(temp))
    run("whole pipeline", (("baseline", False),))  # SDTM's temporaries beside the baseline's: the first route


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], choices=[256, 512, 1024])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--t5-layers", type=int, default=24, help="shrink the encoder (quick checks)")
    ap.add_argument("--depth", type=int, help="shrink the transformer (quick checks)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds for all sizes together")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.t5_layers, args.depth, args.steps)
        return
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    env.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
    failed, start = False, time.perf_counter()
    for size in args.sizes:
        command = [sys.executable, __file__, "--child", str(size), "--steps", str(args.steps),
                   "--t5-layers", str(args.t5_layers)] + ([] if args.depth is None else ["--depth", str(args.depth)])
        left = args.timeout - (time.perf_counter() - start)
        try:
            proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=max(left, 1))
            out, err, problem = proc.stdout, proc.stderr, f"rc {proc.returncode}" if proc.returncode else None
        except subprocess.TimeoutExpired as e:  # the child is killed; keep the stages it finished
            decode = lambda b: b.decode() if isinstance(b, bytes) else (b or "")  # noqa: E731
            out, err, problem = decode(e.stdout), decode(e.stderr), f"out of time ({args.timeout:.0f} s in all)"
        stages = [json.loads(x.split(" ", 1)[1]) for x in out.splitlines() if x.startswith("STAGE ")]
        if problem:
            failed = True
            print(f"{size} px: the run stopped ({problem}) after {len(stages)} stages:\n{err[-2000:]}", file=sys.stderr)
        print_stages(size, stages)
    sys.exit(1 if failed else 0)


def print_stages(size: int, stages: list[dict]) -> None:
    if not stages:
        return
    first = stages[0]
    print(f"\n## PixArt-alpha XL/2 at {size} px, bf16, batch 1 with guidance, on {first['device']} "
          f"(jax {first['jax']})\n")
    gib = lambda v: "–" if v is None else f"{v / GiB:.2f}"  # noqa: E731
    print("| stage | in use GiB | peak so far GiB | XLA temporaries GiB | s |")
    print("|---|---|---|---|---|")
    for s in stages[1:]:
        sizes = ", ".join(f"{k} {s[k] / GiB:.2f} GiB" for k in ("transformer", "vae", "t5") if k in s)
        label = s["stage"] + (f" ({sizes})" if sizes else "")
        print(f"| {label} | {gib(s['in_use'])} | {gib(s['peak'])} | {gib(s.get('xla_temp'))} | {s.get('seconds', '')} |")
    limit = next((s["limit"] for s in stages if s.get("limit")), None)
    if limit:
        print(f"\nThe allocator's limit here: {limit / GiB:.1f} GiB (without preallocation).")


if __name__ == "__main__":
    main()
