"""Compile dit-jax's programs for a GPU or TPU this machine does not have, and read what XLA made of them.

XLA's GPU and TPU compilers run on the host: given a description of the card (or a TPU
topology), jax compiles a program for it without one ("deviceless" compilation). Nothing runs,
so nothing is timed; what comes out is the compiled program, which answers what a run on the
device would otherwise be needed for:

  kernels   what each scanned DiT block launches on a GPU, per region (attention, MLP,
            merge plans, merge, unmerge, IDM's key attention, the rest) and per kind (GEMM
            fusions, XLA's own loop/reduction fusions, cuDNN calls, sorts, scatters, weight
            copies), for one forward of DiT-XL/2 at 512 px, batch 8, bf16 (the issues' GPU setting)
  compile   how long XLA takes to compile the sampler for the card, per strategy (on this host,
            without the autotuning a GPU adds), and that it compiles at all
  memory    XLA's buffer assignment of the PixArt-alpha pipeline's programs (T5-XXL encoder,
            the 20-step sampler with guidance, with and without the VAE decode) at 512 and
            1024 px: the device memory each needs beside the weights, i.e. does the pipeline
            fit a 16 GB card (a T4, float16 as `load(dtype="auto")` picks there; a TPU v5e)
            or an H100/H200

`XLA_FLAGS=--xla_dump_to=DIR` keeps the PTX of every kernel (how docs/benchmarks.md read the
scatter-add's atomics per card).

GPU cards need jax's CUDA plugin (the version of the installed jax; no GPU, no driver):
    pip install "jax-cuda12-plugin[with-cuda]==$(python -c 'import jax; print(jax.__version__)')"
(about 5 GB of CUDA libraries; `--target DIR` plus PYTHONPATH keeps them out of the environment).
TPUs (v5e, v6e: Colab's TPU runtimes, one chip) need libtpu, the version `jax[tpu]` pins
(jax 0.10.2: libtpu 0.0.42.*, 210 MB), e.g. `pip install --no-deps --target DIR "libtpu==0.0.42.*"`.

    JAX_PLATFORMS=cpu python docs/device_compile.py kernels [--card h200] [--strategies baseline,ssm:0.5,...]
    JAX_PLATFORMS=cpu python docs/device_compile.py compile [--card h200|v5e|...] [--chips 4] [--strategies baseline,sdtm,...]
    JAX_PLATFORMS=cpu python docs/device_compile.py memory [--card t4|v5e|...] [--sizes 512 1024]

The cards are described by their published specifications (CARDS below). Not measured: run
time, autotuning (XLA picks GEMM tilings by its heuristics when it has no card to try them on,
so a kernel count can differ from the card's by a GEMM split), and what the allocator, CUDA and
cuDNN (or the TPU runtime) take beside XLA's buffers. An experiment, not an API.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import os
import re
import sys
import time

GiB = 2**30

# Published specifications (NVIDIA datasheets and the CUDA occupancy tables), as XLA's
# GpuTargetConfigProto wants them: what its fusion and tiling heuristics read.
CARDS = {
    "h200": dict(name="NVIDIA H200", capability=(9, 0), sms=132, clock_ghz=1.98, bandwidth=4.8e12,
                 l2=50 * 2**20, memory=141e9, smem_per_sm=228 * 1024, smem_optin=227 * 1024,
                 threads_per_sm=2048, fpus_per_sm=128),
    "h100": dict(name="NVIDIA H100 80GB HBM3", capability=(9, 0), sms=132, clock_ghz=1.98, bandwidth=3.35e12,
                 l2=50 * 2**20, memory=80e9, smem_per_sm=228 * 1024, smem_optin=227 * 1024,
                 threads_per_sm=2048, fpus_per_sm=128),
    "a100": dict(name="NVIDIA A100-SXM4-80GB", capability=(8, 0), sms=108, clock_ghz=1.41, bandwidth=2.039e12,
                 l2=40 * 2**20, memory=80e9, smem_per_sm=164 * 1024, smem_optin=163 * 1024,
                 threads_per_sm=2048, fpus_per_sm=64),
    "t4": dict(name="Tesla T4", capability=(7, 5), sms=40, clock_ghz=1.59, bandwidth=320e9,
               l2=4 * 2**20, memory=15 * GiB, smem_per_sm=64 * 1024, smem_optin=64 * 1024,
               threads_per_sm=1024, fpus_per_sm=64),
    # TPUs (libtpu's topology "<generation>:<shape>", TPU_SLICES): one chip is what Colab's v5e-1
    # and v6e-1 runtimes have. HBM per chip as Google's Cloud TPU pages give it, in GB.
    "v5e": dict(name="TPU v5e", platform="tpu", memory=16e9),
    "v6e": dict(name="TPU v6e", platform="tpu", memory=32e9),
}


def is_tpu(card: str) -> bool:
    return CARDS[card].get("platform") == "tpu"


def half_dtype(card: str):
    """The half precision `load(dtype="auto")` picks on that card (`dit_jax.devices`): bfloat16 on
    TPUs and on GPUs from compute capability 8.0 on, else float16."""
    import jax.numpy as jnp

    return jnp.bfloat16 if is_tpu(card) or CARDS[card]["capability"] >= (8, 0) else jnp.float16


def target_config(card: str) -> str:
    """The card as a GpuTargetConfigProto in text form."""
    c = CARDS[card]
    major, minor = c["capability"]
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {c["smem_per_sm"]}
  shared_memory_per_block_optin: {c["smem_optin"]}
  threads_per_core_limit: {c["threads_per_sm"]}
  core_count: {c["sms"]}
  fpus_per_core: {c["fpus_per_sm"]}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(c["bandwidth"])}
  l2_cache_size: {c["l2"]}
  clock_rate_ghz: {c["clock_ghz"]}
  device_memory_size: {int(c["memory"])}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  cuda_compute_capability {{ major: {major} minor: {minor} }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 patch: 0 }}
device_description_str: "{c["name"]}"
"""


