"""Prompts -> conditioning. Class models: ImageNet class names (with their WordNet synonyms), a
checkpoint's own class names, or plain integer ids. Text models (PixArt): the bundle's tokenizer
and T5 encoder, run once per prompt batch, before the denoising loop."""

from __future__ import annotations

import difflib
import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

_IMAGENET_FILE = Path(__file__).parent / "assets" / "imagenet_classes.json"

Prompt = str | int


@functools.lru_cache(maxsize=1)
def imagenet_class_names() -> tuple[tuple[str, ...], ...]:
    """For each of the 1000 ImageNet classes, its names (the first is the usual label)."""
    data = json.loads(_IMAGENET_FILE.read_text())
    return tuple(tuple(n) for n in data["names"])


@functools.lru_cache(maxsize=8)
def _name_table(class_names: tuple[tuple[str, ...], ...]) -> dict[str, tuple[int, ...]]:
    table: dict[str, list[int]] = {}
    for class_id, names in enumerate(class_names):
        for name in names:
            ids = table.setdefault(name.lower(), [])
            if class_id not in ids:
                ids.append(class_id)
    return {k: tuple(v) for k, v in table.items()}


def class_id(prompt: Prompt, class_names: Sequence[str] | None = None, num_classes: int | None = None) -> int:
    """One prompt -> one class id.

    class_names: the checkpoint's names (one per class); None means ImageNet with synonyms.
    Names are case-insensitive. An unknown name raises a ValueError with the three closest names.
    """
    groups = imagenet_class_names() if class_names is None else tuple((n,) for n in class_names)
    count = len(groups) if num_classes is None else num_classes
    if isinstance(prompt, (int, np.integer)) and not isinstance(prompt, bool):
        if not 0 <= prompt < count:
            raise ValueError(f"class id {prompt} is out of range: this model has classes 0..{count - 1}")
        return int(prompt)
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt is a class name or an int id, got {type(prompt).__name__}")
    text = prompt.strip()
    if re.fullmatch(r"-?[0-9]+", text):  # an id given as text ("207", "-1"; not "³", which isdigit() calls one)
        return class_id(int(text), class_names, num_classes)
    table = _name_table(groups)
    ids = table.get(text.lower())
    if ids is None:
        close = difflib.get_close_matches(text.lower(), list(table), n=3, cutoff=0.0)
        shown = ", ".join(repr(_display(c, groups, table)) for c in close)
        raise ValueError(f"unknown class name {prompt!r}; closest valid names: {shown}")
    if len(ids) > 1:
        options = "; ".join(f"{i} ({', '.join(groups[i][:2])})" for i in ids)
        raise ValueError(f"{prompt!r} names several classes: {options}. Pass the class id instead.")
    return ids[0]


def _display(lower: str, groups, table) -> str:
    """The name as written in the class list (the table is keyed lower-case)."""
    for name in groups[table[lower][0]]:
        if name.lower() == lower:
            return name
    return lower


def class_ids(
    prompts: Prompt | Sequence[Prompt], class_names: Sequence[str] | None = None, num_classes: int | None = None
) -> np.ndarray:
    """A prompt or a list of prompts -> int32 class ids (B,)."""
    if isinstance(prompts, (str, int, np.integer)):
        prompts = [prompts]
    if len(prompts) == 0:
        raise ValueError("no prompt given")
    return np.asarray([class_id(p, class_names, num_classes) for p in prompts], np.int32)


def class_label(class_index: int, class_names: Sequence[str] | None = None) -> str:
    """Human-readable name of a class id."""
    return imagenet_class_names()[class_index][0] if class_names is None else class_names[class_index]


@functools.lru_cache(maxsize=4)
def _tokenizer(directory: str):
    from dit_jax.tokenizer import Tokenizer

    return Tokenizer.from_dir(directory)


@jax.jit
def _encode(weights, input_ids: jax.Array, attention_mask: jax.Array) -> jax.Array:
    from dit_jax.weights import text_encoder_module

    return text_encoder_module(weights)(input_ids, attention_mask)


def text_condition(weights, prompts: Sequence[str], negative_prompt: str | None = "") -> tuple[dict, dict | None]:
    """Text prompts -> the conditioning a text-conditioned transformer takes (see `denoise`).

    Returns (cond for the B prompts, cond for `negative_prompt` (one row), or None when
    negative_prompt is None): {"text": (B, L, D) T5 embeddings in the transformer's dtype,
    "text_mask": (B, L) int32}, plus "resolution" (B, 2) and "aspect_ratio" (B, 1) (the sampled
    image's pixels) for models with micro-conditions. L is the model's max_text_length; longer
    prompts are truncated with a warning. Prompts are lower-cased and stripped, as PixArt's
    diffusers pipeline does without its optional caption cleaning.
    """
    config = weights.config
    if not config.text_conditioned:
        raise ValueError(f"this {config.family} model is class-conditioned: use class_ids")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"a text-conditioned model takes text prompts, got {bad[0]!r} ({type(bad[0]).__name__})")
    # PixArt's pipeline lower-cases and strips prompts (its optional caption cleaning, which needs
    # bs4 and ftfy, is not reproduced: diffusers itself falls back to this without them).
    texts = [t.lower().strip() for t in list(prompts) + ([] if negative_prompt is None else [negative_prompt])]
    input_ids, mask = _tokenizer(config.tokenizer_dir)(texts, max_length=config.dit.max_text_length)
    text = _encode(weights, jnp.asarray(input_ids), jnp.asarray(mask)).astype(jax.tree.leaves(weights.dit)[0].dtype)
    cond = {"text": text, "text_mask": jnp.asarray(mask, jnp.int32)}
    if config.dit.use_additional_conditions:
        side = float(config.image_size)
        cond["resolution"] = jnp.full((len(texts), 2), side, jnp.float32)  # (height, width) in pixels
        cond["aspect_ratio"] = jnp.ones((len(texts), 1), jnp.float32)  # height / width: square
    b = len(prompts)
    split = jax.tree.map(lambda a: (a[:b], a[b:]), cond)
    first = {k: v[0] for k, v in split.items()}
    rest = None if negative_prompt is None else {k: v[1] for k, v in split.items()}
    return first, rest
