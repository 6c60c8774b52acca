"""convert.pixart end to end: a tiny diffusers PixArt pipeline (every parameter random) converts,
loads, and samples the same latents as diffusers' PixArtAlphaPipeline (DPM-Solver++, guidance,
T5 prompts); SDTM and ToMe run through sample(); the converter's errors."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from text_testing import tiny_pixart_pipeline
from torch_dit import relative_error

import sdtm
from convert import pixart as convert_pixart
from dit_jax import load, sample
from dit_jax.weights import cast
from dit_jax.prompts import text_condition

PROMPTS = ["A photo of a cat sitting on a red sofa.", "Two dogs play in the snow"]
TOL = 1e-4


@pytest.fixture(scope="module", params=[False, True], ids=["plain", "micro-conditions"])
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("pixart")
    pipe = tiny_pixart_pipeline(root / "pipeline", micro_conditions=request.param)
    out = root / "bundle"
    code = convert_pixart.main([str(out), "--pipeline", str(root / "pipeline"), "--max-text-length", "12",
                                "--text-encoder-dtype", "float32"])
    assert code == 0
    return pipe, out


def diffusers_latents(pipe, prompts, x_T: np.ndarray, steps: int, guidance: float) -> np.ndarray:
    latents = torch.from_numpy(x_T.transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        out = pipe(
            prompts, negative_prompt="", num_inference_steps=steps, guidance_scale=guidance, latents=latents,
            output_type="latent", use_resolution_binning=False, clean_caption=False, max_sequence_length=12,
            height=latents.shape[-1] * pipe.vae_scale_factor, width=latents.shape[-1] * pipe.vae_scale_factor,
        ).images
    return out.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("steps,guidance", [(20, 4.5), (6, 1.0)])
def test_sampling_matches_diffusers_pipeline(converted, steps, guidance):
    pipe, bundle = converted
    weights = load(bundle)
    cfg = weights.config.dit
    assert weights.config.family == "pixart" and cfg.max_text_length == 12
    x_T = np.random.default_rng(0).standard_normal((2, cfg.input_size, cfg.input_size, 4)).astype(np.float32)
    ours = sample(weights, PROMPTS, latents=x_T, steps=steps, cfg_scale=guidance, output="latents")
    theirs = diffusers_latents(pipe, PROMPTS, x_T, steps, guidance)
    assert relative_error(ours, theirs) < TOL


def test_text_condition_is_the_pipelines_prompt_embedding(converted):
    pipe, bundle = converted
    weights = load(bundle)
    cond, uncond = text_condition(weights, PROMPTS, "")
    with torch.no_grad():
        embeds, mask, neg_embeds, neg_mask = pipe.encode_prompt(
            PROMPTS, negative_prompt="", clean_caption=False, max_sequence_length=12, device="cpu")
    np.testing.assert_array_equal(np.asarray(cond["text_mask"]), mask.numpy())
    np.testing.assert_array_equal(np.asarray(uncond["text_mask"]), neg_mask[:1].numpy())
    assert relative_error(cond["text"], embeds.numpy()) < TOL
    assert relative_error(uncond["text"], neg_embeds[:1].numpy()) < TOL


def test_sampling_without_the_text_encoder_after_encoding(converted):
    """The memory-saving route the README gives: encode the prompts, drop the T5 (most of the
    bundle), sample from the embeddings. Same latents as sampling from the text."""
    import dataclasses

    _, bundle = converted
    weights = load(bundle)
    cond, uncond = text_condition(weights, PROMPTS, "")
    lean = dataclasses.replace(weights, text_encoder=None)
    common = dict(steps=3, seed=2, output="latents")
    np.testing.assert_array_equal(np.asarray(sample(lean, cond, negative_prompt=uncond, **common)),
                                  np.asarray(sample(weights, PROMPTS, **common)))


def test_merging_runs_through_sample(converted):
    _, bundle = converted
    weights = load(bundle)
    base = sample(weights, PROMPTS, steps=6, output="latents")
    for method in (True, sdtm.ToMeConfig(ratio=0.5), sdtm.SDTMConfig(protect_every=3, cache_weight=0.1)):
        merged = sample(weights, PROMPTS, steps=6, output="latents", sdtm=method)
        assert merged.shape == base.shape and np.isfinite(merged).all()
        assert not np.allclose(merged, base)  # something was merged
    # Nothing merged and prompt weights of one: the baseline's program, the same numbers.
    idle = sdtm.SDTMConfig(ratio=0.0, deviation=0.0, prompt_weight=(1.0, 1.0))
    np.testing.assert_array_equal(sample(weights, PROMPTS, steps=6, output="latents", sdtm=idle), base)


def test_prompt_weight_by_stage(converted):
    _, bundle = converted
    weights = load(bundle)
    none = sdtm.SDTMConfig(ratio=0.0, deviation=0.0)
    base = sample(weights, PROMPTS, steps=6, output="latents", sdtm=none)
    detail_only = sample(weights, PROMPTS, steps=6, output="latents", sdtm=none.replace(prompt_weight=(1.0, 1.5)))
    # The structure stage (first 40%: steps 0-1 of 6... rounded, 2 steps) unchanged, then a heavier prompt.
    assert not np.allclose(detail_only, base)
    structure_all = sample(weights, PROMPTS, steps=6, output="latents",
                           sdtm=none.replace(prompt_weight=(1.5, 1.0), switch_step=1.0))
    everywhere = sample(weights, PROMPTS, steps=6, output="latents",
                        sdtm=none.replace(prompt_weight=(1.5, 1.5)))
    np.testing.assert_allclose(structure_all, everywhere, rtol=1e-6, atol=1e-6)


def test_images_decode_through_the_vae(converted):
    _, bundle = converted
    weights = load(bundle)
    images = sample(weights, "a cat", steps=2)
    side = weights.config.image_size
    assert images.shape == (1, side, side, 3) and images.dtype == np.uint8


def test_float16_keeps_the_text_encoder_bfloat16_and_the_vae_float32(converted):
    """float16 (GPUs without bfloat16 tensor cores): the transformer in float16, T5 in bfloat16
    (T5 v1.1 overflows float16), the VAE in float32; its latents are as close to float32's as
    bfloat16's are (this random tiny model amplifies rounding: both are off by a few percent)."""
    _, bundle = converted
    full, half = load(bundle), load(bundle, dtype=jnp.float16)
    dtypes = lambda w: {k: {a.dtype for a in jax.tree.leaves(getattr(w, k))} for k in ("dit", "text_encoder", "vae")}  # noqa: E731
    want = {"dit": {jnp.dtype(jnp.float16)}, "text_encoder": {jnp.dtype(jnp.bfloat16)}, "vae": {jnp.dtype(jnp.float32)}}
    assert dtypes(half) == want and dtypes(cast(full, jnp.float16)) == want
    x_T = np.random.default_rng(0).standard_normal((2, full.config.dit.input_size, full.config.dit.input_size, 4))
    latents = lambda w: sample(w, PROMPTS, latents=x_T.astype(np.float32), steps=6, output="latents")  # noqa: E731
    reference, ours = latents(full), latents(half)
    assert ours.dtype == np.float32 and np.isfinite(ours).all()
    assert relative_error(ours, reference) <= relative_error(latents(load(bundle, dtype=jnp.bfloat16)), reference)
    images = sample(half, "a cat", steps=2)
    assert images.dtype == np.uint8 and images.shape[-1] == 3


