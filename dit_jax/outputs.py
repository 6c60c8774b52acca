"""Output files of the command lines, checked before the work that fills them."""

from __future__ import annotations

import os
from pathlib import Path


def check_output(flag: str, path: str | os.PathLike, *, suffix: str | None = None) -> Path:
    """Raise a ValueError unless `path` (given as `flag`) can be written: not a folder, ending in
    `suffix` when one is asked for, its folder made if missing and a file there writable (probed
    by opening it for appending; a file the probe made is removed again). Returns it as a Path."""
    path = Path(path)
    if suffix is not None and path.suffix.lower() != suffix:
        raise ValueError(f"{flag} {path}: give a file name ending in {suffix}")
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file name")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab"):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write it ({e.strerror or e})") from e
    if not existed:
        path.unlink()
    return path
