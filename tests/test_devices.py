"""dit_jax.devices: a device's CUDA compute capability and the dtype `load(dtype="auto")` picks."""

import jax
import jax.numpy as jnp
import pytest
from device_testing import FakeDevice, client

from dit_jax.devices import auto_dtype, cuda_capability


def test_cuda_capability_of_cuda_gpus_only():
    assert cuda_capability(FakeDevice("8.6")) == (8, 6) and cuda_capability(FakeDevice("10.0")) == (10, 0)
    assert cuda_capability(FakeDevice("9.0", client=client("rocm 6.3"))) is None
    assert cuda_capability(FakeDevice("9.0", platform="tpu")) is None
    assert cuda_capability(jax.devices("cpu")[0]) is None


@pytest.mark.parametrize("device,dtype", [
    (FakeDevice("7.5"), jnp.float16),  # T4: float16 tensor cores, none for bfloat16
    (FakeDevice("7.0"), jnp.float16),  # V100
    (FakeDevice("8.0"), jnp.bfloat16),  # A100
    (FakeDevice("9.0"), jnp.bfloat16),  # H100
    (FakeDevice("9.0", platform="tpu"), jnp.bfloat16),
    (FakeDevice("9.0", client=client("rocm 6.3")), jnp.float32),
])
def test_auto_dtype_by_device(device, dtype):
    assert auto_dtype(device) == dtype


def test_load_auto_is_float32_on_cpu_and_bad_dtypes_are_refused():
    from dit_jax import load

    assert {a.dtype for a in jax.tree.leaves(load(dtype="auto"))} == {jnp.dtype(jnp.float32)}
    for bad in ("bf16", jnp.int8):
        with pytest.raises(ValueError, match="is not a floating-point dtype"):
            load(dtype=bad)
