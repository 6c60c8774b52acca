"""Frequency priority: a per-token counter carried through the blocks and the steps.

SDTM raises the merge priority of tokens by how their counter compares with the mean,
P_fre = counter / mean(counter) per sample. The counter is updated on every block call that
merges (as the official release does), in one of two readings:

  "independent" (the paper's wording, "time since last merged"): +1 while a token stays on its
      own, reset to 0 when it is merged. Tokens left alone for long get merged next: rotation.
  "merged" (the official release's `last_independent`): +1 while a token is inside a merged
      group, reset to 0 when it stays on its own. Tokens already merged tend to stay merged.

A token counts as merged when its group holds more than one token (a destination that no
source joined is independent). The release also counts such idle destinations of its detail
stage as merged; here the plan decides.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FREQUENCY_MODES = ("independent", "merged")


def frequency_priority(counter: jax.Array) -> jax.Array:
    """counter f32 [B, N] -> counter / mean(counter) per sample; 0 where the mean is 0.

    0 for an all-zero row (the first call) adds nothing to any score, so the first ranking is
    by similarity alone, the same as with the priority switched off.
    """
    mean = jnp.mean(counter, axis=1, keepdims=True)
    safe = jnp.where(mean > 0, mean, 1.0)
    return jnp.where(mean > 0, counter / safe, 0.0)


def update_counter(counter: jax.Array, merged: jax.Array, mode: str) -> jax.Array:
    """One block call's update. counter f32 [B, N], merged bool [B, N] -> new counter."""
    if mode == "independent":
        return jnp.where(merged, 0.0, counter + 1.0)
    if mode == "merged":
        return jnp.where(merged, counter + 1.0, 0.0)
    raise ValueError(f"frequency mode must be one of {FREQUENCY_MODES} or None, got {mode!r}")
