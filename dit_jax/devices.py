"""What the accelerator can do: its CUDA compute capability, and the half-precision dtype it
computes fastest (`load(path, dtype="auto")`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# The compute dtypes the command lines take by name (`--dtype`).
DTYPE_NAMES = ("float32", "bfloat16", "float16")


def cuda_capability(device=None) -> tuple[int, int] | None:
    """(major, minor) compute capability of a CUDA GPU (default: the first device of the default
    backend); None for a CPU, a TPU or a ROCm GPU."""
    device = jax.devices()[0] if device is None else device
    if device.platform != "gpu" or "cuda" not in str(getattr(device.client, "platform_version", "")).lower():
        return None
    try:
        major, minor = (int(part) for part in str(device.compute_capability).split(".")[:2])
    except (AttributeError, ValueError):
        return None
    return major, minor


def auto_dtype(device=None):
    """The dtype to run a model in on `device` (default: the first device of the default backend):
    bfloat16 on TPUs and on CUDA GPUs of compute capability 8.0 (Ampere) or newer; float16 on
    older CUDA GPUs (a T4, a V100), which have float16 tensor cores but none for bfloat16 (XLA
    then computes bfloat16 matmuls in float32); float32 on CPUs and other GPUs."""
    device = jax.devices()[0] if device is None else device
    if device.platform == "tpu":
        return jnp.bfloat16
    capability = cuda_capability(device)
    if capability is None:
        return jnp.float32
    return jnp.bfloat16 if capability >= (8, 0) else jnp.float16
