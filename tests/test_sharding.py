"""Data-parallel sampling: a batch split over 8 devices gives the single-device images.

The 8 devices are XLA's forced host devices, which exist only if XLA_FLAGS is set before jax is
imported, so the sharded runs happen in a subprocess; this pytest process keeps its one device
and computes the single-device references with the same bundle, seeds and prompts.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from dit_jax import sample
from dit_jax.models.dit import variant
from dit_jax.weights import BundleConfig, Weights, init_dit_params, load, save

ROOT = Path(__file__).resolve().parents[1]
CFG = variant("DiT-S/2", input_size=8, num_classes=10, depth=2, hidden_size=64, num_heads=4)
BATCH_LABELS = [3, 1, 4, 1, 5, 9, 2, 6]  # batch 8: one image per device
# name -> sample() arguments; ddpm draws sampler noise at every step, sdtm=True runs SSM then IDM
CASES = {
    "baseline": dict(sampler="ddpm", steps=4),
    "sdtm": dict(sdtm=True, sampler="ddim", steps=4),
}
COMMON = dict(seed=3, cfg_scale=1.5, output="latents")  # mild guidance: 4.0 multiplies float noise by ~7
COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")

# Runs with 8 host devices; prints one JSON line and saves the arrays to OUT/<name>.npy.
SHARDED_SCRIPT = r"""
import json, re, sys
import jax, numpy as np
from jax.sharding import Mesh
from dit_jax.pipeline import _run, prepare, sample
from dit_jax.weights import load

bundle, out, cases, common, labels, collectives = sys.argv[1:]
cases, common, labels, collectives = (json.loads(a) for a in (cases, common, labels, collectives))
weights = load(bundle)
report = {"devices": len(jax.devices())}

def run(name, prompts, **kwargs):
    plan, args = prepare(weights, prompts, **kwargs)
    compiled = _run.lower(*args, plan=plan).compile()
    result = compiled(*args)
    hlo = compiled.as_text()
    report[name] = {
        "devices": len(result.sharding.device_set),
        "split_over_data": getattr(result.sharding, "spec", None) == jax.sharding.PartitionSpec("data"),
        "shard_rows": sorted({s.data.shape[0] for s in result.addressable_shards}),
        "collectives": {c: len(re.findall(rf"\b{c}(?:-start)?\(", hlo)) for c in collectives},
    }
    np.save(f"{out}/{name}.npy", np.asarray(result))

for name, kwargs in cases.items():
    run(name, labels, **kwargs, **common)
run("fallback", labels[:6], **cases["baseline"], **common)  # 6 images do not split over 8 devices

mesh4 = Mesh(np.array(jax.devices()[:4]), ("data",))
np.save(f"{out}/mesh4.npy", sample(weights, labels, mesh=mesh4, **cases["baseline"], **common))
try:
    sample(weights, labels[:6], mesh=mesh4, **cases["baseline"], **common)
except ValueError as e:
    report["mesh4_error"] = str(e)
with jax.default_device(jax.devices()[5]):
    report["loaded_on"] = sorted({d.id for a in jax.tree.leaves(load(bundle)) for d in a.devices()})
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A tiny DiT with every parameter random (DiT's init zeroes adaLN and the final layer)."""
    rng = np.random.default_rng(0)

    def randomise(path, leaf):
        if jax.tree_util.keystr(path) == "['pos_embed']":
            return leaf  # the fixed sin-cos table
        scale = 1 / np.sqrt(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 0.05
        return (rng.standard_normal(leaf.shape) * scale).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(randomise, init_dit_params(CFG))
    return save(Weights(dit=params, config=BundleConfig(dit=CFG)), tmp_path_factory.mktemp("sharding") / "w")


@pytest.fixture(scope="module")
def sharded(bundle, tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("sharded")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    args = [json.dumps(a) for a in (CASES, COMMON, BATCH_LABELS, COLLECTIVES)]
    proc = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT, str(bundle), str(out), *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8
    return report, out


@pytest.fixture(scope="module")
def one_device(bundle) -> dict[str, np.ndarray]:
    """The single-device results of every case, computed in this (one-device) process."""
    assert len(jax.devices()) == 1  # this process must not see the forced host devices
    weights = load(bundle)
    return {name: sample(weights, BATCH_LABELS, **kwargs, **COMMON) for name, kwargs in CASES.items()}


def _relative_error(got, want) -> float:
    """Norm ratio ||got - want|| / ||want||. XLA:CPU sums a row of 2 images in another order than
    a row of 16 (layer norm, softmax), a few ulps that the sampler carries: about 2.5e-7 here."""
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


@pytest.mark.parametrize("name", list(CASES))
def test_eight_devices_give_the_single_device_result(sharded, one_device, name):
    report, out = sharded
    got = np.load(out / f"{name}.npy")
    assert report[name]["devices"] == 8 and report[name]["split_over_data"]
    assert report[name]["shard_rows"] == [1]  # one image per device
    assert _relative_error(got, one_device[name]) < 1e-6


def test_guided_batch_needs_no_communication(sharded):
    # Each device holds the conditional and unconditional rows of its own images: no collective.
    report, _ = sharded
    assert report["baseline"]["collectives"] == dict.fromkeys(COLLECTIVES, 0)


def test_sdtm_needs_no_communication(sharded):
    report, _ = sharded
    assert report["sdtm"]["collectives"] == dict.fromkeys(COLLECTIVES, 0)


def test_batch_that_does_not_divide_falls_back_to_one_device(sharded):
    report, out = sharded
    assert report["fallback"]["devices"] == 1 and report["fallback"]["shard_rows"] == [6]
    fallback = np.load(out / "fallback.npy")
    assert fallback.shape == (6, 8, 8, 4) and np.isfinite(fallback).all()


def test_explicit_mesh(sharded, one_device):
    report, out = sharded
    assert _relative_error(np.load(out / "mesh4.npy"), one_device["baseline"]) < 1e-6  # sample() on 4 devices
    assert report["mesh4_error"] == (
        "6 image(s) do not split over the 4 devices of the mesh's 'data' axis: use a multiple of 4 images, or mesh=None"
    )


def test_load_puts_the_weights_on_the_default_device(sharded):
    report, _ = sharded
    assert report["loaded_on"] == [5]  # under jax.default_device(device 5), not device 0


def test_mesh_without_data_axis_is_refused(bundle):
    mesh = Mesh(np.array(jax.devices()), ("model",))
    with pytest.raises(ValueError, match="mesh must be a jax.sharding.Mesh with an axis named 'data'"):
        sample(load(bundle), BATCH_LABELS, mesh=mesh, **COMMON)
