"""convert.dit: official and diffusers layouts, the CLI, and every error it must name."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from torch_dit import diffusers_dit, diffusers_state_dict, random_official_state_dict, relative_error

from convert.dit import main
from dit_jax.models.dit import variant
from dit_jax.weights import dit_module, load

CFG = variant("DiT-S/4", input_size=8, num_classes=10)


def _save_pt(sd, path):
    torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}, path)
    return path


def _forward(weights, x, t, y):
    return np.asarray(dit_module(weights)(jnp.asarray(x), jnp.asarray(t), jnp.asarray(y)))


@pytest.fixture(scope="module")
def official():
    return random_official_state_dict(CFG, seed=5)


@pytest.fixture(scope="module")
def reference(official):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    t, y = np.array([10, 999]), np.array([2, 10])
    with torch.no_grad():
        want = diffusers_dit(CFG, official)(
            torch.from_numpy(x.transpose(0, 3, 1, 2)), timestep=torch.from_numpy(t), class_labels=torch.from_numpy(y)
        ).sample.numpy().transpose(0, 2, 3, 1)
    return x, t, y, want


def test_official_pt_converts_and_matches(tmp_path, official, reference, capsys):
    src = _save_pt(official, tmp_path / "DiT-S-4-64x64.pt")
    assert main([str(src), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "found DiT-S/4: depth 12, hidden 384, heads 6, patch 4, input 8x8x4 (4 tokens)" in printed
    assert "learned sigma True" in printed and "wrote" in printed
    weights = load(tmp_path / "out")
    assert weights.config.dit == CFG
    x, t, y, want = reference
    assert relative_error(_forward(weights, x, t, y), want) < 1e-4


def test_official_safetensors_and_ema_wrapper(tmp_path, official, reference):
    save_file(official, str(tmp_path / "w.safetensors"))
    assert main([str(tmp_path / "w.safetensors"), str(tmp_path / "a")]) == 0
    # training checkpoints hold {"model", "ema", "opt", "args"}: the EMA weights are taken
    wrapped = {"ema": {k: torch.from_numpy(v) for k, v in official.items()},
               "model": {k: torch.zeros(v.shape) for k, v in official.items()}}
    torch.save(wrapped, tmp_path / "train.pt")
    assert main([str(tmp_path / "train.pt"), str(tmp_path / "b")]) == 0
    x, t, y, want = reference
    for out in ("a", "b"):
        assert relative_error(_forward(load(tmp_path / out), x, t, y), want) < 1e-4


def test_diffusers_directory_converts_and_matches(tmp_path, official, reference, capsys):
    model = diffusers_dit(CFG, official)
    model.save_pretrained(tmp_path / "transformer")
    assert main([str(tmp_path / "transformer"), str(tmp_path / "out")]) == 0
    assert "per-block timestep and class embedders are all equal" in capsys.readouterr().out
    x, t, y, want = reference
    assert relative_error(_forward(load(tmp_path / "out"), x, t, y), want) < 1e-4


def test_diffusers_unequal_embedders_are_refused(tmp_path, official, capsys):
    sd = diffusers_state_dict(CFG, official)
    sd["transformer_blocks.3.norm1.emb.class_embedder.embedding_table.weight"] = (
        sd["transformer_blocks.3.norm1.emb.class_embedder.embedding_table.weight"] + 1.0
    )
    save_file(sd, str(tmp_path / "d.safetensors"))
    assert main([str(tmp_path / "d.safetensors"), str(tmp_path / "out"), "--input-size", "8"]) == 1
    assert "differ between blocks: y_embedder.embedding_table.weight" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _fails(tmp_path, sd, capsys, *extra):
    src = _save_pt(sd, tmp_path / "bad.pt")
    assert main([str(src), str(tmp_path / "out"), *extra]) == 1
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.pt"]  # nothing half-written beside OUT either
    return capsys.readouterr().err


def test_missing_key_is_named(tmp_path, official, capsys):
    sd = dict(official)
    del sd["blocks.4.mlp.fc2.bias"], sd["blocks.0.attn.qkv.weight"]
    err = _fails(tmp_path, sd, capsys)
    assert "missing keys (2):\n  blocks.0.attn.qkv.weight\n  blocks.4.mlp.fc2.bias" in err


def test_extra_key_is_named(tmp_path, official, capsys):
    sd = dict(official, **{"blocks.2.attn.rel_pos": np.zeros(3, np.float32)})
    assert "unexpected keys (1):\n  blocks.2.attn.rel_pos" in _fails(tmp_path, sd, capsys)


def test_shape_mismatch_shows_both_shapes(tmp_path, official, capsys):
    sd = dict(official)
    sd["blocks.1.mlp.fc1.weight"] = np.zeros((1500, 384), np.float32)
    err = _fails(tmp_path, sd, capsys)
    assert "blocks.1.mlp.fc1.weight: checkpoint has (1500, 384), expected (1536, 384)" in err


def test_heads_that_do_not_divide_the_width_are_refused(tmp_path, official, capsys):
    assert "hidden_size 384 is not divisible by num_heads 5" in _fails(tmp_path, dict(official), capsys, "--num-heads", "5")


def test_class_names_must_be_a_json_list_of_strings(tmp_path, tmp_path_factory, official, capsys):
    names = tmp_path_factory.mktemp("names") / "names.json"
    names.write_text("{oops")
    assert "not a readable JSON list of names" in _fails(tmp_path, dict(official), capsys, "--class-names", str(names))


def test_unreadable_file(tmp_path, capsys):
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert main([str(tmp_path / "bad.pt"), str(tmp_path / "out")]) == 1
    assert "not a readable PyTorch checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_existing_out_is_refused_without_force(tmp_path, official, capsys):
    src = _save_pt(official, tmp_path / "w.pt")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main([str(src), str(tmp_path / "out")]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert main([str(src), str(tmp_path / "out"), "--force"]) == 0
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "config.json").exists()
