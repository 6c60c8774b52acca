"""Host memory of converting and loading a full-size PixArt pipeline, measured (not estimated).

Writes a PixArt-alpha XL/2 512 px pipeline in the diffusers layout with random float32 weights
at the real sizes (T5-XXL encoder 4.76 B numbers in sharded safetensors, the transformer, the SD
VAE, a tiny tokenizer), then runs, each in its own process under `/usr/bin/time`:

  convert  python -m convert.pixart BUNDLE --pipeline PIPELINE    (T5 stored bfloat16)
  load     dit_jax.load(BUNDLE, dtype=jnp.bfloat16), then the bytes of the loaded tree, and
           XLA's memory analysis of the compiled 20-step sampler and of the T5 encoder call

and prints each one's peak memory and wall time. On a CPU the loaded arrays live in host memory,
so `load`'s peak is the loaded tree plus whatever load holds on the way; on a GPU the arrays go to
the card and the host keeps only the latter. XLA's memory analysis comes from this machine's
backend (a CPU's differs from a GPU's where the CPU computes bfloat16 in float32).

    python docs/pipeline_memory.py /tmp/pixart-memory     (40 GiB of disk, 6 min on a 2-core VM)
    python docs/pipeline_memory.py /tmp/pixart-memory --keep     (keep the files for a rerun;
        --skip-convert then measures load alone)

An experiment, not an API. `--t5-layers N` shrinks the encoder (a quick check of the script).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from convert.pixart_transformer import pixart_expected_shapes
from convert.t5 import t5_expected_shapes
from convert.vae import expected_shapes as vae_expected_shapes
from dit_jax.models import pixart
from dit_jax.models.t5 import T5_V1_1_XXL
from dit_jax.models.vae import VAEConfig

SHARD_BYTES = 2 << 30  # transformers' shards are larger; the converter does not care


def write_safetensors(folder: Path, stem: str, shapes: dict[str, tuple[int, ...]], rng) -> int:
    """Random float32 tensors of `shapes` as folder/stem.safetensors, or as shards with an index
    when over SHARD_BYTES (the layout transformers and diffusers save). Returns the bytes written."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    size = 0
    for key, shape in shapes.items():
        nbytes = 4 * int(np.prod(shape))
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = shape
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"{stem}.safetensors" if len(shards) == 1 else f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for key, shape in shard.items():
            tensors[key] = rng.standard_normal(shape, dtype=np.float32)
            tensors[key] *= 0.02
            weight_map[key] = name
            total += tensors[key].nbytes
        save_file(tensors, str(folder / name))
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def write_tokenizer(folder: Path) -> None:
    """A tiny sentencepiece model with T5's special ids (its vocabulary does not matter here)."""
    import io

    import sentencepiece

    text = ["a photo of a corgi on the beach", "a bowl of ramen, studio lighting", "a red fox in the snow"]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(text * 20), model_writer=model, vocab_size=30, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())


def write_pipeline(root: Path, t5_layers: int) -> dict[str, int]:
    """The diffusers PixArtAlphaPipeline folder `convert.pixart --pipeline` reads. Returns bytes per part."""
    rng = np.random.default_rng(0)
    cfg = pixart.variant("PixArt-alpha-XL/2-512")
    t5 = dataclasses.replace(T5_V1_1_XXL, num_layers=t5_layers)
    vae = VAEConfig()

    t5_shapes = {k: s for k, s in t5_expected_shapes(t5).items() if k != "encoder.embed_tokens.weight"}
    (root / "text_encoder").mkdir(parents=True, exist_ok=True)
    (root / "text_encoder" / "config.json").write_text(json.dumps({
        "architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": t5.vocab_size,
        "d_model": t5.d_model, "d_kv": t5.d_kv, "d_ff": t5.d_ff, "num_layers": t5.num_layers,
        "num_heads": t5.num_heads, "feed_forward_proj": t5.feed_forward_proj,
        "relative_attention_num_buckets": t5.relative_attention_num_buckets,
        "relative_attention_max_distance": t5.relative_attention_max_distance,
        "layer_norm_epsilon": t5.layer_norm_epsilon,
    }))
    (root / "transformer").mkdir(parents=True, exist_ok=True)
    (root / "transformer" / "config.json").write_text(json.dumps({
        "_class_name": "PixArtTransformer2DModel", "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.hidden_size // cfg.num_heads, "in_channels": cfg.in_channels,
        "out_channels": 2 * cfg.in_channels, "num_layers": cfg.depth, "cross_attention_dim": cfg.hidden_size,
        "attention_bias": True, "sample_size": cfg.input_size, "patch_size": cfg.patch_size,
        "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False, "norm_eps": 1e-6, "caption_channels": cfg.caption_channels,
        "attention_type": "default", "interpolation_scale": cfg.interpolation_scale,
    }))
    (root / "vae").mkdir(parents=True, exist_ok=True)
    (root / "vae" / "config.json").write_text(json.dumps({
        "_class_name": "AutoencoderKL", "in_channels": vae.in_channels, "out_channels": vae.out_channels,
        "latent_channels": vae.latent_channels, "block_out_channels": list(vae.block_out_channels),
        "layers_per_block": vae.layers_per_block, "norm_num_groups": vae.norm_num_groups,
        "scaling_factor": vae.scaling_factor, "act_fn": "silu",
        "down_block_types": ["DownEncoderBlock2D"] * len(vae.block_out_channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(vae.block_out_channels),
    }))
    write_tokenizer(root / "tokenizer")
    sizes = {
        "text_encoder": write_safetensors(root / "text_encoder", "model", t5_shapes, rng),
        "transformer": write_safetensors(root / "transformer", "diffusion_pytorch_model", pixart_expected_shapes(cfg), rng),
        "vae": write_safetensors(root / "vae", "diffusion_pytorch_model", vae_expected_shapes(vae), rng),
    }
    (root / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}))  # last: complete
    return sizes


