"""A stand-in for a jax device, with what dit_jax.devices reads of one."""

from __future__ import annotations

import dataclasses


def client(platform_version: str = "cuda 12080"):
    return type("Client", (), {"platform_version": platform_version})()


@dataclasses.dataclass
class FakeDevice:
    compute_capability: str = "9.0"
    platform: str = "gpu"
    client: object = dataclasses.field(default_factory=client)
