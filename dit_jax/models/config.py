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
