"""Shared pieces of the PyTorch -> orbax converters: reading state dicts, checking keys and shapes."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np


class ConversionError(ValueError):
    """A checkpoint does not have the layout a converter expects. The message lists every problem."""


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict (`.pt`/`.pth`/`.bin`, loaded with weights_only=True) or a
    `.safetensors` file into float32-or-native NumPy arrays keyed by name."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file")
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ConversionError("reading .safetensors needs `pip install safetensors`") from e
        try:
            return dict(load_file(path))
        except Exception as e:
            raise ConversionError(f"{path}: not a readable safetensors file ({e})") from e
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConversionError(
            f"reading {path} needs PyTorch: pip install 'dit-jax[convert]' (or use a .safetensors file)"
        ) from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConversionError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    # Training checkpoints wrap the weights: {"model": ..., "ema": ...}. Prefer the EMA weights.
    if isinstance(obj, Mapping) and not any(hasattr(v, "shape") for v in obj.values()):
        for wrapper in ("ema", "model", "state_dict"):
            if isinstance(obj.get(wrapper), Mapping):
                obj = obj[wrapper]
                break
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: expected a state dict, found {type(obj).__name__}")
    out = {}
    for name, tensor in obj.items():
        if not hasattr(tensor, "detach"):
            raise ConversionError(f"{path}: entry {name!r} is a {type(tensor).__name__}, not a tensor")
        t = tensor.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        out[name] = t.numpy()
    return out


def check_state_dict(
    source: str,
    got: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
) -> None:
    """Raise a ConversionError naming every missing key, unexpected key and shape mismatch."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    mismatched = [
        f"  {k}: checkpoint has {tuple(got[k])}, expected {tuple(expected[k])}"
        for k in sorted(set(got) & set(expected))
        if tuple(got[k]) != tuple(expected[k])
    ]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{source} does not match the expected layout:"]
    if missing:
        lines.append(f"missing keys ({len(missing)}):")
        lines += [f"  {k}" for k in missing]
    if unexpected:
        lines.append(f"unexpected keys ({len(unexpected)}):")
        lines += [f"  {k}" for k in unexpected]
    if mismatched:
        lines.append(f"shape mismatches ({len(mismatched)}):")
        lines += mismatched
    raise ConversionError("\n".join(lines))


def torch_linear(weight: np.ndarray) -> np.ndarray:
    """PyTorch Linear weight [out, in] -> Flax kernel [in, out]."""
    return np.ascontiguousarray(weight.T)


def torch_conv(weight: np.ndarray) -> np.ndarray:
    """PyTorch Conv2d weight [out, in, kh, kw] -> Flax kernel [kh, kw, in, out]."""
    return np.ascontiguousarray(weight.transpose(2, 3, 1, 0))