# Run in a fresh process: load the bundle in bfloat16, report the tree's bytes and XLA's memory
# analysis of the sampler (batch 1, 20 steps, guidance) and of one T5 call.
LOAD = r"""
import json, sys, time
import jax, jax.numpy as jnp
from dit_jax import load
from dit_jax.pipeline import _run, prepare
from dit_jax.prompts import _encode
start = time.perf_counter()
w = load(sys.argv[1], dtype=jnp.bfloat16)
jax.block_until_ready(w)
seconds = time.perf_counter() - start
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
nbytes = {name: sum(a.nbytes for a in jax.tree.leaves(getattr(w, name))) for name in ("dit", "text_encoder", "vae")}
print("LOAD " + json.dumps({"seconds": seconds, "bytes": nbytes, "peak": int(status["VmHWM"].split()[0]) * 1024}), flush=True)
def analysis(name, compiled):
    m = compiled.memory_analysis()
    sizes = {k: getattr(m, k + "_size_in_bytes") for k in ("argument", "output", "temp")}
    print("XLA " + json.dumps({"name": name, **sizes}), flush=True)
length, width = w.config.dit.max_text_length, w.config.text_encoder.d_model
ids = jnp.zeros((2, length), jnp.int32)
analysis("the T5 encoder (a prompt and the empty one)", _encode.lower(w, ids, jnp.ones_like(ids)).compile())
text = {"text": jnp.zeros((1, length, width), jnp.bfloat16), "text_mask": jnp.ones((1, length), jnp.int32)}
for name, sdtm in (("the sampler (batch 1, 512 px, 20 steps with guidance, VAE decode)", False), ("the same with sdtm=True", True)):
    plan, args = prepare(w, text, sdtm=sdtm, steps=20, output="images", negative_prompt=text)
    analysis(name, _run.lower(*args, plan=plan).compile())
"""


def measured(command: list[str], label: str, check: bool = True) -> tuple[float, float, float, str, int]:
    """Run `command`, reading its /proc status every 20 ms: (peak anonymous GiB, peak resident GiB,
    wall s, output, return code; check: exit when it fails). Anonymous memory is what the process allocated; resident adds the pages of
    memory-mapped files it touched (the safetensors it reads), which the kernel can drop at will."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, text=True)
        anon = rss = 0
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                fields = dict(line.split(":", 1) for line in status.read_text().splitlines())
                anon = max(anon, int(fields["RssAnon"].split()[0]))
                rss = max(rss, int(fields["VmRSS"].split()[0]))
            except (OSError, KeyError, ValueError):
                pass
            time.sleep(0.02)
        wall = time.perf_counter() - start
        out.seek(0)
        text = out.read()
    if proc.returncode and check:
        sys.exit(f"{label} failed (rc {proc.returncode}):\n{text[-3000:]}")
    return anon / 2**20, rss / 2**20, wall, text, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--t5-layers", type=int, default=T5_V1_1_XXL.num_layers)
    ap.add_argument("--keep", action="store_true", help="keep the pipeline and bundle (reused by the next run)")
    ap.add_argument("--skip-convert", action="store_true", help="measure load only, on a bundle kept by --keep")
    args = ap.parse_args()
    pipeline, bundle = args.workdir / "pipeline", args.workdir / "bundle"
    GiB = 2**30
    if not (pipeline / "model_index.json").is_file():
        start = time.perf_counter()
        sizes = write_pipeline(pipeline, args.t5_layers)
        print(f"wrote {pipeline} in {time.perf_counter() - start:.0f} s: "
              + ", ".join(f"{k} {v / GiB:.2f} GiB" for k, v in sizes.items()), flush=True)
    if args.skip_convert and (bundle / "config.json").is_file():
        print(f"reusing {bundle}")
    else:
        shutil.rmtree(bundle, ignore_errors=True)
        anon, rss, wall, out, _ = measured(
            [sys.executable, "-m", "convert.pixart", str(bundle), "--pipeline", str(pipeline)], "convert")
        print(next(x for x in out.splitlines() if x.startswith("wrote ")))
        print(f"convert: peak anonymous {anon:.2f} GiB (resident with mapped files {rss:.2f} GiB), {wall:.0f} s",
              flush=True)
    anon, rss, wall, out, rc = measured([sys.executable, "-c", LOAD, str(bundle)], "load", check=False)
    lines = [json.loads(x.split(" ", 1)[1]) for x in out.splitlines() if x.startswith(("LOAD ", "XLA "))]
    if not lines:
        sys.exit(f"load failed:\n{out[-3000:]}")
    report = lines[0]
    print(f"load(dtype=bfloat16): peak resident {report['peak'] / GiB:.2f} GiB during load(), {report['seconds']:.0f} s; "
          f"the loaded tree {sum(report['bytes'].values()) / GiB:.2f} GiB: "
          + ", ".join(f"{k} {v / GiB:.2f}" for k, v in report["bytes"].items()))
    for m in lines[1:]:
        print(f"XLA's memory analysis of {m['name']}: arguments {m['argument'] / GiB:.2f} GiB, "
              f"temporaries {m['temp'] / GiB:.3f} GiB, outputs {m['output'] / 2**20:.1f} MiB")
    print(f"the load process: peak anonymous {anon:.2f} GiB, {wall:.0f} s (rc {rc})")
    if not args.keep:
        shutil.rmtree(args.workdir)


if __name__ == "__main__":
    main()