# An op that moves data between chips, in a compiled program's text (async ones as their -start).
COLLECTIVE = re.compile(r"\b(?:all-reduce|all-gather|all-to-all|reduce-scatter|collective-permute)(?:-start)?\(")

# Chips of a TPU slice on one host -> libtpu's topology shape and chips-per-host bounds.
TPU_SLICES = {1: ("1x1", [1, 1, 1]), 4: ("2x2", [2, 2, 1]), 8: ("2x4", [2, 4, 1])}


def card_devices(card: str, chips: int = 1) -> list:
    """Compile-only devices of `card` (jax's CUDA plugin or libtpu; no GPU or TPU needed): one
    GPU, or a TPU slice of `chips` chips on one host."""
    from jax.experimental import topologies

    if is_tpu(card):
        if chips not in TPU_SLICES:
            sys.exit(f"--chips {chips}: a one-host TPU slice here has {', '.join(map(str, TPU_SLICES))} chips")
        shape, per_host = TPU_SLICES[chips]
        # libtpu looks for the TPU VM it runs on unless these say what it is (only one process
        # at a time can load libtpu: it holds /tmp/libtpu_lockfile).
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{card}-{chips}")
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        try:
            topology = topologies.get_topology_desc(
                platform="tpu", topology_name=f"{card}:{shape}", chips_per_host_bounds=per_host)
        except (NotImplementedError, RuntimeError) as e:
            sys.exit(f"cannot describe a TPU here ({str(e).splitlines()[0]}); install libtpu as the docstring says")
        return list(topology.devices)
    if chips != 1:
        sys.exit(f"--chips {chips}: several chips are for TPUs here; {card} is one GPU")
    try:
        topology = topologies.get_topology_desc(
            platform="cuda", topology_name="", target_config=target_config(card), topology="1x1x1")
    except (NotImplementedError, RuntimeError) as e:
        sys.exit(f"cannot describe a CUDA card here ({e}); install jax's CUDA plugin as the docstring says")
    return list(topology.devices)


def card_device(card: str):
    """One compile-only device of `card`."""
    return card_devices(card)[0]


def on_card(tree, device, dtype=None):
    """Shapes and dtypes of `tree`'s arrays, placed on the compile-only `device` (or laid out by a
    `jax.sharding.Sharding` over such devices); with `dtype`, floating-point arrays in that dtype
    (as `load(dtype=...)` stores every part)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Sharding, SingleDeviceSharding

    sharding = device if isinstance(device, Sharding) else SingleDeviceSharding(device)

    def place(a):
        floating = dtype is not None and jnp.issubdtype(a.dtype, jnp.floating)
        return jax.ShapeDtypeStruct(a.shape, dtype if floating else a.dtype, sharding=sharding)

    return jax.tree.map(place, tree)


def parameters_on_card(cls, config, dtype, device):
    """The parameters `cls(config, dtype=dtype)` has, as shapes on the compile-only `device`, in
    `dtype` (as `load(dtype=...)` stores them)."""
    from flax import nnx

    from dit_jax.weights import abstract_module

    return on_card(nnx.to_pure_dict(nnx.state(abstract_module(cls, config, dtype))), device, dtype)


def attention_for(card: str, dtype) -> str:
    """The attention `auto` picks on that card (dit_jax.nn.attention, which reads the process's
    own backend, a CPU here): cuDNN's flash kernel for half precision on GPUs from compute
    capability 8.0 on, else (other GPUs, TPUs) XLA's."""
    import jax.numpy as jnp

    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if half and not is_tpu(card) and CARDS[card]["capability"] >= (8, 0) else "xla"


