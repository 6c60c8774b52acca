"""sample() end to end: parity with a PyTorch reference loop, one compilation per configuration,
errors before compiling, and the CLI."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch_dit import diffusers_dit, random_official_state_dict, relative_error

import sdtm
from convert.dit import official_to_params
from dit_jax import denoise, sample
from dit_jax.models.dit import variant
from dit_jax.pipeline import _run
from dit_jax.weights import BundleConfig, Weights, init_dit_params, save

CFG = variant("DiT-S/2", input_size=8, num_classes=10)
NAMES = ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")


@pytest.fixture(scope="module")
def official():
    return random_official_state_dict(CFG, seed=11)


@pytest.fixture(scope="module")
def weights(official):
    params = jax.tree.map(jnp.asarray, official_to_params(official, CFG))
    return Weights(dit=params, config=BundleConfig(dit=CFG, class_names=NAMES))


def test_ddim_cfg_matches_pytorch_reference_loop(weights, official):
    from diffusers import DDIMScheduler

    steps, scale = 20, 4.0
    noise = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    labels = [7, 3]
    ours = sample(weights, labels, steps=steps, cfg_scale=scale, latents=noise, output="latents")

    model = diffusers_dit(CFG, official)
    sched = DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False,
                          set_alpha_to_one=True, timestep_spacing="leading")
    sched.set_timesteps(steps)
    x = torch.from_numpy(noise.transpose(0, 3, 1, 2))
    y = torch.tensor(labels + [CFG.null_class] * 2)
    with torch.no_grad():
        for t in sched.timesteps:
            out = model(torch.cat([x, x]), timestep=t.repeat(4), class_labels=y).sample
            eps = out[:, :3]
            cond, uncond = eps.chunk(2)
            guided = uncond + scale * (cond - uncond)
            eps4 = torch.cat([guided, out[:2, 3:4]], dim=1)  # DiT guides 3 channels; the 4th is cond's
            x = sched.step(eps4, t, x).prev_sample
    want = x.numpy().transpose(0, 2, 3, 1)
    assert relative_error(ours, want) < 1e-4


def test_one_compilation_per_configuration(weights):
    kwargs = dict(steps=3, output="latents")
    first = sample(weights, ["sneaker", "bag"], seed=1, **kwargs)
    again = sample(weights, ["sneaker", "bag"], seed=1, **kwargs)
    np.testing.assert_array_equal(first, again)
    compiled = _run._cache_size()
    other = sample(weights, ["dress", "coat"], seed=2, cfg_scale=7.5, **kwargs)
    assert _run._cache_size() == compiled  # new seed, prompts and scale: no new compilation
    assert not np.allclose(first, other)


@pytest.mark.parametrize("method", [True, sdtm.ToMeConfig(ratio=0.5),
                                    sdtm.SDTMConfig(idm_score="frequency", frequency="merged"),
                                    sdtm.SDTMConfig(proportional_attention=True, plan_every=2)])
def test_merging_runs_end_to_end(weights, method):
    out = sample(weights, ["sneaker", "bag"], sdtm=method, steps=6)
    assert out.shape == (2, 8, 8, 4) and out.dtype == np.uint8  # pixel-space bundle: uint8 of x_0


@pytest.mark.parametrize("method", [sdtm.SDTMConfig(), sdtm.ToMeConfig(ratio=0.5, merge_mlp=True)])
def test_merge_sum_matmul_samples_what_the_scatter_samples(weights, method):
    kwargs = dict(steps=6, seed=3, output="latents")
    by_scatter = sample(weights, ["sneaker", "bag"], sdtm=method, **kwargs)
    by_matmul = sample(weights, ["sneaker", "bag"], sdtm=method.replace(merge_sum="matmul"), **kwargs)
    assert relative_error(by_matmul, by_scatter) < 1e-5
    # The setting reaches the compiled sampler: the merges' scatter-adds are gone from it.
    scatters = [
        _run.lower(*_args(weights, 6), plan=_plan(weights, 6, m)).as_text().count('"stablehlo.scatter"')
        for m in (method, method.replace(merge_sum="matmul"))
    ]
    assert scatters[1] < scatters[0], scatters


def test_sdtm_compiles_one_scan_per_phase(weights):
    phases = sdtm.schedule(sdtm.SDTMConfig(), 10, CFG.num_tokens)
    loops = _run.lower(*_args(weights, 10), plan=_plan(weights, 10, True)).as_text().count("stablehlo.while")
    baseline_loops = _run.lower(*_args(weights, 10), plan=_plan(weights, 10, False)).as_text().count("stablehlo.while")
    assert len(phases) >= 2
    assert loops == len(phases) * baseline_loops  # each phase: its steps' scan (over the scanned blocks)


def _plan(weights, steps, method):
    from dit_jax.pipeline import prepare

    return prepare(weights, [1, 2], sdtm=method, steps=steps)[0]


def _args(weights, steps):
    from dit_jax.pipeline import prepare

    return prepare(weights, [1, 2], steps=steps)[1]


def test_bad_input_fails_before_compiling(weights):
    before = _run._cache_size()
    with pytest.raises(ValueError, match="unknown sampler 'euler'; choose one of ddpm, ddim, dpm\\+\\+"):
        sample(weights, "bag", sampler="euler")
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        sample(weights, "bag", steps=0)
    with pytest.raises(ValueError, match="3 prompts for num_images=2"):
        sample(weights, ["bag", "coat", "dress"], num_images=2)
    with pytest.raises(ValueError, match=r"latents have shape \(1, 16, 16, 4\); this model samples \(1, 8, 8, 4\)"):
        sample(weights, "bag", latents=np.zeros((1, 16, 16, 4)))
    with pytest.raises(ValueError, match="closest valid names: 'sneaker'"):
        sample(weights, "sneakers")
    with pytest.raises(ValueError, match="ratio \\+ deviation"):
        sample(weights, "bag", sdtm=sdtm.SDTMConfig(ratio=0.7, deviation=0.3))
    assert _run._cache_size() == before


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=3.0), "prompt must be a class name or id, a text, or a list of them"),
    (dict(prompt=[["bag"]]), "prompt must be a class name or id"),
    (dict(num_images=0), "num_images must be an int >= 1"),
    (dict(num_images=1.5), "num_images must be an int >= 1"),
    (dict(seed=1.5), "seed must be an int"),
    (dict(seed=2**70), "seed must be an int"),
    (dict(cfg_scale="4"), "cfg_scale must be a finite number"),
    (dict(cfg_scale=float("nan")), "cfg_scale must be a finite number"),
    (dict(latents=np.full((1, 8, 8, 4), np.nan)), "latents hold NaN"),
])
def test_arguments_of_the_wrong_kind_are_named(weights, kwargs, message):
    kwargs = {"prompt": "bag", **kwargs}
    with pytest.raises(ValueError, match=message):
        sample(weights, kwargs.pop("prompt"), steps=2, **kwargs)


def test_weights_must_be_loaded_and_numpy_scalars_are_accepted(weights):
    with pytest.raises(ValueError, match=r"load it first, load\('ckpts/x'\)"):
        sample("ckpts/x", "bag")
    # NumPy and jax scalars are numbers too (a jax guidance scale once made the plan unhashable).
    images = sample(weights, "bag", steps=2, seed=np.int64(3), cfg_scale=jnp.float32(2.0), num_images=np.int64(2))
    assert images.shape[0] == 2


@pytest.mark.parametrize("change, message", [
    (dict(cond=np.array([1, 99])), r"cond must be 2 integer class ids in 0\.\.10"),  # once NaN, silently
    (dict(cond=np.array([1.7, 2.0])), "integer class ids"),  # once truncated to 1
    (dict(cond=np.array([-1, 2])), "integer class ids"),  # once the null class
    (dict(x=np.zeros((2, 4, 8, 8), np.float32)), r"this model takes \(B, 8, 8, 4\): NHWC"),
    (dict(x=np.zeros((2, 8, 8, 4), np.uint8)), "x must be floating-point"),
    (dict(t=np.array([1, 2, 3])), "give one timestep or 2"),
    (dict(sdtm_plan=sdtm.SDTMConfig()), "sdtm_plan must be an sdtm.Phase"),
])
def test_denoise_names_bad_inputs(weights, change, message):
    args = {"x": np.zeros((2, 8, 8, 4), np.float32), "t": np.array([10, 500]), "cond": np.array([1, 2]), **change}
    plan = args.pop("sdtm_plan", None)
    with pytest.raises(ValueError, match=message):
        denoise(weights, args["x"], args["t"], args["cond"], sdtm_plan=plan)


def test_denoise_contract(weights):
    x = np.random.default_rng(0).standard_normal((2, 8, 8, 4)).astype(np.float32)
    out = denoise(weights, x, np.array([10, 500]), np.array([1, 2]))
    assert out.shape == (2, 8, 8, 8)  # learned sigma: 2C channels
    phase = sdtm.schedule(sdtm.ToMeConfig(ratio=0.25), 1, CFG.num_tokens)[0]
    merged = denoise(weights, x, np.array([10, 500]), np.array([1, 2]), sdtm_plan=phase)
    assert merged.shape == out.shape and not np.allclose(merged, out)


def test_cli_writes_png_with_rows_and_timings(tmp_path, capsys):
    from PIL import Image

    from dit_jax.sample import main

    cfg = variant("DiT-S/2", input_size=8, num_classes=10, depth=2, in_channels=1)
    save(Weights(dit=init_dit_params(cfg), config=BundleConfig(dit=cfg, class_names=NAMES)), tmp_path / "w")
    out = tmp_path / "grid.png"
    assert main(["sneaker", "bag", "--weights", str(tmp_path / "w"), "--steps", "4", "--sdtm",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "baseline: compile" in printed and "sdtm: compile" in printed and "x the baseline's speed" in printed
    image = Image.open(out)
    assert image.size == (8 * 2 + 2, 8 * 2 + 2) and image.mode == "L"
    assert '"sneaker", "bag"' in image.info["prompts"]
    assert main(["dragon", "--weights", str(tmp_path / "w")]) == 2
    assert "unknown class name 'dragon'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["bag", "--ratio", "0.3"], "--ratio set(s) the SDTM row: add --sdtm"),
    (["bag", "--merge-sum", "matmul"], "add --sdtm or --tome RATIO"),
    (["bag", "--no-baseline"], "--no-baseline leaves no row"),
    (["bag", "coat", "--num-images", "3"], "--num-images repeats one prompt; 2 prompts were given"),
    (["bag", "--num-images", "0"], "--num-images must be >= 1"),
    (["bag", "--out", "grid.jpg"], "give a file name ending in .png"),
])
def test_cli_refuses_what_it_would_ignore_before_loading(argv, message, capsys, tmp_path, monkeypatch):
    import importlib

    cli = importlib.import_module("dit_jax.sample")  # the module (the package exports the function)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "load", lambda *a, **k: pytest.fail("loaded the weights before checking the flags"))
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_checks_every_row_before_compiling_any(tmp_path, capsys):
    from dit_jax.sample import main

    out = tmp_path / "sub" / "grid.png"
    assert main(["bag", "--sdtm", "--ratio", "0.7", "--steps", "4", "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "compiling" not in captured.out and "allow at most" in captured.err
    assert not out.exists()  # probed for writing, then removed


def test_cli_merge_settings_reach_the_configs():
    from dit_jax.sample import _methods, _parser

    args = _parser().parse_args(["bag", "--sdtm", "--tome", "0.4", "--merge-sum", "matmul", "--plan-every", "2",
                                 "--prompt-weight", "1.5", "1"])
    assert _methods(args) == [
        ("baseline", False),
        ("sdtm", sdtm.SDTMConfig(plan_every=2, merge_sum="matmul", prompt_weight=(1.5, 1.0))),
        ("tome 0.4", sdtm.ToMeConfig(ratio=0.4, merge_sum="matmul")),
    ]


def test_cli_precision_flags(capsys):
    from dit_jax.sample import _parser

    assert _parser().parse_args(["bag", "--fp16"]).fp16 and _parser().parse_args(["bag", "--bf16"]).bf16
    with pytest.raises(SystemExit):
        _parser().parse_args(["bag", "--bf16", "--fp16"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_no_weights_uses_the_shipped_default():
    from dit_jax.weights import DEFAULT_WEIGHTS, load

    shipped = load()
    assert shipped.config.class_names[7] == "sneaker" and shipped.config.pixel_space
    assert {a.dtype for a in jax.tree.leaves(shipped)} == {jnp.dtype(jnp.float32)}
    assert sum(f.stat().st_size for f in DEFAULT_WEIGHTS.rglob("*") if f.is_file()) <= 25e6
    images = sample(None, "sneaker", steps=2)
    assert images.shape == (1, 32, 32, 1) and images.dtype == np.uint8


def test_protected_steps_and_cache_blend(weights):
    """The official release's extras: protect_every=1 protects every step (= the baseline), and a
    cache_weight of 1 ignores the cache; 0.1 runs and differs from plain SDTM."""
    kwargs = dict(steps=6, output="latents", seed=3)
    base = sample(weights, ["sneaker", "bag"], **kwargs)
    all_protected = sample(weights, ["sneaker", "bag"], sdtm=sdtm.SDTMConfig(protect_every=1), **kwargs)
    np.testing.assert_allclose(all_protected, base, rtol=1e-5, atol=1e-5)
    plain = sample(weights, ["sneaker", "bag"], sdtm=True, **kwargs)
    blended = sample(weights, ["sneaker", "bag"], sdtm=sdtm.SDTMConfig(protect_every=3, cache_weight=0.1), **kwargs)
    unblended = sample(weights, ["sneaker", "bag"], sdtm=sdtm.SDTMConfig(protect_every=3), **kwargs)
    assert np.isfinite(blended).all()
    assert not np.allclose(blended, plain) and not np.allclose(blended, unblended)
    with pytest.raises(ValueError, match="set protect_every too"):
        sdtm.SDTMConfig(cache_weight=0.1)


def test_cache_weight_one_is_the_plain_merged_forward():
    import sdtm as sdtm_lib
    from flax import nnx

    from dit_jax.models.dit import DiT

    cfg = variant("DiT-S/2", input_size=8, num_classes=10, depth=2)
    model = DiT(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
    t, y = jnp.array([3, 600]), jnp.array([1, 2])
    merger = sdtm_lib.schedule(sdtm_lib.SDTMConfig(switch_step=1.0), 1, cfg.num_tokens)[0].merger
    state = sdtm_lib.init_state(2, cfg.num_tokens)
    _, _, branches = model.forward_merged(x, t, y, return_branches=True)
    assert branches.shape == (2, 2, 2, cfg.num_tokens, cfg.hidden_size)
    plain = model.forward_merged(x, t, y, merger, state)[0]
    same = model.forward_merged(x, t, y, merger, state, cache=branches, cache_weight=1.0)[0]
    np.testing.assert_array_equal(same, plain)
    blended = model.forward_merged(x, t, y, merger, state, cache=branches, cache_weight=0.0)[0]
    full = model(x, t, y)
    # merged tokens take the full-resolution branches: closer to the full forward than plain merging
    assert np.abs(blended - full).mean() < np.abs(plain - full).mean()


@pytest.mark.parametrize("method", [False, sdtm.SDTMConfig(plan_every=4)])
def test_sampler_runs_the_blocks_from_the_stored_stack(method):
    """The blocks are stored stacked, so the compiled sampler scans them in place: XLA's
    temporaries stay far below the blocks' weights (stacking per-block weights inside the
    sampler made a copy of them all: 2.2 of the 2.6 GiB of DiT-XL/2's float32 sampler)."""
    from dit_jax.pipeline import prepare

    cfg = variant("DiT-S/2", input_size=8, num_classes=10, depth=16, hidden_size=128, num_heads=2)
    heavy = Weights(dit=init_dit_params(cfg), config=BundleConfig(dit=cfg, class_names=NAMES))
    blocks = sum(a.nbytes for a in jax.tree.leaves(heavy.dit["blocks"]))
    plan, args = prepare(heavy, [1, 2], sdtm=method, steps=4)
    compiled = _run.lower(*args, plan=plan).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < blocks / 8
