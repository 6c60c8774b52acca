"""What every model config shares: frozen dataclasses that copy, serialise and validate their fields."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar


class ModelConfig:
    """Mixin for a frozen dataclass config: replace, to_dict, and from_dict that names unknown fields."""

    family_name: ClassVar[str] = "model"  # in error messages: "unknown DiT config fields ..."

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown {cls.family_name} config fields {unknown}; valid fields: {sorted(names)}")
        return cls(**d)


class PatchGridConfig(ModelConfig):
    """A diffusion-transformer config (fields input_size, patch_size): the token grid they make."""

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, columns) of patch tokens, row-major."""
        side = self.input_size // self.patch_size
        return side, side

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1]
