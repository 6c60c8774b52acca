"""Fashion-MNIST from its four idx files, read with NumPy (no torch, no downloads).

The files come from the Debian package `dataset-fashion-mnist`
(`apt-get install dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist), or from
any folder named by the environment variable DIT_JAX_DATA. Gzip'd (`*.gz`) and plain idx files
both work.

    images, labels = load_fashion_mnist("train")   # uint8 (60000, 32, 32, 1), int32 (60000,)
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

# Label id -> name, in the dataset's own order.
CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)

# Captions of the text-conditioned toy model (`python -m dit_jax.train --family pixart`): every
# class name in each template; the first template is the one evaluations prompt with.
CAPTION_TEMPLATES: tuple[str, ...] = ("a photo of a {}", "a {}", "a picture of a {}", "an image of a {}")


def caption(label: int, template: int = 0) -> str:
    """The caption of class `label` in template `template` ("a photo of a sneaker")."""
    return CAPTION_TEMPLATES[template].format(CLASS_NAMES[label])


DATA_ENV_VAR = "DIT_JAX_DATA"
DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = (
    "Install them with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or set "
    f"{DATA_ENV_VAR} to a folder holding the four idx files "
    "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
    "t10k-labels-idx1-ubyte; gzip'd with .gz or plain)."
)
# Fashion-MNIST is 28x28; 2 px of zero border each side gives 32x32, which a patch-2 DiT turns
# into a 16x16 token grid.
PAD = 2
_FILE_STEMS = {"train": "train", "test": "t10k"}
# idx magic: two zero bytes, a type code (0x08 = unsigned byte), then the number of dimensions.
_UBYTE_TYPE = 0x08


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The folder to read: `root` if given, else $DIT_JAX_DATA if set, else the Debian package's."""
    if root is not None:
        return Path(root)
    env = os.environ.get(DATA_ENV_VAR)
    return Path(env) if env else DEFAULT_ROOT


def _find(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def available(split: str = "train", root: str | os.PathLike | None = None) -> bool:
    """Whether both idx files of `split` are where `load_fashion_mnist` would look (cheap: no read)."""
    folder = data_root(root)
    stem = _FILE_STEMS[split]
    return all(_find(folder, f"{stem}-{kind}") is not None for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """One idx file (gzip'd if its name ends in .gz) -> uint8 array of the shape its header gives."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _UBYTE_TYPE:
        raise ValueError(f"{path} is not an unsigned-byte idx file (bad magic {raw[:4]!r})")
    ndim = raw[3]
    header_end = 4 + 4 * ndim
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape)) + header_end
    if len(raw) != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes), file has {len(raw)} bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_end).reshape(shape)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images, zero-padded to 32x32, and their labels.

    Args:
        split: "train" (60,000 images) or "test" (10,000).
        root: folder of the idx files; default $DIT_JAX_DATA, else /usr/share/datasets/fashion-mnist.

    Returns:
        images uint8 (N, 32, 32, 1) NHWC, the 28x28 originals centred in a 2 px zero border;
        labels int32 (N,) in 0..9, names in `CLASS_NAMES`.

    Raises:
        ValueError: an unknown split, or files that are not what Fashion-MNIST should be.
        FileNotFoundError: the files are missing (the message says where it looked and how to install them).
    """
    if split not in _FILE_STEMS:
        raise ValueError(f"unknown split {split!r}; choose 'train' or 'test'")
    folder = data_root(root)
    stem = _FILE_STEMS[split]
    names = (f"{stem}-images-idx3-ubyte", f"{stem}-labels-idx1-ubyte")
    found = [_find(folder, name) for name in names]
    missing = [name for name, path in zip(names, found) if path is None]
    if missing:
        source = "root argument" if root is not None else (
            f"${DATA_ENV_VAR}" if os.environ.get(DATA_ENV_VAR) else "default location"
        )
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files not found: looked for "
            + ", ".join(f"{name}[.gz]" for name in missing)
            + f" in {folder} ({source}). {INSTALL_HINT}"
        )
    images, labels = (read_idx(path) for path in found)
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{found[0]}: expected (N, 28, 28) images, got {images.shape}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{found[1]}: {labels.shape[0]} labels for {images.shape[0]} images")
    if labels.max(initial=0) >= len(CLASS_NAMES):
        raise ValueError(f"{found[1]}: label {labels.max()} is out of range 0..{len(CLASS_NAMES) - 1}")
    padded = np.pad(images, ((0, 0), (PAD, PAD), (PAD, PAD)))  # (N, 32, 32), zero border
    return padded[..., None], labels.astype(np.int32)
