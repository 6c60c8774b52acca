"""The quality harness's report (`dit_jax.evaluate`): one `Row` per configuration, the markdown
table with its rule-of-thumb verdicts, and the PNG (each metric against the measured speed-up,
then a strip of samples per configuration).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from dit_jax.data import CLASS_NAMES


@dataclasses.dataclass
class Row:
    name: str
    note: str
    definition: str
    samples: int
    speedup: float | None
    seconds_per_image: float | None
    compile_s: float | None
    attn_share: float | None
    mlp_share: float | None
    adherence: float
    fd_classifier: float
    kid_classifier: tuple[float, float]
    fd_efflite: float | None = None
    kid_efflite: tuple[float, float] | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _fmt_kid(kid: tuple[float, float] | None) -> str:
    if kid is None:
        return "–"
    mean, se = kid
    text = f"{1e3 * mean:.2f}"
    return text if math.isnan(se) else f"{text} ± {1e3 * se:.2f}"


def keeps_quality(row: Row, base: Row, real: Row | None) -> bool:
    """The table's rule of thumb: adherence within 3 points of the baseline's, and each FD
    (classifier, and EffLite0 when computed) at most the baseline's plus half the baseline's gap to
    the real-image floor (plus 25% of the baseline's without a floor)."""
    if row.adherence < base.adherence - 0.03:
        return False
    for metric in ("fd_classifier", "fd_efflite"):
        value, reference = getattr(row, metric), getattr(base, metric)
        if value is None or reference is None:
            continue
        floor = None if real is None else getattr(real, metric)
        slack = 0.25 * reference if floor is None else 0.5 * max(reference - floor, 0.0)
        if value > reference + slack:
            return False
    return True


def summary_lines(rows: list[Row]) -> list[str]:
    """Which merged rows keep quality by the rule of thumb, fastest first (generated, not judged)."""
    base = rows[0]
    real = next((r for r in rows if r.speedup is None), None)
    merged = sorted((r for r in rows[1:] if r.speedup is not None), key=lambda r: -r.speedup)
    kept = [r for r in merged if keeps_quality(r, base, real)]
    lost = [r for r in merged if not keeps_quality(r, base, real)]

    def names(group: list[Row]) -> str:
        return ", ".join(f"{r.name} ({r.speedup:.2f}x, {100 * r.adherence:.0f}%)" for r in group) or "none"

    return [f"Keep quality, fastest first (speed-up, adherence): {names(kept)}.",
            "", f"Lose quality: {names(lost)}."]


def markdown_report(rows: list[Row], context: dict) -> str:
    base = rows[0]
    real = next((r for r in rows if r.speedup is None), None)
    has_eff = any(r.fd_efflite is not None for r in rows)
    lines = [
        f"# Quality against measured speed-up: SDTM and ToMe on {context.get('title', 'the shipped Fashion-MNIST DiT')}",
        "",
        f"Made by `{context['command']}` on {context['date']} ({context['machine']}).",
        "",
        f"Model: {context['model']}; {context['steps']} {context.get('sampler', 'DDIM')} steps, guidance "
        f"{context['cfg_scale']}, {context['num_samples']} samples per configuration ({context.get('prompts', 'prompts')} "
        f"balanced over the 10 classes, batch {context['batch_size']}, batch i seeded {context['seed']}+i in every configuration, so all "
        f"rows start from the same noise). Speed-up: the baseline's median time over each configuration's median, "
        f"{context['repeats']} timed calls each of the same compiled sampler (compile time apart), one per round, "
        "every configuration in every round. Reference: "
        f"{context['reference_size']} Fashion-MNIST test images (balanced).",
        "",
        f"Judges: the shipped classifier (`dit_jax/assets/fashion-classifier`, test accuracy "
        f"{context['classifier_accuracy']}); FD-classifier in its 128-d penultimate features; "
        + (f"FD-EffLite0 in ImageNet EfficientNet-Lite0 features (1280-d, images upsampled to "
           f"{context['efflite_size']} px; not FID). " if has_eff else "FD-EffLite0 not computed (--skip-efflite). ")
        + "KID x 10^3 (unbiased polynomial-kernel MMD^2 on features divided by the reference's RMS value, "
        "± standard error over 5 folds of the samples): unlike FD it is not biased by the sample count.",
        "",
        "| config | speed-up | s / image | attn / MLP tokens | adherence | FD-classifier | KID-classifier x10^3 "
        "| FD-EffLite0 | KID-EffLite0 x10^3 | samples | keeps quality |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        tokens = "–" if row.attn_share is None else f"{100 * row.attn_share:.0f}% / {100 * row.mlp_share:.0f}%"
        keep = "" if row is base or row is real else ("yes" if keeps_quality(row, base, real) else "no")
        speed = "–" if row.speedup is None else f"{row.speedup:.2f}x"
        lines.append(
            f"| {row.name} | {speed} | {_fmt(row.seconds_per_image, 3)} | {tokens} | {100 * row.adherence:.1f}% "
            f"| {_fmt(row.fd_classifier)} | {_fmt_kid(row.kid_classifier)} | {_fmt(row.fd_efflite)} "
            f"| {_fmt_kid(row.kid_efflite)} | {row.samples} | {keep} |"
        )
    lines += [
        "",
        "\"keeps quality\": adherence within 3 points of the baseline's, and each FD at most the baseline's plus "
        "half the baseline's gap to the test-image floor (a rule of thumb for reading the table, not a test). "
        "At small sample counts compare KID (± its standard error) rather than FD.",
        "",
        *summary_lines(rows),
        "",
        "![quality against speed-up](" + context["png_name"] + ")",
        "",
        "## Configurations",
        "",
    ]
    for row in rows:
        note = f" — {row.note}" if row.note and row.note != row.definition else ""
        lines.append(f"- **{row.name}**: {row.definition}{note}")
    for target, search in (context.get("tome_searches") or {}).items():
        lines += ["", f"## ToMe ratio search: {target}", "",
                  f"Target: {target}'s speed-up, {search['target']:.3f}x (during the search). Probes (ratio: "
                  f"speed-up, the median of {search.get('calls_per_probe', 2)} timed calls against the baseline's "
                  "calls in the same rounds):", ""]
        lines += [f"- {p['ratio']:.4f}: {p['speedup']:.3f}x" for p in search["probes"]]
        verdict = (f"chosen ratio {search['ratio']:.4f}" + ("" if search["reached"] else
                   f" (closest; no probe came within {100 * search['tolerance']:.0f}% — ToMe merges at most 75% of "
                   "the attention tokens with 2x2 windows and nothing of the MLP, so it may not reach SDTM's speed)"))
        lines += ["", verdict + "."]
    lines += ["", "Compile seconds (one compile each, in this order, so not a fair ratio between them; "
              "`python -m dit_jax.bench --compile-rounds` measures that): " + ", ".join(f"{r.name} {r.compile_s:.1f}" for r in rows if r.compile_s is not None)]
    return "\n".join(lines) + "\n"


_FAMILY_COLOURS = {"baseline": (0, 0, 0), "sdtm": (200, 40, 40), "tome": (30, 90, 200), "real": (20, 140, 60)}


def _family(name: str) -> str:
    if name == "baseline":
        return "baseline"
    if name.startswith("tome"):
        return "tome"
    if name == "test images":
        return "real"
    return "sdtm"


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def draw_panel(rows: list[Row], metric: str, title: str, size=(460, 340)):
    """One scatter plot: `metric` of each row against its speed-up; the real-data row as a
    dashed horizontal line."""
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 60, 20, 30, 45
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font, small = _font(13), _font(10)
    points = [(r.speedup, getattr(r, metric), r) for r in rows if r.speedup is not None and getattr(r, metric) is not None]
    floor = next((getattr(r, metric) for r in rows if r.speedup is None and getattr(r, metric) is not None), None)
    draw.text((left, 8), title, fill="black", font=font)
    if not points:
        return image
    xs = [p[0] for p in points]
    ys = [p[1] for p in points] + ([floor] if floor is not None else [])
    x_lo, x_hi = min(xs + [1.0]), max(xs + [1.0])
    y_lo, y_hi = min(ys + [0.0]), max(ys)
    x_pad, y_pad = max(0.05, 0.08 * (x_hi - x_lo)), max(1e-9, 0.08 * (y_hi - y_lo))
    x_lo, x_hi, y_lo, y_hi = x_lo - x_pad, x_hi + x_pad, y_lo, y_hi + y_pad

    def to_px(x, y):
        return (left + (x - x_lo) / (x_hi - x_lo) * (width - left - right),
                height - bottom - (y - y_lo) / (y_hi - y_lo) * (height - top - bottom))

    draw.line([(left, top), (left, height - bottom), (width - right, height - bottom)], fill="black")
    for i in range(5):  # ticks
        xv = x_lo + (x_hi - x_lo) * i / 4
        yv = y_lo + (y_hi - y_lo) * i / 4
        px, _ = to_px(xv, y_lo)
        _, py = to_px(x_lo, yv)
        draw.line([(px, height - bottom), (px, height - bottom + 4)], fill="black")
        draw.text((px - 12, height - bottom + 6), f"{xv:.2f}", fill="black", font=small)
        draw.line([(left - 4, py), (left, py)], fill="black")
        draw.text((4, py - 6), f"{yv:.3g}", fill="black", font=small)
    draw.text(((width - left) // 2 + 10, height - 16), "measured speed-up (x)", fill="black", font=small)
    if floor is not None:
        _, py = to_px(x_lo, floor)
        for x0 in range(left, width - right, 10):
            draw.line([(x0, py), (min(x0 + 5, width - right), py)], fill=_FAMILY_COLOURS["real"])
        draw.text((width - right - 70, py - 13), "test images", fill=_FAMILY_COLOURS["real"], font=small)
    taken: list[tuple[float, float, float, float]] = []  # label boxes drawn so far
    for x, y, row in sorted(points, key=lambda p: (p[0], -p[1])):
        px, py = to_px(x, y)
        colour = _FAMILY_COLOURS[_family(row.name)]
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=colour)
        tx, ty = px + 6, py - 6
        text_w = draw.textlength(row.name, font=small)
        if tx + text_w > width - 2:  # no room on the right: label to the left of the point
            tx = px - 6 - text_w
        box = (tx, ty, tx + text_w, ty + 11)
        while any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in taken):
            ty += 11  # step down past labels already drawn there
            box = (tx, ty, tx + text_w, ty + 11)
        taken.append(box)
        draw.text((tx, ty), row.name, fill=colour, font=small)
    return image


def sample_strip(rows_images: list[tuple[str, np.ndarray]], per_row: int = 10, scale: int = 2):
    """One row of the first `per_row` samples (one per class) per configuration, labelled."""
    from PIL import Image, ImageDraw

    label_w, gap = 150, 2
    side = 32 * scale
    image = Image.new("RGB", (label_w + per_row * (side + gap), len(rows_images) * (side + gap) + 20), "white")
    draw = ImageDraw.Draw(image)
    font = _font(12)
    for i, name in enumerate(CLASS_NAMES[:per_row]):
        draw.text((label_w + i * (side + gap), 3), name[:11], fill="black", font=_font(10))
    for r, (name, images) in enumerate(rows_images):
        y = 20 + r * (side + gap)
        draw.text((4, y + side // 2 - 7), name, fill=_FAMILY_COLOURS[_family(name)], font=font)
        for i, img in enumerate(images[:per_row]):
            tile = Image.fromarray(img[..., 0]).resize((side, side), Image.NEAREST).convert("RGB")
            image.paste(tile, (label_w + i * (side + gap), y))
    return image


def quality_figure(rows: list[Row], samples: list[tuple[str, np.ndarray]]):
    """The PNG: adherence / FD-classifier / FD-EffLite0 against speed-up, then a strip of samples."""
    from PIL import Image

    panels = [draw_panel(rows, "adherence", "prompt adherence (share) vs speed-up"),
              draw_panel(rows, "fd_classifier", "FD-classifier vs speed-up (lower is better)")]
    if any(r.fd_efflite is not None for r in rows):
        panels.append(draw_panel(rows, "fd_efflite", "FD-EffLite0 vs speed-up (lower is better)"))
    strip = sample_strip(samples)
    width = max(sum(p.width for p in panels), strip.width)
    figure = Image.new("RGB", (width, panels[0].height + strip.height + 10), "white")
    x = 0
    for p in panels:
        figure.paste(p, (x, 0))
        x += p.width
    figure.paste(strip, (0, panels[0].height + 10))
    return figure
