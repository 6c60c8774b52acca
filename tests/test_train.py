"""Training (dit_jax.train): DiT's init, the loss on a fresh model, a short run that learns,
checkpoints, resumes exactly, stops on its time limit and exports a loadable bundle.

One tiny config (hidden 32, depth 2, heads 2, batch 8, 64 images); the train step compiles once per
process and every run below reuses it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dit_jax import data, load
from dit_jax.diffusion.schedule import linear_betas
from dit_jax.diffusion.losses import DiffusionTables, diffusion_loss
from dit_jax.profiling import distinct_fusions
from dit_jax.train import (
    TrainConfig, _map_params, blocks_stacked, build_module, ema_decay_at, init_params, init_train_state,
    make_train_step, parse_args, train,
)
from dit_jax.weights import dit_module


@pytest.fixture(scope="module")
def tiny_dataset():
    """The first 64 Fashion-MNIST training images, or, without the files, 64 class-coded images."""
    if data.available("train"):
        images, labels = data.load_fashion_mnist("train")
        return images[:64], labels[:64]
    rng = np.random.default_rng(0)
    labels = np.arange(64, dtype=np.int32) % 10
    images = np.zeros((64, 32, 32, 1), np.uint8)
    for i, label in enumerate(labels):  # a bright bar whose row says the class, plus noise
        images[i, 2:30, 2:30, 0] = rng.integers(0, 40, (28, 28))
        images[i, 3 + 2 * label : 5 + 2 * label, 4:28, 0] = 255
    return images, labels


def tiny_config(out, **changes) -> TrainConfig:
    base = TrainConfig(
        out=str(out), steps=30, batch_size=8, lr=1e-3, warmup=0, hidden_size=32, depth=2, num_heads=2,
        log_every=10, ckpt_every=15, limit=64,
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture(scope="module")
def tables():
    return DiffusionTables.from_betas(linear_betas(1000))


@pytest.fixture(scope="module")
def run_a(tmp_path_factory, tiny_dataset):
    """30 uninterrupted steps (checkpoints at 15 and 30)."""
    out = tmp_path_factory.mktemp("run_a")
    return train(tiny_config(out), dataset=tiny_dataset, log=lambda line: None)


def test_dit_init_is_adaln_zero():
    cfg = tiny_config("unused").dit_config()
    params, buffers = init_params(cfg, seed=0)
    blocks = params["blocks"]  # stacked: (depth, ...) each
    assert not np.any(blocks["adaLN_modulation"]["kernel"]) and not np.any(blocks["adaLN_modulation"]["bias"])
    bound = math.sqrt(6.0 / (32 + 96))
    for qkv in np.asarray(blocks["attn"]["qkv"]["kernel"]):  # each block's
        assert 0.8 * bound < np.abs(qkv).max() <= bound  # xavier-uniform on the fused (in, 3 * in) kernel
    first, second = np.asarray(blocks["mlp"]["fc1"]["kernel"])[:2]
    assert np.any(first != second)  # drawn per block
    assert not np.any(params["final_layer"]["linear"]["kernel"])
    assert abs(float(np.std(params["y_embedder"]["embedding_table"]["embedding"])) - 0.02) < 0.005
    assert buffers["pos_embed"].shape == (1, 256, 32)
    forward = jax.jit(lambda p, x, t, y: build_module(cfg, p, buffers)(x, t, y))
    out = forward(params, jnp.ones((2, 32, 32, 1)), jnp.array([3, 900]), jnp.array([1, 10]))
    assert out.shape == (2, 32, 32, 2)
    assert not np.any(np.asarray(out)), "adaLN-Zero: a fresh DiT outputs exactly 0"
    params_again, _ = init_params(cfg, seed=0)
    np.testing.assert_array_equal(params_again["blocks"]["mlp"]["fc1"]["kernel"], params["blocks"]["mlp"]["fc1"]["kernel"])


def test_loss_at_init_and_without_learned_sigma(tables, tiny_dataset):
    images, labels = tiny_dataset
    x0 = jnp.asarray(images[:8], jnp.float32) / 127.5 - 1.0
    noise = jax.random.normal(jax.random.key(0), x0.shape)
    t = jnp.arange(8) * 120
    y = jnp.asarray(labels[:8])
    for learn_sigma in (True, False):
        cfg = tiny_config("unused", learn_sigma=learn_sigma).dit_config()
        params, buffers = init_params(cfg)
        loss, terms = jax.jit(lambda p: diffusion_loss(build_module(cfg, p, buffers), tables, x0, t, y, noise))(params)
        # A fresh DiT predicts eps = 0, so the MSE is the noise's mean square.
        np.testing.assert_allclose(float(terms["mse"]), float(jnp.mean(noise**2)), rtol=1e-6)
        if learn_sigma:
            assert 0 < float(terms["vb"]) < 10 and float(loss) == pytest.approx(float(terms["mse"] + terms["vb"]))
        else:
            assert float(terms["vb"]) == 0.0 and float(loss) == float(terms["mse"])


def _perturbed_tiny_model(tiny_dataset):
    images, labels = tiny_dataset
    x0 = jnp.asarray(images[:8], jnp.float32) / 127.5 - 1.0
    batch = (x0, jnp.arange(8) * 120, jnp.asarray(labels[:8]), jax.random.normal(jax.random.key(0), x0.shape))
    cfg = tiny_config("unused").dit_config()
    params, buffers = init_params(cfg)
    # Away from the zero init, so the adaLN and final layers carry signal.
    params = jax.tree.map(lambda a: a + 0.02 * jax.random.normal(jax.random.key(1), a.shape), params)
    return cfg, params, buffers, batch


def test_bfloat16_compute_tracks_float32(tables, tiny_dataset):
    cfg, params, buffers, batch = _perturbed_tiny_model(tiny_dataset)

    @jax.jit
    def losses(p):
        return [diffusion_loss(build_module(cfg, p, buffers, dtype), tables, *batch)[0] for dtype in (jnp.float32, jnp.bfloat16)]

    loss32, loss16 = losses(params)
    assert float(loss16) == pytest.approx(float(loss32), rel=0.05)


@pytest.mark.slow  # the bfloat16 backward pass alone compiles for ~5 s on CPU
def test_bfloat16_gradients_track_float32(tables, tiny_dataset):
    cfg, params, buffers, batch = _perturbed_tiny_model(tiny_dataset)

    @jax.jit
    def grads(p):
        return [
            jax.grad(lambda q: diffusion_loss(build_module(cfg, q, buffers, dtype), tables, *batch)[0])(p)
            for dtype in (jnp.float32, jnp.bfloat16)
        ]

    grads32, grads16 = grads(params)
    flat32, flat16 = (jnp.concatenate([g.ravel() for g in jax.tree.leaves(tree)]) for tree in (grads32, grads16))
    assert flat16.dtype == jnp.float32  # gradients reach the float32 master weights
    assert float(jnp.linalg.norm(flat16 - flat32) / jnp.linalg.norm(flat32)) < 0.1


def test_ema_decay_warms_up_to_its_ceiling():
    decay = np.asarray(ema_decay_at(jnp.array([0, 90, 10_000, 10**6]), 0.9999))
    np.testing.assert_allclose(decay, [0.1, 0.91, 10_001 / 10_010, 0.9999], rtol=1e-6)


def test_training_lowers_the_loss_on_a_fixed_batch(run_a, tables, tiny_dataset):
    cfg = tiny_config("unused").dit_config()
    images, labels = tiny_dataset
    x0 = jnp.asarray(images[:32], jnp.float32) / 127.5 - 1.0
    noise = jax.random.normal(jax.random.key(7), x0.shape)
    t = jnp.linspace(0, 999, 32).astype(jnp.int32)
    y = jnp.asarray(labels[:32])
    initial, buffers = init_params(cfg, seed=0)
    mse = jax.jit(lambda p: diffusion_loss(build_module(cfg, p, buffers), tables, x0, t, y, noise)[1]["mse"])
    before = float(mse(initial))
    after = float(mse(blocks_stacked(jax.tree.map(jnp.asarray, run_a.state["params"]))))
    # Seen: about 0.99 -> 0.35..0.45 over seeds; a model that does not learn stays near 1.
    assert after < 0.75 * before, (before, after)
    assert run_a.step == 30 and run_a.stopped_by == "steps" and math.isfinite(run_a.loss)


def test_checkpoints_and_bundle(run_a):
    out = run_a.bundle_path.parent
    assert sorted(p.name for p in (out / "train_state").iterdir() if p.name.isdigit()) == ["15", "30"]
    assert json.loads((out / "train_config.json").read_text())["dit"]["hidden_size"] == 32
    weights = load(out / "final")
    info = weights.config.info
    assert weights.config.class_names == data.CLASS_NAMES and weights.config.pixel_space
    assert info["steps"] == 30 and info["pixel_space"] is True and info["batch_size"] == 8
    assert {"hardware", "jax_version", "date", "wall_time_s", "final_loss", "train_config"} <= set(info)
    # The bundle holds the EMA, not the raw parameters.
    # The train state keeps the blocks one tree per layer; the bundle stores them stacked.
    assert sorted(run_a.state["ema"]["blocks"]) == ["0", "1"]
    ema_qkv = [run_a.state["ema"]["blocks"][i]["attn"]["qkv"]["kernel"] for i in ("0", "1")]
    np.testing.assert_array_equal(np.asarray(weights.dit["blocks"]["attn"]["qkv"]["kernel"]), np.stack(ema_qkv))
    assert np.any(ema_qkv[1] != run_a.state["params"]["blocks"]["1"]["attn"]["qkv"]["kernel"])
    forward = jax.jit(lambda w, x, t, y: dit_module(w)(x, t, y))
    out_img = forward(weights, jnp.zeros((2, 32, 32, 1)), jnp.array([10, 500]), jnp.array([7, 10]))
    assert out_img.shape == (2, 32, 32, 2) and bool(jnp.all(jnp.isfinite(out_img)))


def test_train_step_shares_its_kernels_between_blocks(tmp_path):
    """Another block adds few distinct kernels to the compiled step. Measured: 8 per block with
    the train state's blocks one tree per layer (XLA's fusions across neighbouring blocks), 30
    per block with the stacked leaves in the state, whose slices XLA fused into each block's own
    kernels (the default config: 461 fusions and a 9.4-10.2 s compile instead of 255 and 6.8-7.7 s)."""
    counts = []
    for depth in (2, 4):
        cfg = tiny_config(tmp_path, depth=depth)
        state, buffers = init_train_state(cfg)
        images, labels = jnp.zeros((16, 32, 32, 1), jnp.uint8), jnp.zeros((16,), jnp.int32)
        compiled = jax.jit(make_train_step(cfg, buffers)).lower(state, images, labels).compile()
        counts.append(sum(distinct_fusions(compiled.as_text()).values()))
    assert (counts[1] - counts[0]) / 2 < 16, counts
    with pytest.raises(ValueError, match=r"pass blocks_stacked\(params\)"):
        build_module(cfg.dit_config(), state["params"], buffers)


def test_resume_continues_exactly(run_a, tmp_path, tiny_dataset):
    first = train(tiny_config(tmp_path, steps=15), dataset=tiny_dataset, log=lambda line: None)
    assert first.step == 15
    with pytest.raises(ValueError, match="--resume"):
        train(tiny_config(tmp_path), dataset=tiny_dataset, log=lambda line: None)
    lines = []
    second = train(tiny_config(tmp_path, resume=True, export_dtype="bfloat16"), dataset=tiny_dataset, log=lines.append)
    assert any("resumed" in line and "step 15" in line for line in lines)
    assert second.step == 30
    # Batches, noise and dropout come from fold_in(seed, step): a resumed run retraces the
    # uninterrupted one.
    for name in ("params", "ema"):
        for got, want in zip(jax.tree.leaves(second.state[name]), jax.tree.leaves(run_a.state[name])):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert load(tmp_path / "final", dtype=None).dtype == jnp.bfloat16  # stored bf16 (load() upcasts by default)
    with pytest.raises(ValueError, match="another model"):
        train(tiny_config(tmp_path, resume=True, hidden_size=64, num_heads=2), dataset=tiny_dataset, log=lambda line: None)


def test_resume_reads_states_checkpointed_with_the_blocks_stacked(run_a, tmp_path, tiny_dataset):
    """Commits 973d673 to 0e0e71e checkpointed the train state with its blocks stacked."""
    import orbax.checkpoint as ocp

    first = train(tiny_config(tmp_path, steps=15), dataset=tiny_dataset, log=lambda line: None)
    shutil.rmtree(tmp_path / "train_state")
    with ocp.CheckpointManager(tmp_path / "train_state") as manager:
        manager.save(15, args=ocp.args.StandardSave(_map_params(blocks_stacked, jax.device_get(first.state))))
        manager.wait_until_finished()
    lines = []
    second = train(tiny_config(tmp_path, resume=True), dataset=tiny_dataset, log=lines.append)
    assert any("resumed" in line and "step 15" in line for line in lines)
    for name in ("params", "ema", "opt_state"):
        for got, want in zip(jax.tree.leaves(second.state[name]), jax.tree.leaves(run_a.state[name])):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_time_limit_stops_cleanly_with_a_bundle(tmp_path, tiny_dataset):
    result = train(tiny_config(tmp_path, time_limit=1.0, time_reserve=5.0), dataset=tiny_dataset, log=lambda line: None)
    assert result.stopped_by == "time_limit" and result.step == 0
    assert (tmp_path / "train_state" / "0").is_dir()
    assert load(tmp_path / "final").config.info["final_loss"] is None


def test_cli_flags():
    cfg = parse_args([
        "--out", "o", "--steps", "7", "--batch-size", "16", "--no-learn-sigma", "--dtype", "bfloat16",
        "--export-dtype", "bfloat16", "--time-limit", "300", "--limit", "100", "--resume", "--lr", "5e-4",
    ])
    assert (cfg.steps, cfg.batch_size, cfg.learn_sigma, cfg.dtype, cfg.export_dtype) == (7, 16, False, "bfloat16", "bfloat16")
    assert (cfg.time_limit, cfg.limit, cfg.resume, cfg.lr, cfg.hidden_size) == (300.0, 100, True, 5e-4, 256)
    assert parse_args(["--out", "o"]).learn_sigma is True
    with pytest.raises(ValueError, match="class_dropout"):
        dataclasses.replace(cfg, class_dropout=1.5).validate()


# ---------------------------------------------------------------------------------------------
# --family pixart: a text-conditioned PixArt on the class captions


@pytest.fixture(scope="module")
def text_run(tmp_path_factory, tiny_dataset):
    """30 steps of a tiny PixArt (patch 4: 64 tokens) on captions."""
    out = tmp_path_factory.mktemp("text_run")
    return train(tiny_config(out, family="pixart", patch_size=4), dataset=tiny_dataset, log=lambda line: None)


def test_pixart_init_starts_without_text_and_output():
    cfg = tiny_config("unused", family="pixart", patch_size=4).dit_config()
    params, buffers = init_params(cfg, seed=0)
    assert buffers == {}  # PixArt's position embedding is a constant, not a buffer
    blocks = params["blocks"]  # stacked: (depth, ...) each
    assert not np.any(blocks["cross_attn"]["proj"]["kernel"]) and not np.any(blocks["cross_attn"]["proj"]["bias"])
    for i in range(blocks["attn"]["proj"]["kernel"].shape[0]):
        assert np.any(blocks["attn"]["proj"]["kernel"][i])  # xavier, not zero
        assert abs(float(np.std(blocks["scale_shift_table"][i])) * math.sqrt(32) - 1.0) < 0.25  # N(0, 1) / sqrt(hidden)
    assert not np.any(params["final_layer"]["linear"]["kernel"])
    assert abs(float(np.std(params["t_block"]["kernel"])) - 0.02) < 0.005
    assert abs(float(np.std(params["y_embedder"]["fc1"]["kernel"])) - 0.02) < 0.005
    cond = {"text": jnp.ones((2, 16, 64)), "text_mask": jnp.ones((2, 16), jnp.int32)}
    out = jax.jit(lambda p: build_module(cfg, p, buffers)(jnp.ones((2, 32, 32, 1)), jnp.array([3, 900]), cond))(params)
    assert out.shape == (2, 32, 32, 2) and not np.any(np.asarray(out)), "a fresh PixArt outputs exactly 0"


def test_text_run_learns_and_samples_from_the_features_it_trained_on(text_run):
    from dit_jax import sample
    from dit_jax.prompts import text_condition

    assert text_run.step == 30 and math.isfinite(text_run.loss)
    weights = load(text_run.bundle_path)
    assert weights.config.family == "pixart" and weights.config.class_names == data.CLASS_NAMES
    assert weights.config.info["captions"]["templates"] == list(data.CAPTION_TEMPLATES)
    # The bundle's tokenizer and frozen encoder give sample() exactly the caption features the
    # model trained on (the empty caption too: what guidance samples against).
    from dit_jax.train import make_captions

    captions = make_captions(text_run.bundle_path.parent / "tokenizer-again", seed=0)
    texts = [data.caption(label, template) for label in (7, 0) for template in (0, 3)]
    cond, uncond = text_condition(weights, texts, "")
    rows = [7 * 4 + 0, 7 * 4 + 3, 0 * 4 + 0, 0 * 4 + 3]
    np.testing.assert_allclose(np.asarray(cond["text"]), captions.text[rows], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(cond["text_mask"]), captions.mask[rows])
    np.testing.assert_allclose(np.asarray(uncond["text"]), captions.text[-1:], rtol=1e-6, atol=1e-6)
    assert captions.mask[-1].sum() == 1  # "" is </s> alone
    # Every caption word is in the vocabulary: no <unk> (id 2) in any caption; the 40 differ.
    from dit_jax.tokenizer import Tokenizer

    vocab = json.loads((text_run.bundle_path / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    all_ids, _ = Tokenizer.from_dir(text_run.bundle_path / "tokenizer")(
        [data.caption(label, template) for label in range(10) for template in range(4)], max_length=16)
    assert vocab["<unk>"] == 2 and not np.any(all_ids == 2)
    assert len({tuple(r) for r in captions.text[:-1, :, 0].round(5)}) == 40
    images = sample(weights, [data.caption(7), "a bag"], sdtm=True, steps=4)
    assert images.shape == (2, 32, 32, 1) and images.dtype == np.uint8
    # The quality harness prompts a text model with each class's first caption (rows: image,
    # unconditional, image, ...).
    from dit_jax.evaluate import TimedSampler

    _, args = TimedSampler(weights, 2, 2, 2, 4.5, 0, log=lambda line: None).batch_args(False, 0)
    np.testing.assert_allclose(np.asarray(args[2]["text"][::2]), captions.text[[0, 4]], rtol=1e-5, atol=1e-5)


def test_text_cli_and_bad_family():
    cfg = parse_args(["--out", "o", "--family", "pixart", "--patch-size", "4", "--hidden-size", "64"])
    assert cfg.family == "pixart" and cfg.dit_config().caption_channels == 64 and cfg.dit_config().out_channels == 2
    with pytest.raises(ValueError, match="family must be one of"):
        dataclasses.replace(cfg, family="unet").validate()
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        dataclasses.replace(cfg, hidden_size=66).validate()


@pytest.mark.parametrize("change, message", [
    (dict(lr=-1.0), "lr must be > 0"),
    (dict(grad_clip=-1.0), "grad_clip must be > 0"),
    (dict(weight_decay=-2.0), "weight_decay must be >= 0"),
    (dict(time_limit=-5.0), "time_limit must be > 0"),
])
def test_optimiser_settings_that_cannot_train_are_refused(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(tmp_path, **change).validate()