# ---------------------------------------------------------------------------------------------
# kernels

def kernels(args) -> None:
    import jax
    import jax.numpy as jnp

    from dit_jax import bench, profiling
    from dit_jax.nn.attention import attention_implementation
    from dit_jax.weights import BundleConfig, Weights, model_class

    if is_tpu(args.card):
        sys.exit(f"kernels reads a GPU program's launches; {args.card} is a TPU (compile and memory take TPUs)")
    device = card_device(args.card)
    cfg = bench.model_variant(args.variant, input_size=args.image_size // 8)
    dtype = jnp.bfloat16
    weights = Weights(dit=parameters_on_card(model_class(cfg), cfg, dtype, device), config=BundleConfig(dit=cfg))
    x = jax.ShapeDtypeStruct((args.batch, cfg.input_size, cfg.input_size, cfg.in_channels), dtype)
    t = jax.ShapeDtypeStruct((args.batch,), jnp.int32)
    x, t, y = on_card((x, t, bench.random_condition(cfg, args.batch)), device)  # y: class ids, or text for PixArt
    n = cfg.num_tokens
    print(f"# {args.variant}, {args.image_size} px ({n} tokens), batch {args.batch}, bf16, one forward, compiled for "
          f"{CARDS[args.card]['name']} (no card: jax {jax.__version__}, deviceless)\n")
    regions = (*profiling.REGIONS, profiling.OTHER)
    print("| strategy | kernels per block | " + " | ".join(regions) + " | kinds | compile s |")
    print("|---|---|" + "---|" * len(regions) + "---|---|")
    for text in bench.split_strategies(args.strategies):
        if bench.unrolled(text):
            sys.exit(f"{text}: kernels counts what the scanned block loop runs; +unrolled has no loop")
        phase = bench.forward_phase(bench.parse_strategy(text), cfg)
        fn = jax.jit(functools.partial(bench._forward, scan_blocks=True,
                                       merger=None if phase is None else phase.merger))
        jax.clear_caches()
        start = time.perf_counter()
        with attention_implementation(attention_for(args.card, dtype)):
            compiled = fn.lower(weights, x, t, y).compile()
        seconds = time.perf_counter() - start
        found = profiling.loop_kernels(compiled.as_text())  # one call's, over the depth blocks
        by_region, by_kind = collections.Counter(), collections.Counter()
        for (kind, region), count in found.items():
            by_region[region] += count
            by_kind[kind] += count
        number = lambda v: f"{v / cfg.depth:.3g}"  # noqa: E731
        kinds = ", ".join(f"{kind} {number(count)}" for kind, count in by_kind.most_common())
        print(f"| {text} | {number(sum(found.values()))} | " + " | ".join(number(by_region[r]) for r in regions)
              + f" | {kinds} | {seconds:.1f} |", flush=True)


# ---------------------------------------------------------------------------------------------
# compile

def compile_times(args) -> None:
    """The sampler compiled for the card from scratch, strategies round-robin, median of rounds:
    XLA's compile on this host, without the autotuning a GPU would add. With `--chips N` (TPUs)
    the batch is split over the slice's chips as `sample()` splits it over `jax.devices()`."""
    import statistics

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from dit_jax import bench
    from dit_jax.nn.attention import attention_implementation
    from dit_jax.pipeline import DATA_AXIS, _run
    from dit_jax.weights import BundleConfig, Weights, model_class

    devices = card_devices(args.card, args.chips)
    if args.batch % len(devices):
        sys.exit(f"--batch {args.batch} does not split over {len(devices)} chips")
    cfg = bench.model_variant(args.variant, input_size=args.image_size // 8)
    dtype = jnp.bfloat16
    weights = Weights(dit=parameters_on_card(model_class(cfg), cfg, dtype, devices[0]), config=BundleConfig(dit=cfg))
    strategies = bench.split_strategies(args.strategies)
    programs = []
    for text in strategies:
        plan, call_args = bench.sample_program(weights, text, batch=args.batch, steps=args.steps)
        if len(devices) == 1:
            call_args = on_card(call_args, devices[0])
        else:  # as `pipeline.prepare` places them for a mesh: images split, the rest replicated
            mesh = Mesh(np.array(devices), (DATA_AXIS,))
            split, replicated = NamedSharding(mesh, PartitionSpec(DATA_AXIS)), NamedSharding(mesh, PartitionSpec())
            plan = dataclasses.replace(plan, batch_sharding=split)
            w, x_T, cond, *rest = call_args
            call_args = (on_card(w, replicated), on_card(x_T, split), on_card(cond, split), *on_card(rest, replicated))
        programs.append((plan, call_args))
    times = {text: [] for text in strategies}
    collectives = {}  # strategy -> cross-chip ops in its program (sample() should need none)
    for _ in range(args.rounds):
        for text, (plan, call_args) in zip(strategies, programs):
            jax.clear_caches()
            start = time.perf_counter()
            with attention_implementation(attention_for(args.card, dtype)):
                compiled = _run.lower(*call_args, plan=plan).compile()
            times[text].append(time.perf_counter() - start)
            collectives[text] = len(COLLECTIVE.findall(compiled.as_text()))
    where = CARDS[args.card]["name"] + (f" x {len(devices)} chips, batch split over them" if len(devices) > 1 else "")
    print(f"# {args.variant} sampler, {args.image_size} px, batch {args.batch} with guidance, {args.steps} steps, "
          f"bf16, compiled for {where} on this host (no card: jax {jax.__version__}, deviceless; "
          f"median of {args.rounds} compiles from scratch, round-robin)\n")
    print("| strategy | compile s | rounds | vs baseline | cross-chip ops |")
    print("|---|---|---|---|---|")
    base = statistics.median(times[strategies[0]])
    for text in strategies:
        median = statistics.median(times[text])
        print(f"| {text} | {median:.2f} | {', '.join(f'{t:.2f}' for t in times[text])} | {median / base:.2f}x "
              f"| {collectives[text] if len(devices) > 1 else '-'} |")


# ---------------------------------------------------------------------------------------------
# memory

def memory(args) -> None:
    import jax
    import jax.numpy as jnp

    from dit_jax.bench import random_condition
    from dit_jax.models import pixart
    from dit_jax.models.t5 import T5_V1_1_XXL, T5Encoder
    from dit_jax.models.vae import AutoencoderKL, VAEConfig
    from dit_jax.nn.attention import attention_implementation
    from dit_jax.pipeline import _run, prepare
    from dit_jax.prompts import _encode
    from dit_jax.weights import BundleConfig, Weights, component_dtype

    device = card_device(args.card)
    # What load(dtype="auto") keeps on that card, with the T5 encoder in bf16 and under float16
    # the VAE in float32 (weights.component_dtype).
    half = half_dtype(args.card)
    dtypes = {"dit": half, "t5": component_dtype("text_encoder", half), "vae": component_dtype("vae", half)}

    nbytes = lambda tree: sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))  # noqa: E731
    t5_cfg, vae_cfg = T5_V1_1_XXL, VAEConfig()
    t5 = parameters_on_card(T5Encoder, t5_cfg, dtypes["t5"], device)
    vae = parameters_on_card(AutoencoderKL, vae_cfg, dtypes["vae"], device)
    card = CARDS[args.card]
    print(f"# PixArt-alpha XL/2 pipeline compiled for {card['name']} ({card['memory'] / GiB:.1f} GiB; no card: "
          f"jax {jax.__version__}, deviceless), transformer {jnp.dtype(dtypes['dit']).name}, T5 "
          f"{jnp.dtype(dtypes['t5']).name}, VAE {jnp.dtype(dtypes['vae']).name}, attention "
          f"{args.attention or attention_for(args.card, dtypes['dit'])}; batch {args.batch} with guidance, "
          f"{args.steps} DPM-Solver++ steps, VAE decode\n")
    print("| size | weights GiB: T5 / transformer / VAE | T5 encode (2 prompts): temporaries GiB "
          "| sampler to latents: temporaries GiB | sampler + VAE decode: baseline / sdtm=True | "
          "encode-then-drop: peak GiB | T5 kept: peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        cfg = pixart.variant(f"PixArt-alpha-XL/2-{size}")
        dit = parameters_on_card(pixart.PixArt, cfg, dtypes["dit"], device)
        config = BundleConfig(dit=cfg, vae=vae_cfg, text_encoder=t5_cfg)
        w = Weights(dit=dit, vae=vae, text_encoder=t5, config=config)
        ids = on_card(jax.ShapeDtypeStruct((2, cfg.max_text_length), jnp.int32), device)
        encode = _encode.lower(w, ids, ids).compile().memory_analysis()
        sample_w = dataclasses.replace(w, text_encoder=None)
        cond = jax.tree.map(lambda a: a.astype(dtypes["dit"]), random_condition(cfg, args.batch, seed=0))
        uncond = jax.tree.map(lambda a: a.astype(dtypes["dit"]), random_condition(cfg, 1, seed=1))
        temps = {}  # (sdtm, output) -> bytes of temporaries and outputs
        for sdtm, output in ((False, "latents"), (False, "images"), (True, "images")):
            plan, call_args = prepare(sample_w, cond, sdtm=sdtm, steps=args.steps, output=output,
                                      negative_prompt=uncond)
            with attention_implementation(args.attention or attention_for(args.card, dtypes["dit"])):
                analysis = _run.lower(*on_card(call_args, device), plan=plan).compile().memory_analysis()
            temps[sdtm, output] = (analysis.temp_size_in_bytes + analysis.output_size_in_bytes) / GiB
        weights_gib = [nbytes(t5) / GiB, nbytes(dit) / GiB, nbytes(vae) / GiB]
        encode_gib = (encode.temp_size_in_bytes + encode.output_size_in_bytes) / GiB
        sample_gib = max(temps.values())
        drop = max(sum(weights_gib) + encode_gib, weights_gib[1] + weights_gib[2] + sample_gib)
        keep = sum(weights_gib) + max(encode_gib, sample_gib)
        print(f"| {size} | {' / '.join(f'{v:.2f}' for v in weights_gib)} | {encode_gib:.2f} | "
              f"{temps[False, 'latents']:.2f} | {temps[False, 'images']:.2f} / {temps[True, 'images']:.2f} | "
              f"{drop:.2f} | {keep:.2f} |", flush=True)
    print("\nPeaks: the weights on the card plus the larger program's temporaries and outputs (XLA's buffer "
          "assignment); encode-then-drop holds every weight while encoding, then the transformer and VAE while "
          "sampling. " + ("Not counted: what the TPU runtime keeps of the chip's HBM." if is_tpu(args.card) else
                          "JAX lets itself use 75% of a card by default (XLA_PYTHON_CLIENT_MEM_FRACTION)."))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    k = sub.add_parser("kernels", help="what each DiT block launches on the card, per strategy")
    k.add_argument("--card", choices=sorted(CARDS), default="h200")
    k.add_argument("--variant", default="DiT-XL/2")
    k.add_argument("--image-size", type=int, default=512)
    k.add_argument("--batch", type=int, default=8)
    k.add_argument("--strategies", default="baseline,ssm:0.5,ssm:0.5*4,idm:0.5,idm:ratio=0.5,merge_sum=matmul,"
                                           "idm:0.5*4,tome:0.5,tome:ratio=0.5,merge_sum=matmul")
    c = sub.add_parser("compile", help="the sampler's compile time for the card, per strategy (first: the reference)")
    c.add_argument("--card", choices=sorted(CARDS), default="h200")
    c.add_argument("--variant", default="DiT-XL/2")
    c.add_argument("--image-size", type=int, default=512)
    c.add_argument("--batch", type=int, default=8)
    c.add_argument("--steps", type=int, default=20)
    c.add_argument("--rounds", type=int, default=3)
    c.add_argument("--chips", type=int, default=1, help="TPUs: compile for a slice of this many chips (1, 4, 8)")
    c.add_argument("--strategies", default="baseline,sdtm,sdtm:max_phases=2,tome:0.5")
    m = sub.add_parser("memory", help="device memory of the PixArt pipeline's programs on the card")
    m.add_argument("--card", choices=sorted(CARDS), default="t4")
    m.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], choices=[256, 512, 1024])
    m.add_argument("--batch", type=int, default=1)
    m.add_argument("--steps", type=int, default=20)
    m.add_argument("--attention", choices=["xla", "cudnn", "chunked"],
                   help="the transformer's attention (default: what `auto` picks on that card)")
    args = ap.parse_args()
    {"kernels": kernels, "compile": compile_times, "memory": memory}[args.command](args)


if __name__ == "__main__":
    main()
