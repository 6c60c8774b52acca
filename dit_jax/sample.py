"""Command line: sample images for class or text prompts, optionally with SDTM or ToMe beside the baseline.

    python -m dit_jax.sample "sneaker" "dress" "bag" --sdtm          # the shipped model, both rows
    python -m dit_jax.sample "golden retriever" --weights ckpts/dit-xl-2-256 --steps 250 --sampler ddpm
    python -m dit_jax.sample "a photo of a cat" --weights ckpts/pixart-512 --bf16 --sdtm   # text (PixArt)

Prints the compile time and the sampling time of each row apart, and writes a PNG grid (one row
per method) with the prompts in its metadata.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import sdtm as sdtm_lib
from dit_jax.diffusion.samplers import SAMPLER_NAMES
from dit_jax.outputs import check_output
from dit_jax.pipeline import compile_and_run, prepare
from dit_jax.prompts import class_ids, class_label
from dit_jax.weights import load, use_compilation_cache


def image_grid(rows: list[np.ndarray]) -> np.ndarray:
    """rows of uint8 (B, H, W, C) images -> one (rows*H, B*W, C) image with 2-px white gaps."""
    gap = 2
    b, h, w, c = rows[0].shape
    grid = np.full((len(rows) * (h + gap) - gap, b * (w + gap) - gap, c), 255, np.uint8)
    for r, row in enumerate(rows):
        for i, img in enumerate(row):
            grid[r * (h + gap): r * (h + gap) + h, i * (w + gap): i * (w + gap) + w] = img
    return grid


def write_png(path: Path, image: np.ndarray, metadata: dict[str, str]) -> None:
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_text(key, value)
    mode = "L" if image.shape[-1] == 1 else "RGB"
    Image.fromarray(image[..., 0] if mode == "L" else image, mode=mode).save(path, pnginfo=info)


# SDTM's own flags: set without --sdtm they would change nothing.
SDTM_FLAGS = ("ratio", "deviation", "switch_step", "plan_every", "protect_every", "cache_weight", "prompt_weight")


def _check_args(args) -> None:
    """Refuse what the command would otherwise ignore or find out only after sampling."""
    defaults = _parser()
    given = [f"--{name.replace('_', '-')}" for name in SDTM_FLAGS if getattr(args, name) != defaults.get_default(name)]
    if given and not args.sdtm:
        raise ValueError(f"{', '.join(given)} set(s) the SDTM row: add --sdtm")
    shared = [flag for flag, on in (("--proportional-attention", args.proportional_attention),
                                    ("--merge-sum", args.merge_sum is not None)) if on]
    if shared and not (args.sdtm or args.tome is not None):
        raise ValueError(f"{', '.join(shared)} set(s) the SDTM and ToMe rows: add --sdtm or --tome RATIO")
    if args.no_baseline and not (args.sdtm or args.tome is not None):
        raise ValueError("--no-baseline leaves no row: add --sdtm or --tome RATIO")
    if args.num_images is not None:
        if args.num_images < 1:
            raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
        if len(args.prompts) > 1:
            raise ValueError(f"--num-images repeats one prompt; {len(args.prompts)} prompts were given (one image each)")
    check_output("--out", args.out, suffix=".png")  # a PNG: the prompts go into its metadata


def _methods(args) -> list[tuple[str, object]]:
    methods: list[tuple[str, object]] = [("baseline", False)]
    shared = {"proportional_attention": args.proportional_attention}  # settings of both methods
    if args.merge_sum is not None:
        shared["merge_sum"] = args.merge_sum
    if args.sdtm:
        settings = {"plan_every": args.plan_every, "protect_every": args.protect_every, "cache_weight": args.cache_weight}
        if args.ratio is not None:
            settings["ratio"] = args.ratio
        if args.deviation is not None:
            settings["deviation"] = args.deviation
        if args.switch_step is not None:
            settings["switch_step"] = args.switch_step
        if args.prompt_weight is not None:
            settings["prompt_weight"] = tuple(args.prompt_weight)
        methods.append(("sdtm", sdtm_lib.SDTMConfig(**settings, **shared)))
    if args.tome is not None:
        methods.append((f"tome {args.tome}", sdtm_lib.ToMeConfig(ratio=args.tome, **shared)))
    if args.no_baseline and len(methods) > 1:
        methods = methods[1:]
    return methods


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dit_jax.sample", description=__doc__.split("\n\n")[0])
    ap.add_argument("prompts", nargs="+", help="class names or ids (class models) or texts (text models), one image each")
    ap.add_argument("--weights", help="weights directory (default: the model shipped in the package)")
    ap.add_argument("--sampler", choices=SAMPLER_NAMES, help="default: the model family's (DiT ddim, PixArt dpm++)")
    ap.add_argument("--steps", type=int, help="default: the family's (DiT 50, PixArt 20)")
    ap.add_argument("--cfg", type=float, help="classifier-free guidance scale, 1 = off (default: DiT 4.0, PixArt 4.5)")
    ap.add_argument("--negative-prompt", default="", help="text models: what guidance steers away from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-images", type=int, help="images per prompt when one prompt is given")
    ap.add_argument("--sdtm", action="store_true", help="add a row sampled with SDTM (defaults)")
    ap.add_argument("--ratio", type=float, help="SDTM compression ratio (default 0.5)")
    ap.add_argument("--deviation", type=float, help="SDTM: the ratio falls from ratio + deviation to ratio - deviation "
                                                    "(default 0.2)")
    ap.add_argument("--switch-step", type=float, help="SDTM: fraction of the steps in the structure stage (default 0.4)")
    ap.add_argument("--plan-every", type=int, default=1, help="SDTM: blocks sharing one merge plan")
    ap.add_argument("--protect-every", type=int, help="SDTM: a full-resolution step every K steps (official release: 3)")
    ap.add_argument("--cache-weight", type=float, default=1.0,
                    help="SDTM: merged tokens' share of their own output against the protected steps' (release: 0.1)")
    ap.add_argument("--prompt-weight", type=float, nargs=2, metavar=("STRUCTURE", "DETAIL"),
                    help="SDTM on text models: the prompt's weight in each stage (default 1 1: off)")
    ap.add_argument("--proportional-attention", action="store_true",
                    help="SDTM and ToMe: merged attention keys weigh as many as the tokens they hold (log group size)")
    ap.add_argument("--merge-sum", choices=sdtm_lib.ops.MERGE_SUMS,
                    help="SDTM (IDM) and ToMe: sum merged tokens by a scatter-add (default) or a 0/1 matmul (no scatter)")
    ap.add_argument("--tome", type=float, metavar="RATIO", help="add a row with ToMe merging this fraction")
    ap.add_argument("--no-baseline", action="store_true", help="skip the baseline row")
    ap.add_argument("--compile-cache", metavar="DIR", help="persistent compilation cache folder (reused across runs)")
    precision = ap.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bfloat16 weights and compute (accelerators)")
    precision.add_argument("--fp16", action="store_true",
                           help="float16 (GPUs without bfloat16 tensor cores: T4, V100; T5 stays bf16, the VAE float32)")
    ap.add_argument("--out", default="samples.png", help="PNG file to write")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    try:
        import jax.numpy as jnp

        _check_args(args)
        methods = _methods(args)
        if args.compile_cache:
            use_compilation_cache(args.compile_cache)
        weights = load(args.weights, dtype=jnp.bfloat16 if args.bf16 else jnp.float16 if args.fp16 else None)
        names = weights.config.class_names
        prompts: list = list(args.prompts)
        if len(prompts) == 1 and args.num_images:
            prompts = prompts * args.num_images
        if weights.config.text_conditioned:
            shown = prompts
        else:
            prompts = [int(i) for i in class_ids(prompts, names, weights.config.dit.num_classes)]
            shown = [class_label(i, names) for i in prompts]
        # Every row checked before any compiles: a bad setting fails now, not after the baseline.
        prepared = [(label, *prepare(
            weights, prompts, sdtm=method, sampler=args.sampler, steps=args.steps, cfg_scale=args.cfg,
            seed=args.seed, progress=(args.steps or 0) >= 100, negative_prompt=args.negative_prompt,
        )) for label, method in methods]
        rows, timings = [], []
        for label, plan, call_args in prepared:
            print(f"{label}: compiling {len(plan.phases)} phase(s) "
                  f"{[(p.strategy, p.merge_count, p.stop - p.start) for p in plan.phases]}", flush=True)
            images, compile_s, run_s = compile_and_run(plan, call_args)
            print(f"{label}: compile {compile_s:.1f}s, sampling {run_s:.2f}s "
                  f"({plan.sampler.num_steps} {plan.sampler.name} steps, {len(prompts)} image(s))", flush=True)
            rows.append(images)
            timings.append((label, compile_s, run_s))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    base = timings[0][2]
    if len(timings) > 1 and timings[0][0] == "baseline":
        for label, _, run_s in timings[1:]:
            print(f"{label}: {base / run_s:.2f}x the baseline's speed (one run each; use dit_jax.bench for medians)")
    out = Path(args.out)  # checked, its folder made, before loading (_check_args)
    meta = {
        "prompts": json.dumps(shown),
        "rows": json.dumps([t[0] for t in timings]),
        "settings": json.dumps({"sampler": plan.sampler.name, "steps": plan.sampler.num_steps, "cfg": args.cfg,
                                "seed": args.seed}),
    }
    write_png(out, image_grid(rows), meta)
    print(f"wrote {out}: rows {', '.join(t[0] for t in timings)}; prompts {', '.join(json.loads(meta['prompts']))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
