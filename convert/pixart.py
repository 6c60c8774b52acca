"""Convert a PixArt-alpha / PixArt-Sigma checkpoint (diffusers layout) into a dit-jax bundle.

    python -m convert.pixart ckpts/pixart-512 --pipeline PixArt-XL-2-512x512/
    python -m convert.pixart ckpts/pixart-sigma-1024 --transformer PixArt-Sigma-XL-2-1024-MS/transformer \
        --text-encoder PixArt-alpha/text_encoder --tokenizer PixArt-alpha/tokenizer --vae sdxl-vae/

The bundle holds the transformer, the T5 encoder, the VAE and the tokenizer's own files. Tensors
are converted one at a time (T5-XXL is 4.7 B parameters), and the converted T5 waits on disk, in
a folder beside OUT that is removed at the end, until the bundle is saved: the process's memory
is the transformer and VAE trees plus a few tensors. The text encoder is stored in bfloat16 by
default (8.9 GiB instead of 17.7 GiB), the transformer and VAE in float32. Nothing is written
unless everything converts.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from convert.common import DIFFUSERS_WEIGHT_FILES, ArraySpill, ConversionError, open_weights_dir, output_taken
from convert.pixart_transformer import convert_pixart_transformer, infer_pixart_config
from convert.t5 import convert_t5, read_t5_dir

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
# The T5 token limit each pipeline pads to (not stored in the transformer's config).
PIPELINE_TEXT_LENGTH = {"PixArtAlphaPipeline": 120, "PixArtSigmaPipeline": 300}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def component_dirs(args: argparse.Namespace) -> dict[str, Path]:
    """transformer / text_encoder / tokenizer / vae folders from --pipeline and the per-part flags
    (a per-part flag wins over the pipeline's subfolder)."""
    parts = {}
    for name in ("transformer", "text_encoder", "tokenizer", "vae"):
        given = getattr(args, name)
        if given is None and args.pipeline is not None:
            given = Path(args.pipeline) / name
        if given is None:
            flag = "--" + name.replace("_", "-")
            raise ConversionError(f"no {name}: pass {flag} DIR, or --pipeline DIR holding {name}/")
        if not Path(given).is_dir():
            raise ConversionError(f"{name}: {given} is not a directory")
        parts[name] = Path(given)
    return parts


def text_length(args: argparse.Namespace) -> int | None:
    """--max-text-length, else the pipeline class's (model_index.json), else None (inferred)."""
    if args.max_text_length is not None:
        if args.max_text_length < 1:
            raise ConversionError(f"--max-text-length must be >= 1, got {args.max_text_length}")
        return args.max_text_length
    if args.pipeline is not None and (Path(args.pipeline) / "model_index.json").is_file():
        pipeline_class = _read_json(Path(args.pipeline) / "model_index.json").get("_class_name")
        return PIPELINE_TEXT_LENGTH.get(pipeline_class)
    return None


def convert_pixart(args: argparse.Namespace, log=print, store=None):
    """Read and convert every component -> the Weights bundle (nothing written yet). store: where
    the T5 encoder's converted arrays are kept (see `convert.t5.convert_t5`; None: in memory)."""
    from dit_jax.tokenizer import Tokenizer
    from dit_jax.weights import BundleConfig, Weights

    from convert.vae import convert_vae

    parts = component_dirs(args)
    notes: list[str] = []

    hf_config = {}
    if (parts["transformer"] / "config.json").is_file():
        hf_config = _read_json(parts["transformer"] / "config.json")
    else:
        notes.append(f"{parts['transformer']} has no config.json: the configuration is inferred from the shapes")
    length = text_length(args)
    if length is not None:
        hf_config["max_text_length"] = length
    shapes, get_tensor = open_weights_dir(parts["transformer"], DIFFUSERS_WEIGHT_FILES)
    cfg = infer_pixart_config(shapes, hf_config, notes=notes)
    log(f"transformer: {cfg.depth} blocks, hidden {cfg.hidden_size}, {cfg.num_heads} heads, patch {cfg.patch_size}, "
        f"latent {cfg.input_size}x{cfg.input_size} ({cfg.num_tokens} tokens), micro-conditions "
        f"{cfg.use_additional_conditions}, {cfg.max_text_length} text tokens")
    transformer = convert_pixart_transformer(get_tensor, shapes, cfg, DTYPES[args.dtype])

    t5_cfg, t5_shapes, t5_get = read_t5_dir(parts["text_encoder"])
    if t5_cfg.d_model != cfg.caption_channels:
        raise ConversionError(
            f"the text encoder is {t5_cfg.d_model} wide but the transformer's caption projection takes "
            f"{cfg.caption_channels}: these do not belong together"
        )
    log(f"text encoder: T5 with {t5_cfg.num_layers} layers, width {t5_cfg.d_model}, stored {args.text_encoder_dtype}")
    text_encoder = convert_t5(t5_get, t5_shapes, t5_cfg, DTYPES[args.text_encoder_dtype],
                              source=str(parts["text_encoder"]), store=store)

    tokenizer = Tokenizer.from_dir(parts["tokenizer"])  # fails here, not at sampling time, if unreadable
    log(f"tokenizer: {tokenizer.source} ({tokenizer.backend})")

    vae_cfg, vae_params = convert_vae(parts["vae"])
    if vae_cfg.latent_channels != cfg.in_channels:
        raise ConversionError(
            f"the VAE has {vae_cfg.latent_channels} latent channels, the transformer takes {cfg.in_channels}"
        )
    vae_params = jax.tree.map(lambda a: np.asarray(a, DTYPES[args.dtype]), vae_params)
    log(f"VAE: scaling factor {vae_cfg.scaling_factor}")

    info = {"converted_from": {k: str(v) for k, v in parts.items()}, "layout": "diffusers", "notes": notes}
    config = BundleConfig(dit=cfg, vae=vae_cfg, info_json=json.dumps(info), text_encoder=t5_cfg,
                          tokenizer_dir=str(parts["tokenizer"]))
    return Weights(dit=transformer, vae=vae_params, config=config, text_encoder=text_encoder), notes


def main(argv: list[str] | None = None) -> int:
    from dit_jax.weights import save

    ap = argparse.ArgumentParser(prog="python -m convert.pixart", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="output weights directory")
    ap.add_argument("--pipeline", help="a diffusers PixArt pipeline folder (transformer/, text_encoder/, tokenizer/, vae/)")
    ap.add_argument("--transformer", help="PixArtTransformer2DModel folder (config.json + weights)")
    ap.add_argument("--text-encoder", dest="text_encoder", help="T5EncoderModel folder (sharded safetensors are fine)")
    ap.add_argument("--tokenizer", help="T5 tokenizer folder (tokenizer.json or spiece.model)")
    ap.add_argument("--vae", help="AutoencoderKL folder")
    ap.add_argument("--max-text-length", type=int,
                    help="T5 tokens per prompt (alpha 120, Sigma 300; default: from model_index.json)")
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="float32", help="transformer and VAE on disk")
    ap.add_argument("--text-encoder-dtype", choices=tuple(DTYPES), default="bfloat16", help="T5 on disk")
    ap.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    args = ap.parse_args(argv)

    out = Path(args.out)
    if output_taken(out, args.force):
        return 2
    start = time.perf_counter()
    try:  # the inputs first: a folder made for OUT would outlive a missing input
        component_dirs(args)
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
    except (ConversionError, ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    spill = Path(tempfile.mkdtemp(prefix=f".{out.name}.arrays.", dir=out.absolute().parent))
    try:
        weights, notes = convert_pixart(args, store=ArraySpill(spill))
        for note in notes:
            print(f"note: {note}")
        save(weights, out, force=args.force)
        counts = {name: sum(np.size(a) for a in jax.tree.leaves(getattr(weights, name)))
                  for name in ("dit", "text_encoder", "vae")}
    except (ConversionError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    print(f"wrote {out}: transformer {counts['dit']:,}, text encoder {counts['text_encoder']:,}, "
          f"VAE {counts['vae']:,} numbers, in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
