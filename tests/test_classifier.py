"""The Fashion-MNIST judge (dit_jax.classifier): shapes and parameter tree, a short run that
learns, bundles that round-trip and say what is wrong, and the shipped bundle itself."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from flax import nnx

from dit_jax import classifier, data


def _class_coded(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images whose class is a bright bar at a class-dependent row, plus noise."""
    rng = np.random.default_rng(seed)
    labels = (np.arange(n) % 10).astype(np.int32)
    images = rng.integers(0, 60, (n, 32, 32, 1)).astype(np.uint8)
    for i, label in enumerate(labels):
        images[i, 3 + 2 * label: 5 + 2 * label, 4:28, 0] = 255
    return images, labels


def test_forward_shapes_and_parameter_tree():
    model = classifier.init_classifier()
    images, _ = _class_coded(4)
    logits, feats = model(images)
    assert logits.shape == (4, 10) and feats.shape == (4, 128)
    assert float(feats.min()) >= 0.0  # ReLU features
    shapes = {"/".join(map(str, k)): tuple(v.shape) for k, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert shapes == {
        "convs/0/kernel": (3, 3, 1, 32), "convs/0/bias": (32,),
        "convs/1/kernel": (3, 3, 32, 64), "convs/1/bias": (64,),
        "convs/2/kernel": (3, 3, 64, 128), "convs/2/bias": (128,),
        "hidden/kernel": (2048, 128), "hidden/bias": (128,),
        "head/kernel": (128, 10), "head/bias": (10,),
    }
    assert classifier.count_params(model) == 356_234
    # dropout touches the head's input only: same features, other logits
    dropped, same_feats = model(images, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(same_feats), np.asarray(feats))
    assert not np.allclose(np.asarray(dropped), np.asarray(logits))


def test_config_errors():
    with pytest.raises(ValueError, match="not divisible by 2\\^3"):
        classifier.ClassifierConfig(image_size=20)
    with pytest.raises(ValueError, match="dropout"):
        classifier.ClassifierConfig(dropout=1.0)
    with pytest.raises(ValueError, match="unknown classifier config keys"):
        classifier.ClassifierConfig.from_dict({"width": 3})
    with pytest.raises(ValueError, match="at least one batch"):
        classifier.fit(*_class_coded(8), classifier.FitConfig(batch_size=16))


def test_short_training_decreases_the_loss_and_round_trips(tmp_path):
    images, labels = _class_coded(256)
    fit = classifier.FitConfig(epochs=3, batch_size=32, lr=3e-3, warmup=2)
    model, losses = classifier.fit(images, labels, fit, log=None)
    assert len(losses) == 3 * 256 // 32
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4]), losses
    assert classifier.accuracy(model, images, labels) > 0.5  # chance is 0.1

    path = classifier.save_classifier(model, tmp_path / "clf", {"test_accuracy": 0.5})
    again = classifier.load_classifier(path)
    a, b = classifier.classify(model, images[:7], batch_size=4), classifier.classify(again, images[:7], batch_size=4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[0].shape == (7, 10) and a[1].shape == (7, 128)
    assert classifier.bundle_info(path) == {"test_accuracy": 0.5}

    # a bundle whose arrays do not fit the config says which one
    stored = dict(np.load(path / "params.npz"))
    stored["hidden/kernel"] = stored["hidden/kernel"][:10]
    np.savez(path / "params.npz", **stored)
    with pytest.raises(ValueError, match="hidden/kernel has shape"):
        classifier.load_classifier(path)


def test_load_and_classify_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m dit_jax.classifier --out"):
        classifier.load_classifier(tmp_path)
    with pytest.raises(ValueError, match="takes \\(N, 32, 32, 1\\) images"):
        classifier.classify(classifier.init_classifier(), np.zeros((2, 28, 28, 1), np.uint8))
    assert classifier.main(["--out", str(tmp_path / "x"), "--epochs", "0"]) == 2


def test_shipped_bundle():
    path = classifier.DEFAULT_CLASSIFIER
    size = sum(f.stat().st_size for f in path.iterdir())
    assert size <= 2 * 1024 * 1024, f"shipped classifier is {size} bytes"
    info = json.loads((path / "config.json").read_text())["info"]
    assert info["test_accuracy"] >= 0.91 and info["test_images"] == 10_000
    assert info["trained_with"].startswith("python -m dit_jax.classifier")
    model = classifier.load_classifier()
    if not data.available("test"):
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    images, labels = data.load_fashion_mnist("test")
    assert classifier.accuracy(model, images[:1000], labels[:1000]) >= 0.88
