"""A small Fashion-MNIST CNN: the judge of prompt adherence and the feature space of FD-classifier.

    python -m dit_jax.classifier --out dit_jax/assets/fashion-classifier --epochs 4   # how the shipped one was made

    model = load_classifier()                        # the bundle shipped in the package
    logits, feats = classify(model, images_uint8)    # (N, 10), (N, 128) penultimate features

Three 3x3 conv + ReLU + 2x2 max-pool stages (32 -> 16 -> 8 -> 4 px), a 128-wide ReLU layer (the
features a Frechet distance is computed on), dropout in training, a 10-way linear head. Trained
with optax AdamW (cosine-decayed learning rate) and a jitted step on the padded 32x32 images that
`dit_jax.data` gives and the shipped DiT samples.

A bundle is a directory: config.json (architecture, test accuracy, how it was trained) and
params.npz (float32 leaves under "/"-joined paths).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dit_jax.data import CLASS_NAMES, load_fashion_mnist

DEFAULT_CLASSIFIER = Path(__file__).parent / "assets" / "fashion-classifier"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """Architecture. `channels` has one entry per conv stage; each stage halves the image side."""

    image_size: int = 32
    in_channels: int = 1
    channels: tuple[int, ...] = (32, 64, 128)
    feature_dim: int = 128
    num_classes: int = len(CLASS_NAMES)
    dropout: float = 0.3

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if self.image_size % 2 ** len(self.channels):
            raise ValueError(
                f"image_size {self.image_size} is not divisible by 2^{len(self.channels)} (one 2x2 pool per stage)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["channels"] = list(self.channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ClassifierConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown classifier config keys {sorted(unknown)}")
        return cls(**d)


def _max_pool(x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))  # (B, H/2, W/2, C)


class FashionCNN(nnx.Module):
    """conv stages -> 128-d ReLU features -> class logits. Input: uint8 or [0, 255] float NHWC."""

    def __init__(self, config: ClassifierConfig, *, rngs: nnx.Rngs):
        self.config = config
        convs, c_in = [], config.in_channels
        for c_out in config.channels:
            convs.append(nnx.Conv(c_in, c_out, (3, 3), padding="SAME", rngs=rngs))
            c_in = c_out
        self.convs = nnx.List(convs)
        side = config.image_size // 2 ** len(config.channels)
        self.hidden = nnx.Linear(side * side * c_in, config.feature_dim, rngs=rngs)
        self.head = nnx.Linear(config.feature_dim, config.num_classes, rngs=rngs)

    def features(self, images: jax.Array) -> jax.Array:
        """(B, H, W, C) pixels in [0, 255] -> (B, feature_dim) penultimate activations."""
        x = images.astype(jnp.float32) / 127.5 - 1.0  # (B, 32, 32, 1) in [-1, 1]
        for conv in self.convs:
            x = _max_pool(jax.nn.relu(conv(x)))
        return jax.nn.relu(self.hidden(x.reshape(x.shape[0], -1)))  # (B, 128)

    def __call__(self, images: jax.Array, dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """-> (logits (B, num_classes), features (B, feature_dim)). A dropout_key turns dropout on."""
        feats = self.features(images)
        h = feats
        if dropout_key is not None and self.config.dropout > 0:
            keep = 1.0 - self.config.dropout
            h = h * jax.random.bernoulli(dropout_key, keep, h.shape) / keep
        return self.head(h), feats


def init_classifier(config: ClassifierConfig = ClassifierConfig(), seed: int = 0) -> FashionCNN:
    """A freshly initialised classifier (Flax's default initialisers)."""
    return FashionCNN(config, rngs=nnx.Rngs(seed))


# ---------------------------------------------------------------------------------------------
# Training


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """Optimisation settings; the CLI flags have the same names."""

    epochs: int = 4
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 100  # steps of linear warm-up before the cosine decay
    seed: int = 0

    def validate(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup < 0:
            raise ValueError("lr must be > 0; weight_decay and warmup >= 0")


def _loss(model: FashionCNN, images, labels, dropout_key):
    logits, _ = model(images, dropout_key)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, (logits.argmax(-1) == labels).mean()


@nnx.jit
def _train_step(model: FashionCNN, optimizer: nnx.Optimizer, images, labels, dropout_key):
    (loss, accuracy), grads = nnx.value_and_grad(_loss, has_aux=True)(model, images, labels, dropout_key)
    optimizer.update(model, grads)
    return loss, accuracy


def fit(
    images: np.ndarray,
    labels: np.ndarray,
    fit_config: FitConfig = FitConfig(),
    config: ClassifierConfig = ClassifierConfig(),
    *,
    log_every: int = 100,
    log=print,
) -> tuple[FashionCNN, list[float]]:
    """Train a classifier on uint8 images (N, 32, 32, 1) and int labels (N,).

    Returns the model and the loss of every step. Each epoch visits the images in a fresh random
    order (the last partial batch is dropped, so one compiled step serves every batch).
    """
    fit_config.validate()
    if len(images) != len(labels) or len(images) < fit_config.batch_size:
        raise ValueError(
            f"{len(images)} images, {len(labels)} labels: need as many labels as images and at least one "
            f"batch of {fit_config.batch_size}"
        )
    model = init_classifier(config, fit_config.seed)
    steps_per_epoch = len(images) // fit_config.batch_size
    total = steps_per_epoch * fit_config.epochs
    warmup = min(fit_config.warmup, total // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, fit_config.lr, warmup, total, end_value=0.01 * fit_config.lr)
    optimizer = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=fit_config.weight_decay), wrt=nnx.Param)
    rng = np.random.default_rng(fit_config.seed)
    key = jax.random.key(fit_config.seed)
    device_images, device_labels = jnp.asarray(images), jnp.asarray(labels, jnp.int32)
    losses: list[float] = []
    start = time.perf_counter()
    for epoch in range(fit_config.epochs):
        order = rng.permutation(len(images))[: steps_per_epoch * fit_config.batch_size]
        order = order.reshape(steps_per_epoch, fit_config.batch_size)
        for i, batch in enumerate(order):
            step = epoch * steps_per_epoch + i
            batch = jnp.asarray(batch)
            loss, accuracy = _train_step(
                model, optimizer, device_images[batch], device_labels[batch], jax.random.fold_in(key, step)
            )
            losses.append(float(loss))
            if log and log_every and (step + 1) % log_every == 0:
                log(f"epoch {epoch + 1} step {step + 1}/{total}: loss {np.mean(losses[-log_every:]):.4f}, "
                    f"batch accuracy {float(accuracy):.3f}, {time.perf_counter() - start:.0f}s")
    return model, losses


@nnx.jit
def _outputs(model: FashionCNN, images):
    return model(images)


def classify(model: FashionCNN, images: np.ndarray, *, batch_size: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 32, 32, 1) -> (logits (N, 10), features (N, 128)) float32, in batches
    (the last one padded, so one compilation serves any N)."""
    images = np.asarray(images)
    cfg = model.config
    expected = (cfg.image_size, cfg.image_size, cfg.in_channels)
    if images.ndim != 4 or images.shape[1:] != expected:
        raise ValueError(f"the classifier takes (N, {', '.join(map(str, expected))}) images, got {images.shape}")
    logits, feats = [], []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        real = len(chunk)
        if real < batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - real, *expected), chunk.dtype)])
        lo, fe = _outputs(model, jnp.asarray(chunk))
        logits.append(np.asarray(lo)[:real])
        feats.append(np.asarray(fe)[:real])
    if not logits:
        return np.zeros((0, cfg.num_classes), np.float32), np.zeros((0, cfg.feature_dim), np.float32)
    return np.concatenate(logits), np.concatenate(feats)


def accuracy(model: FashionCNN, images: np.ndarray, labels: np.ndarray) -> float:
    """Share of `images` whose top class is their label."""
    logits, _ = classify(model, images)
    return float((logits.argmax(-1) == np.asarray(labels)).mean())


# ---------------------------------------------------------------------------------------------
# Bundles


def save_classifier(model: FashionCNN, path: str | Path, info: dict | None = None) -> Path:
    """Write config.json + params.npz (float32) into the directory `path` (made if missing)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    flat = {
        "/".join(str(k) for k in key): np.asarray(value, np.float32)
        for key, value in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    np.savez(path / "params.npz", **flat)
    config = {"format_version": FORMAT_VERSION, "classifier": model.config.to_dict(),
              "class_names": list(CLASS_NAMES), "info": info or {}}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return path


def load_classifier(path: str | Path | None = None) -> FashionCNN:
    """Read a classifier bundle (default: the one shipped in the package)."""
    path = Path(DEFAULT_CLASSIFIER if path is None else path)
    config_file, params_file = path / "config.json", path / "params.npz"
    if not config_file.is_file() or not params_file.is_file():
        raise FileNotFoundError(
            f"{path} is not a classifier bundle (needs config.json and params.npz); make one with "
            "`python -m dit_jax.classifier --out DIR`"
        )
    meta = json.loads(config_file.read_text())
    config = ClassifierConfig.from_dict(meta["classifier"])
    # Shapes only (building the module eagerly would compile one small program per initialiser).
    graphdef, state = nnx.split(nnx.eval_shape(lambda: init_classifier(config)))
    expected = {"/".join(str(k) for k in key): v for key, v in nnx.to_flat_state(state)}
    with np.load(params_file) as stored:
        missing = sorted(set(expected) - set(stored.files))
        extra = sorted(set(stored.files) - set(expected))
        if missing or extra:
            raise ValueError(f"{params_file}: missing {missing}, unexpected {extra}")
        for name, var in expected.items():
            if stored[name].shape != var.value.shape:
                raise ValueError(f"{params_file}: {name} has shape {stored[name].shape}, expected {var.value.shape}")
            var.value = jnp.asarray(stored[name], jnp.float32)
    model = nnx.merge(graphdef, state)
    return model


def bundle_info(path: str | Path | None = None) -> dict:
    """The `info` block of a bundle's config.json (test accuracy, training command...)."""
    path = Path(DEFAULT_CLASSIFIER if path is None else path)
    return json.loads((path / "config.json").read_text()).get("info", {})


def count_params(model: FashionCNN) -> int:
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dit_jax.classifier", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="bundle directory to write (config.json, params.npz)")
    ap.add_argument("--epochs", type=int, default=FitConfig.epochs)
    ap.add_argument("--batch-size", type=int, default=FitConfig.batch_size)
    ap.add_argument("--lr", type=float, default=FitConfig.lr)
    ap.add_argument("--weight-decay", type=float, default=FitConfig.weight_decay)
    ap.add_argument("--seed", type=int, default=FitConfig.seed)
    ap.add_argument("--limit", type=int, help="train on the first N training images only")
    ap.add_argument("--data-root", help="folder of the Fashion-MNIST idx files")
    args = ap.parse_args(argv)
    command = "python -m dit_jax.classifier " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        fit_config = FitConfig(args.epochs, args.batch_size, args.lr, args.weight_decay, seed=args.seed)
        fit_config.validate()
        train_images, train_labels = load_fashion_mnist("train", args.data_root)
        test_images, test_labels = load_fashion_mnist("test", args.data_root)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.limit:
        train_images, train_labels = train_images[: args.limit], train_labels[: args.limit]
    start = time.perf_counter()
    model, losses = fit(train_images, train_labels, fit_config)
    train_s = time.perf_counter() - start
    test_accuracy = accuracy(model, test_images, test_labels)
    print(f"test accuracy {test_accuracy:.4f} ({len(test_images)} images); trained {len(losses)} steps "
          f"in {train_s:.0f}s; {count_params(model):,} parameters", flush=True)
    info = {
        "test_accuracy": round(test_accuracy, 4),
        "test_images": len(test_images),
        "train_images": len(train_images),
        "steps": len(losses),
        "final_loss": round(float(np.mean(losses[-50:])), 4),
        "train_seconds": round(train_s, 1),
        "fit": dataclasses.asdict(fit_config),
        "parameters": count_params(model),
        "trained_with": command,
        "hardware": f"{jax.devices()[0].platform}:{jax.devices()[0].device_kind}",
        "jax_version": jax.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    out = save_classifier(model, args.out, info)
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