def test_bundle_keeps_the_tokenizer_and_bf16_text_encoder(converted, tmp_path):
    _, bundle = converted
    out = tmp_path / "bf16"
    assert convert_pixart.main([str(out), "--pipeline", str(bundle.parent / "pipeline"), "--max-text-length", "12"]) == 0
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["family"] == "pixart" and config["text_encoder"]["num_layers"] == 2
    weights = load(out, dtype=None)
    assert jax.tree.leaves(weights.text_encoder)[0].dtype == jnp.bfloat16
    assert jax.tree.leaves(weights.dit)[0].dtype == jnp.float32


def test_class_prompts_and_bad_text_input(converted):
    _, bundle = converted
    weights = load(bundle)
    with pytest.raises(ValueError, match="text prompts, got 3"):
        sample(weights, 3, steps=1)
    with pytest.raises(ValueError, match="negative_prompt as one too"):
        cond, _ = text_condition(weights, ["a cat"], None)
        sample(weights, cond, steps=1)


def test_long_prompt_is_truncated_with_a_warning(converted):
    _, bundle = converted
    weights = load(bundle)
    with pytest.warns(UserWarning, match="tokens were dropped"):
        text_condition(weights, [" ".join(["cat"] * 40)], "")


# ------------------------------------------------------------------------------------------------
# Errors: nothing is written unless everything converts


def test_missing_component_and_existing_output(converted, tmp_path, capsys):
    _, bundle = converted
    pipeline = bundle.parent / "pipeline"
    partial = tmp_path / "partial"
    shutil.copytree(pipeline, partial)
    shutil.rmtree(partial / "vae")
    out = tmp_path / "out"
    assert convert_pixart.main([str(out), "--pipeline", str(partial)]) == 1
    assert "vae" in capsys.readouterr().err and not out.exists()
    assert convert_pixart.main([str(tmp_path / "new" / "out"), "--pipeline", str(partial)]) == 1
    assert not (tmp_path / "new").exists()  # OUT's folder is made only once the inputs are there
    # A VAE folder without weights fails after the T5 is converted (and parked on disk): nothing is left.
    (partial / "vae").mkdir()
    shutil.copy(pipeline / "vae" / "config.json", partial / "vae")
    assert convert_pixart.main([str(out), "--pipeline", str(partial)]) == 1
    assert "no weights" in capsys.readouterr().err and not out.exists()
    assert not list(tmp_path.glob(".out.*"))  # neither the staging folder nor the parked arrays
    assert not list(bundle.parent.glob(".bundle.*"))  # a conversion that worked removed them too
    assert convert_pixart.main([str(bundle), "--pipeline", str(pipeline)]) == 2
    assert "exists" in capsys.readouterr().err


def test_broken_transformer_lists_the_keys(converted, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    _, bundle = converted
    broken = tmp_path / "broken"
    shutil.copytree(bundle.parent / "pipeline", broken)
    weights_file = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights_file))
    del tensors["proj_out.bias"]
    tensors["extra.weight"] = np.zeros(3, np.float32)
    save_file(tensors, str(weights_file))
    out = tmp_path / "out"
    assert convert_pixart.main([str(out), "--pipeline", str(broken)]) == 1
    err = capsys.readouterr().err
    assert "proj_out.bias" in err and "extra.weight" in err and not out.exists()
    assert not list(tmp_path.glob(".out.*"))  # no staging folder left behind


def test_text_encoder_that_does_not_fit_the_transformer(converted, tmp_path, capsys):
    _, bundle = converted
    mixed = tmp_path / "mixed"
    shutil.copytree(bundle.parent / "pipeline", mixed)
    config_file = mixed / "text_encoder" / "config.json"
    config = json.loads(config_file.read_text())
    config["d_model"] = 32
    config_file.write_text(json.dumps(config))
    assert convert_pixart.main([str(tmp_path / "out"), "--pipeline", str(mixed)]) == 1
    assert "do not belong together" in capsys.readouterr().err
