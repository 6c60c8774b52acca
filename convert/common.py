"""Shared pieces of the PyTorch -> orbax converters: reading state dicts, checking keys and shapes."""

from __future__ import annotations

import json
import os
import struct
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from dit_jax.weights import layout_mismatch

GetTensor = Callable[[str], np.ndarray]

# Weight files of a model directory, in the order they are looked for.
TRANSFORMERS_WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
)
DIFFUSERS_WEIGHT_FILES = (
    "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json",
)


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


def output_taken(out: Path, force: bool) -> bool:
    """True (and the error printed) when a converter's OUT exists and --force was not given."""
    if out.exists() and not force:
        print(f"error: {out} exists; pass --force to overwrite it", file=sys.stderr)
        return True
    return False


class ArraySpill:
    """Parks converted arrays in files under `directory` and hands back read-only memory maps of
    them, so a converter's output need not fit in memory: the 4.7B-parameter T5-XXL is 8.9 GiB in
    bfloat16, more than a free Colab machine's RAM once the process's own share is added. The
    pages of a memory map are the kernel's to drop and reread, so saving the bundle afterwards
    reads them back from disk instead of holding them all. The caller removes `directory`.

        spill = ArraySpill(tmp_dir)
        kept = spill(np.ones((4, 4), np.float32))   # an np.memmap with the same values
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def __call__(self, array: np.ndarray) -> np.ndarray:
        array = np.asarray(array)
        if array.size == 0:
            return array  # a memory map cannot be empty
        path = self.directory / f"{self.count:06d}.bin"
        self.count += 1
        target = np.memmap(path, dtype=array.dtype, mode="w+", shape=array.shape)
        target[...] = array
        target.flush()
        del target
        return np.memmap(path, dtype=array.dtype, mode="r", shape=array.shape)


def check_state_dict(
    source: str,
    got: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
) -> None:
    """Raise a ConversionError naming every missing key, unexpected key and shape mismatch."""
    message = layout_mismatch(source, got, expected, found="checkpoint has")
    if message:
        raise ConversionError(message)


def torch_linear(weight: np.ndarray) -> np.ndarray:
    """PyTorch Linear weight [out, in] -> Flax kernel [in, out]."""
    return np.ascontiguousarray(weight.T)


def torch_conv(weight: np.ndarray) -> np.ndarray:
    """PyTorch Conv2d weight [out, in, kh, kw] -> Flax kernel [kh, kw, in, out]."""
    return np.ascontiguousarray(weight.transpose(2, 3, 1, 0))


def open_weights_dir(path: str | os.PathLike, weight_files: tuple[str, ...]) -> tuple[dict[str, tuple[int, ...]], GetTensor]:
    """A model directory's weights, read lazily: (every key with its shape, get_tensor(key)).

    Looks for the first of `weight_files` (TRANSFORMERS_WEIGHT_FILES or DIFFUSERS_WEIGHT_FILES):
    a safetensors file, a sharded one through its .index.json, or a PyTorch .bin (weights_only,
    memory-mapped). No tensor is read until asked for, so a converter can cast and store one
    tensor at a time; bfloat16 tensors come back as ml_dtypes.bfloat16.
    """
    path = Path(path)
    weight_file = next((path / n for n in weight_files if (path / n).is_file()), None)
    if weight_file is None:
        raise ConversionError(f"{path}: no weights (looked for {', '.join(weight_files)})")
    files = _shards(weight_file) if weight_file.name.endswith(".index.json") else {weight_file: None}
    reader = _read_safetensors if ".safetensors" in weight_file.name else _read_torch
    keys_and_shapes: dict[str, tuple[int, ...]] = {}
    getters: dict[str, GetTensor] = {}
    for file, keys in files.items():
        shapes, get = reader(file)
        if keys is not None and not keys <= set(shapes):
            absent = sorted(keys - set(shapes))
            raise ConversionError(f"{file}: the index lists {len(absent)} keys this shard lacks, e.g. {absent[:3]}")
        keys_and_shapes.update(shapes)
        getters.update(dict.fromkeys(shapes, get))

    def get_tensor(key: str) -> np.ndarray:
        if key not in getters:
            raise ConversionError(f"{path}: no tensor {key!r}")
        return getters[key](key)

    return keys_and_shapes, get_tensor


def _shards(index_file: Path) -> dict[Path, set[str]]:
    """Shard file -> the keys the index puts in it."""
    try:
        weight_map = json.loads(index_file.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise ConversionError(f"{index_file}: not a weights index with a weight_map ({e})") from e
    shards: dict[Path, set[str]] = {}
    for key, name in weight_map.items():
        shards.setdefault(index_file.parent / name, set()).add(key)
    absent = [p.name for p in shards if not p.is_file()]
    if absent:
        raise ConversionError(f"{index_file} names shards that are not there: {', '.join(sorted(absent))}")
    return shards


def _read_safetensors(file: Path) -> tuple[dict[str, tuple[int, ...]], GetTensor]:
    try:
        from safetensors import safe_open
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConversionError("reading .safetensors needs `pip install safetensors` (dit-jax[convert])") from e
    try:
        with safe_open(file, framework="np") as f:
            info = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype()) for k in f.keys()}
    except Exception as e:
        raise ConversionError(f"{file}: not a readable safetensors file ({e})") from e

    def get(key: str) -> np.ndarray:
        try:
            if info[key][1] == "BF16":  # NumPy has no bfloat16: read the bytes and view them as ml_dtypes'
                return _read_bf16(file, key)
            with safe_open(file, framework="np") as f:
                return f.get_tensor(key)
        except Exception as e:
            raise ConversionError(f"{file}: cannot read {key} ({type(e).__name__}: {e})") from e

    return {k: shape for k, (shape, _) in info.items()}, get


def _read_bf16(file: Path, key: str) -> np.ndarray:
    """One BF16 tensor of a safetensors file (8-byte header size, JSON header, raw data)."""
    with open(file, "rb") as fh:
        (header_size,) = struct.unpack("<Q", fh.read(8))
        entry = json.loads(fh.read(header_size))[key]
        start, end = entry["data_offsets"]
        fh.seek(8 + header_size + start)
        data = np.fromfile(fh, dtype="<u2", count=(end - start) // 2)
    return data.view(ml_dtypes.bfloat16).reshape(entry["shape"])


def _read_torch(file: Path) -> tuple[dict[str, tuple[int, ...]], GetTensor]:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConversionError(f"reading {file.name} needs PyTorch: pip install 'dit-jax[convert]'") from e
    try:
        try:  # memory-mapped: tensors are read when converted
            sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
            sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConversionError(f"{file}: not a readable PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConversionError(f"{file}: expected a state dict of tensors, found {type(sd).__name__}")

    def get(key: str) -> np.ndarray:
        t = sd[key].detach()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()

    return {k: tuple(v.shape) for k, v in sd.items()}, get
