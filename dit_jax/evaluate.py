"""Quality harness: what SDTM and ToMe cost in sample quality at the speed they give.

    python -m dit_jax.evaluate                                   # every preset, 50 samples each (~15-20 min, 2 CPU cores)
    python -m dit_jax.evaluate --num-samples 200 --configs baseline sdtm "sdtm:ratio=0.2,deviation=0.05"

On the embedded default model (a pixel-space class-conditional DiT trained on Fashion-MNIST), each
configuration samples the same prompts (balanced over the 10 classes) from the same initial noise
(one seed per batch, shared by every configuration). Speed: every configuration is compiled first
(compile time apart), then all of them generate batch after batch in turn (baseline and variants
interleaved) and the median time of their calls of the same compiled sampler gives the speed-up.
`--weights` takes another Fashion-MNIST bundle, such as the text-conditioned PixArt that
`python -m dit_jax.train --family pixart` trains: it is prompted with each class's first caption
("a photo of a sneaker") and sampled with its family's sampler (DPM-Solver++).
Quality, against a balanced subset of the Fashion-MNIST test set:

- prompt adherence: the share of samples the shipped classifier (dit_jax.classifier) puts in the
  class they were prompted with;
- FD-classifier: Frechet distance in that classifier's 128-d penultimate features;
- FD-EffLite0: Frechet distance in ImageNet EfficientNet-Lite0 features (dit_jax.effnet; 1280-d,
  images upsampled to 224 px). It is not FID: another network, other features, other numbers;
- KID next to each FD (unbiased polynomial-kernel MMD^2, x 10^3): FD is biased upwards at small
  sample counts, KID is not, so KID is the one to compare across sample counts.

A "test images" row scores N real test images (disjoint from the reference subset) the same way:
the floor every metric has at this sample count.

ToMe is run at the speed SDTM reaches: its merge ratio is searched (a few timed probes) until its
measured speed-up is within 5% of the SDTM row it is matched with (`sdtm=True`, and the defaults
with the official release's protected steps and cache blend).

Configuration specs (--configs): a preset name (see PRESETS), or KIND[:key=value,...] with KIND
"sdtm" (SDTMConfig fields) or "tome" (ToMeConfig fields; ratio=match searches the ratio, matched
to the row named by target=NAME, default sdtm), e.g. "sdtm:ratio=0.2,deviation=0.05,switch_step=1.0",
"sdtm:protect_every=3,cache_weight=0.1", "tome:ratio=match,target=sdtm-release".
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np

import sdtm as sdtm_lib
from dit_jax import classifier as classifier_lib
from dit_jax.data import CLASS_NAMES, caption, load_fashion_mnist
from dit_jax.devices import DTYPE_NAMES
from dit_jax.metrics import Reference
from dit_jax.outputs import check_output
from dit_jax.pipeline import FAMILY_DEFAULTS, _run, prepare
from dit_jax.report import Row, markdown_report, quality_figure
from sdtm.config import parse_fields

DEFAULT_OUT = Path("docs/quality.md")
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dit_jax" / "quality"
SPEEDUP_TOLERANCE = 0.05  # ToMe's speed-up must land within 5% of SDTM's
PROBE_CALLS = 2  # timed calls per ToMe ratio probe (--probe-calls)


# ---------------------------------------------------------------------------------------------
# Configurations


def _sweep(ratio: float, **extra) -> sdtm_lib.SDTMConfig:
    # The defaults' schedule shape (deviation 0.4 x ratio: 0.5 +- 0.2) at another ratio.
    return sdtm_lib.SDTMConfig(ratio=ratio, deviation=round(0.4 * ratio, 4), **extra)


# The official release's extras as its sample.py sets them: a full-resolution step in three, and
# merged tokens' outputs blended 0.1 : 0.9 with those steps' cached outputs.
RELEASE_EXTRAS = {"protect_every": 3, "cache_weight": 0.1}
# What a sweep on the shipped model found (docs/quality-release-sweep*.md): SSM longer, and merged
# tokens taking 98% of their output from the last protected step.
TUNED = {"protect_every": 3, "cache_weight": 0.02, "switch_step": 0.7}
MATCH = "match"  # a ToMe ratio to be searched


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """One row of the table: a name, a merging method (as sample() takes it), what it tests.

    A ToMe row whose ratio is searched has `method` = a dict of ToMeConfig fields with ratio
    MATCH, and `match_target` = the name of the row whose measured speed-up it must reach.
    """

    name: str
    method: object  # False, SDTMConfig, ToMeConfig, or dict of ToMeConfig fields with ratio MATCH
    note: str = ""
    match_target: str | None = None

    @property
    def needs_match(self) -> bool:
        return self.match_target is not None

    def resolved(self, tome_ratio: float | None) -> EvalConfig:
        """The same row with a searched ToMe ratio filled in."""
        if not self.needs_match:
            return self
        if tome_ratio is None:
            raise ValueError(f"{self.name}: no ToMe ratio was searched")
        fields = dict(self.method, ratio=tome_ratio)
        return dataclasses.replace(self, method=sdtm_lib.ToMeConfig(**fields))


def _preset(name: str, method, note: str, match_target: str | None = None) -> tuple[str, EvalConfig]:
    return name, EvalConfig(name, method, note, match_target)


PRESETS: dict[str, EvalConfig] = dict([
    _preset("baseline", False, "no merging"),
    _preset("sdtm", sdtm_lib.SDTMConfig(), "sdtm=True: the paper's defaults"),
    _preset("tome-matched", {"ratio": MATCH}, "ToMe (attention only) at sdtm's measured speed-up", "sdtm"),
    _preset("tome-mlp-matched", {"ratio": MATCH, "merge_mlp": True},
            "ToMe merging attention and MLP inputs at tome-matched's ratio: is MLP merging the culprit?", "sdtm"),
    _preset("tome-mlp-r0.1", sdtm_lib.ToMeConfig(ratio=0.1, merge_mlp=True), "how little MLP merging still hurts?"),
    _preset("tome-r0.75", sdtm_lib.ToMeConfig(ratio=0.75), "ToMe's largest ratio with 2x2 windows: its fastest setting"),
    _preset("sdtm-release", sdtm_lib.SDTMConfig(**RELEASE_EXTRAS),
            "the defaults plus the official release's protected steps (every 3rd) and cache blend (0.1)"),
    _preset("tome-matched-release", {"ratio": MATCH}, "ToMe (attention only) at sdtm-release's measured speed-up",
            "sdtm-release"),
    _preset("sdtm-tuned", sdtm_lib.SDTMConfig(**TUNED),
            "settings found for this model: the release's protected steps, a lighter cache blend (0.02), "
            "structure stage to 70% of the steps"),
    _preset("tome-matched-tuned", {"ratio": MATCH}, "ToMe (attention only) at sdtm-tuned's measured speed-up",
            "sdtm-tuned"),
    _preset("sdtm-cached", sdtm_lib.SDTMConfig(**dict(TUNED, cache_weight=0.0)),
            "sdtm-tuned with merged tokens taking their whole output from the last protected step "
            "(found at guidance 2.0, docs/quality-guidance.md)"),
    _preset("tome-matched-cached", {"ratio": MATCH}, "ToMe (attention only) at sdtm-cached's measured speed-up",
            "sdtm-cached"),
    _preset("sdtm-protect-only", sdtm_lib.SDTMConfig(protect_every=3),
            "protected steps without the cache blend (cache_weight 1)"),
    _preset("sdtm-release-r0.3", _sweep(0.3, **RELEASE_EXTRAS), "release extras at ratio 0.3 +- 0.12"),
    _preset("sdtm-no-freq", sdtm_lib.SDTMConfig(frequency=None), "no frequency priority"),
    _preset("sdtm-no-cra", sdtm_lib.SDTMConfig(deviation=0.0), "no ratio schedule (deviation 0)"),
    _preset("sdtm-ssm-only", sdtm_lib.SDTMConfig(switch_step=1.0), "SSM at every step (no IDM)"),
    _preset("sdtm-idm-only", sdtm_lib.SDTMConfig(switch_step=0), "IDM at every step (no SSM)"),
    _preset("sdtm-freq-merged", sdtm_lib.SDTMConfig(frequency="merged"), 'frequency="merged" (the release\'s counter)'),
    _preset("sdtm-idm-freq-score", sdtm_lib.SDTMConfig(idm_score="frequency"), 'idm_score="frequency" (the release\'s)'),
    _preset("sdtm-r0.1", _sweep(0.1), "ratio 0.1 +- 0.04"),
    _preset("sdtm-r0.2", _sweep(0.2), "ratio 0.2 +- 0.08"),
    _preset("sdtm-r0.3", _sweep(0.3), "ratio 0.3 +- 0.12"),
])
DEFAULT_CONFIGS: tuple[str, ...] = tuple(PRESETS)


def parse_config(spec: str) -> EvalConfig:
    """A preset name, or "sdtm[:key=value,...]" / "tome[:key=value,...]" -> EvalConfig.

    "tome:ratio=match" searches the ratio at which ToMe's speed-up meets the row named by
    target=NAME (default: the sdtm row). Raises ValueError naming the bad part.
    """
    spec = spec.strip()
    if spec in PRESETS:
        return PRESETS[spec]
    kind, _, rest = spec.partition(":")
    if kind not in ("sdtm", "tome"):
        raise ValueError(
            f"unknown configuration {spec!r}: use a preset ({', '.join(PRESETS)}) or "
            "sdtm:key=value,... / tome:key=value,..."
        )
    cls = sdtm_lib.SDTMConfig if kind == "sdtm" else sdtm_lib.ToMeConfig
    try:
        fields = parse_fields(cls, rest, frozenset({"target"}) if kind == "tome" else frozenset())
    except ValueError as e:
        raise ValueError(f"{spec!r}: {e}") from None
    target = fields.pop("target", None)
    if kind == "tome" and fields.get("ratio") == MATCH:
        try:
            cls(**dict(fields, ratio=0.5))  # validate the other fields now
        except TypeError as e:
            raise ValueError(f"{spec!r}: {e}") from None
        target = target or "sdtm"
        return EvalConfig(spec, fields, f"ToMe at {target}'s measured speed-up", target)
    if target is not None:
        raise ValueError(f"{spec!r}: target= goes with ratio=match only")
    try:
        return EvalConfig(spec, cls(**fields), "")
    except TypeError as e:
        raise ValueError(f"{spec!r}: {e}") from None


def parse_configs(specs: Sequence[str]) -> list[EvalConfig]:
    """Specs -> configurations with the baseline first (added if missing); names must be unique
    and every searched ToMe row's target must be an SDTM row of the run."""
    configs = [parse_config(s) for s in specs]
    if not any(c.method is False for c in configs):
        configs.insert(0, parse_config("baseline"))
    baseline = next(c for c in configs if c.method is False)
    configs = [baseline] + [c for c in configs if c is not baseline]
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"configuration names repeat: {names}")
    sdtm_rows = {c.name for c in configs if isinstance(c.method, sdtm_lib.SDTMConfig)}
    for c in configs:
        if c.needs_match and c.match_target not in sdtm_rows:
            raise ValueError(
                f"{c.name} matches the speed-up of {c.match_target!r}, which is not an SDTM row of this run: "
                f"add `{c.match_target}` to --configs"
            )
    return configs


def describe(method) -> str:
    """A short readable form of a method for the table's definitions."""
    if method is False:
        return "no merging"
    if isinstance(method, dict):
        return f"ToMeConfig({', '.join(f'{k}={v!r}' for k, v in method.items())})"
    default = type(method)()
    changed = {f.name: getattr(method, f.name) for f in dataclasses.fields(method)
               if getattr(method, f.name) != getattr(default, f.name)}
    return f"{type(method).__name__}({', '.join(f'{k}={v!r}' for k, v in changed.items())})"


# ---------------------------------------------------------------------------------------------
# ToMe ratio search


@dataclasses.dataclass(frozen=True)
class Probe:
    merge_count: int
    speedup: float


def match_merge_count(
    target: float | Callable[[], float],
    measure: Callable[[int], float],
    *,
    num_tokens: int,
    max_count: int,
    tolerance: float = SPEEDUP_TOLERANCE,
    max_probes: int = 5,
) -> tuple[int, list[Probe], bool]:
    """Find the ToMe merge count whose measured speed-up is within `tolerance` of `target`.

    target: the speed-up to reach, or a callable giving its latest estimate (read after every
    probe). measure(merge_count) -> speed-up (one timed probe). The first probe merges half the
    tokens; later ones interpolate linearly in 1/speed-up (time) between the two probes closest to
    the target (attention-only merging saves time about in proportion to the tokens removed).

    Returns (merge count, probes, reached): the probe closest to the target; reached is False
    when none came within tolerance (e.g. ToMe's maximum ratio is slower than the target).
    """
    def goal() -> float:
        value = float(target() if callable(target) else target)
        if not value > 0:
            raise ValueError(f"target speed-up {value} must be > 0")
        return value

    goal()
    if max_count < 1:
        raise ValueError(f"max_count {max_count} must be >= 1")
    probes: list[Probe] = []

    def miss(p: Probe, aim: float) -> float:
        return abs(p.speedup / aim - 1.0)

    count = min(max_count, num_tokens // 2)
    for _ in range(max_probes):
        probe = Probe(count, measure(count))
        probes.append(probe)
        aim = goal()
        if miss(probe, aim) <= tolerance:
            return probe.merge_count, probes, True
        # time (1/speed-up) as a line through the two points nearest the target, (0, 1) included
        points = sorted({(p.merge_count, 1.0 / p.speedup) for p in probes} | {(0, 1.0)},
                        key=lambda q: abs(1.0 / q[1] - aim))[:2]
        (m0, t0), (m1, t1) = points
        slope = (t1 - t0) / (m1 - m0) if m1 != m0 else 0.0
        if slope >= 0:  # more merging did not help: noise or overhead; step towards the target
            guess = count + (num_tokens // 8) * (1 if probe.speedup < aim else -1)
        else:
            guess = m0 + (1.0 / aim - t0) / slope
        next_count = int(min(max(round(guess), 1), max_count))
        tried = {p.merge_count for p in probes}
        if next_count in tried:
            if next_count == max_count and probe.speedup < aim:
                break  # the most ToMe can merge is still too slow
            step = 1 if probe.speedup < aim else -1
            while next_count in tried and 1 <= next_count + step <= max_count:
                next_count += step
            if next_count in tried:
                break
        count = next_count
    aim = goal()
    best = min(probes, key=lambda p: miss(p, aim))
    return best.merge_count, probes, miss(best, aim) <= tolerance


# ---------------------------------------------------------------------------------------------
# Sampling and timing


class TimedSampler:
    """Compiled samplers per configuration, each run on batch after batch with the same prompts
    and seeds; every call is timed and its images kept."""

    def __init__(self, weights, num_samples: int, batch_size: int, steps: int, cfg_scale: float, seed: int, log):
        from dit_jax.weights import dit_module

        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"num_samples {num_samples} and batch_size {batch_size} must be >= 1")
        self.weights = weights
        dit_module(weights)  # the one-time module graph build, here so that no configuration's compile pays it
        self.num_classes = len(weights.config.class_names)
        self.batch_size = batch_size
        self.num_batches = -(-num_samples // batch_size)
        self.num_samples = num_samples
        # Balanced prompts: sample i is prompted with class i mod 10 (a batch of 10 holds each once).
        self.labels = np.arange(self.num_batches * batch_size) % self.num_classes
        self.steps, self.cfg_scale, self.seed = steps, cfg_scale, seed
        self.log = log
        self.compiled: dict[str, tuple] = {}  # name -> (compiled sampler, method, SamplingPlan)
        self.compile_s: dict[str, float] = {}
        self.times: dict[str, list[float]] = {}  # every timed call
        self.round_times: dict[str, list[float]] = {}  # the calls of generate_rounds
        self.images: dict[str, dict[int, np.ndarray]] = {}

    def batch_args(self, method, index: int):
        labels = [int(i) for i in self.labels[index * self.batch_size:(index + 1) * self.batch_size]]
        # A text model (trained with --family pixart) is prompted with its class's first caption.
        prompts = [caption(i) for i in labels] if self.weights.config.text_conditioned else labels
        return prepare(self.weights, prompts, sdtm=method, steps=self.steps, cfg_scale=self.cfg_scale,
                             seed=self.seed + index)

    def compile(self, name: str, method) -> None:
        plan, args = self.batch_args(method, 0)
        start = time.perf_counter()
        compiled = _run.lower(*args, plan=plan).compile()
        self.compile_s[name] = time.perf_counter() - start
        self.compiled[name] = (compiled, method, plan)
        self.times.setdefault(name, [])
        self.images.setdefault(name, {})
        phases = ", ".join(f"{p.strategy} {p.merge_count} x{p.num_steps}" for p in plan.phases)
        self.log(f"  compiled {name}: {self.compile_s[name]:.1f}s [{phases}]")

    def run(self, name: str, index: int, *, keep: bool = True) -> float:
        """Generate batch `index` with configuration `name`; returns (and records) its time."""
        compiled, method, _ = self.compiled[name]
        _, args = self.batch_args(method, index)
        jax.block_until_ready(args)
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        elapsed = time.perf_counter() - start
        self.times[name].append(elapsed)
        if keep:
            self.images[name][index] = np.asarray(out)
        return elapsed

    def generate_rounds(self, names: Sequence[str]) -> None:
        """Round r runs every configuration on batch r, in turn: it generates the batch, or times
        it again (discarding the images) when the ToMe search already made it. These calls, one
        per configuration per round, are the ones the table's speed-ups come from."""
        for index in range(self.num_batches):
            for name in names:
                elapsed = self.run(name, index, keep=index not in self.images[name])
                self.round_times.setdefault(name, []).append(elapsed)
            self.log(f"  round {index + 1}/{self.num_batches}: "
                     + ", ".join(f"{n} {self.round_times[n][-1]:.1f}s" for n in names))

    def round_median(self, name: str) -> float:
        return statistics.median(self.round_times[name])

    def samples(self, name: str) -> np.ndarray:
        batches = self.images[name]
        return np.concatenate([batches[i] for i in range(self.num_batches)])[: self.num_samples]

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def token_shares(self, name: str) -> tuple[float, float]:
        """(attention queries, MLP tokens) processed, as a share of the baseline's, over all steps."""
        from dit_jax.bench import step_tokens, token_shares

        n = self.weights.config.dit.num_tokens
        return token_shares(step_tokens(self.compiled[name][2], n), n)


def search_tome(
    sampler: TimedSampler, baseline: str, reference: str, log, calls_per_probe: int = 2
) -> tuple[float, list[Probe], bool, float]:
    """Time the baseline and SDTM (their first batches, kept), then probe ToMe ratios until its
    speed-up is within 5% of SDTM's. Each probe is timed `calls_per_probe` times, each time right
    after a call of the baseline and of SDTM on their next batch (kept: that work is not wasted);
    its speed-up is the median baseline time of those rounds over its own median.
    Returns (ratio, probes, reached, SDTM's speed-up over every round so far)."""
    num_tokens = sampler.weights.config.dit.num_tokens
    max_count = math.floor(num_tokens * (1 - 1 / 4))  # 2x2 windows keep one destination each
    next_index = [0]

    def pair_round() -> float:
        index = next_index[0] % sampler.num_batches
        next_index[0] += 1
        t_base = sampler.run(baseline, index, keep=index not in sampler.images[baseline])
        sampler.run(reference, index, keep=index not in sampler.images[reference])
        return t_base

    pair_round()
    log(f"  SDTM speed-up after one round: {sampler.median(baseline) / sampler.median(reference):.3f}x")

    def measure(count: int) -> float:
        name = f"_probe_tome_{count}"
        sampler.compile(name, sdtm_lib.ToMeConfig(ratio=count / num_tokens))
        base_times, probe_times = [], []
        for _ in range(calls_per_probe):
            base_times.append(pair_round())
            probe_times.append(sampler.run(name, 0, keep=False))
        speedup = statistics.median(base_times) / statistics.median(probe_times)
        log(f"  probe ToMe ratio {count / num_tokens:.4f} ({count} tokens): {speedup:.3f}x "
            f"(SDTM {sampler.median(baseline) / sampler.median(reference):.3f}x)")
        return speedup

    # The target is re-read after every probe: each probe round times SDTM again.
    count, probes, reached = match_merge_count(
        lambda: sampler.median(baseline) / sampler.median(reference), measure,
        num_tokens=num_tokens, max_count=max_count,
    )
    for name in [n for n in sampler.compiled if n.startswith("_probe_tome_")]:
        del sampler.compiled[name]  # free the probes' programs
    return count / num_tokens, probes, reached, sampler.median(baseline) / sampler.median(reference)


# ---------------------------------------------------------------------------------------------
# Reference data and features


def balanced_indices(labels: np.ndarray, per_class: int, skip_per_class: int = 0) -> np.ndarray:
    """The first `per_class` images of every class after skipping `skip_per_class` of each,
    interleaved by class (i-th image of class 0, of class 1, ...)."""
    columns = []
    for c in range(len(CLASS_NAMES)):
        found = np.flatnonzero(labels == c)[skip_per_class:skip_per_class + per_class]
        if len(found) < per_class:
            raise ValueError(f"class {c} has {len(found) + skip_per_class} test images, need {per_class + skip_per_class}")
        columns.append(found)
    return np.stack(columns, axis=1).reshape(-1)


class EffLiteScorer:
    """EfficientNet-Lite0 features with a disk cache for the (fixed) reference set."""

    def __init__(self, image_size: int, cache_dir: Path | None, log):
        from dit_jax import effnet

        self.effnet = effnet
        self.path = effnet.default_weights_path()
        self.params = effnet.load_efflite0(str(self.path))
        self.image_size = image_size
        self.cache_dir = cache_dir
        self.log = log

    def features(self, images: np.ndarray) -> np.ndarray:
        return self.effnet.efflite0_features(self.params, images, image_size=self.image_size)

    def reference_features(self, images: np.ndarray) -> np.ndarray:
        key = hashlib.sha256(images.tobytes()).hexdigest()[:16]
        stat = self.path.stat()
        name = f"efflite0-{self.image_size}px-{len(images)}-{key}-{stat.st_size}.npy"
        cached = None if self.cache_dir is None else self.cache_dir / name
        if cached is not None and cached.is_file():
            return np.load(cached)
        start = time.perf_counter()
        features = self.features(images)
        self.log(f"  EfficientNet-Lite0 features of {len(images)} reference images: {time.perf_counter() - start:.0f}s")
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            np.save(cached, features)
        return features


# ---------------------------------------------------------------------------------------------
# The run


def evaluate(args: argparse.Namespace, command: str, log=print) -> list[Row]:
    """Everything `main` does after parsing: returns the rows and writes the table and the plot."""
    from dit_jax.weights import load

    configs = parse_configs(args.configs)
    if args.probe_calls < 1:
        raise ValueError(f"--probe-calls {args.probe_calls} must be at least 1")
    if args.reference_size % 10 or args.reference_size < 20:
        raise ValueError(f"--reference-size {args.reference_size} must be a multiple of 10, at least 20")
    if args.reference_size + args.num_samples > 10_000:
        raise ValueError("--reference-size + --num-samples must fit in the 10,000 test images (the real-image row "
                         "uses test images the reference does not)")
    weights = load(args.weights, dtype=args.dtype)
    if weights.config.class_names is None or tuple(weights.config.class_names) != CLASS_NAMES:
        raise ValueError("the quality harness scores Fashion-MNIST models: these weights have other classes")
    sampler = TimedSampler(weights, args.num_samples, args.batch_size, args.steps, args.cfg, args.seed, log)
    for c in configs:  # impossible settings (a ratio the grid cannot give, ...) fail now, before any work
        if not c.needs_match:
            sampler.batch_args(c.method, 0)
    judge = classifier_lib.load_classifier(args.classifier)
    judge_info = classifier_lib.bundle_info(args.classifier)
    test_images, test_labels = load_fashion_mnist("test", args.data_root)
    ref_idx = balanced_indices(test_labels, args.reference_size // 10)
    real_per_class = -(-args.num_samples // 10)
    real_idx = balanced_indices(test_labels, real_per_class, skip_per_class=args.reference_size // 10)[: args.num_samples]
    eff = None
    if not args.skip_efflite:
        eff = EffLiteScorer(args.efflite_size, None if args.no_cache else Path(args.cache_dir), log)

    log(f"reference: {len(ref_idx)} test images; scoring with the classifier"
        + ("" if eff is None else f" and EfficientNet-Lite0 at {args.efflite_size} px"))
    _, ref_clf = classifier_lib.classify(judge, test_images[ref_idx])
    ref_clf = Reference.of(ref_clf)
    ref_eff = None if eff is None else Reference.of(eff.reference_features(test_images[ref_idx]))

    log(f"compiling {len(configs)} configurations ({args.steps} steps, batch {args.batch_size})")
    searches: dict[str, dict] = {}  # target row -> its ToMe ratio search
    for c in configs:
        if not c.needs_match:
            sampler.compile(c.name, c.method)
    for target in dict.fromkeys(c.match_target for c in configs if c.needs_match):
        log(f"searching ToMe's ratio for {target}'s speed-up")
        ratio, probes, reached, speedup = search_tome(sampler, configs[0].name, target, log, args.probe_calls)
        searches[target] = {"ratio": ratio, "reached": reached, "target": speedup, "tolerance": SPEEDUP_TOLERANCE,
                            "calls_per_probe": args.probe_calls,
                            "probes": [{"ratio": p.merge_count / weights.config.dit.num_tokens, "speedup": p.speedup}
                                       for p in probes]}
    configs = [c.resolved(searches[c.match_target]["ratio"]) if c.needs_match else c for c in configs]
    for c in configs:
        if c.name not in sampler.compiled:
            sampler.compile(c.name, c.method)
    log(f"generating {args.num_samples} samples per configuration: {sampler.num_batches} rounds of every configuration")
    sampler.generate_rounds([c.name for c in configs])

    rows: list[Row] = []
    strips = []
    base_median = sampler.round_median(configs[0].name)

    def score(images: np.ndarray, labels: np.ndarray) -> dict:
        logits, feats = classifier_lib.classify(judge, images)
        fd, kid, se = ref_clf.scores(feats)
        out = {"adherence": float((logits.argmax(-1) == labels).mean()), "fd_classifier": fd, "kid_classifier": (kid, se)}
        if eff is not None:
            fd_e, kid_e, se_e = ref_eff.scores(eff.features(images))
            out.update(fd_efflite=fd_e, kid_efflite=(kid_e, se_e))
        return out

    log("scoring")
    prompts = sampler.labels[: args.num_samples]
    for c in configs:
        images = sampler.samples(c.name)
        attn, mlp = sampler.token_shares(c.name)
        median = sampler.round_median(c.name)
        rows.append(Row(
            name=c.name, note=c.note, definition=describe(c.method), samples=len(images),
            speedup=base_median / median, seconds_per_image=median / args.batch_size,
            compile_s=sampler.compile_s[c.name], attn_share=attn, mlp_share=mlp, **score(images, prompts),
        ))
        strips.append((c.name, images))
        log(f"  {c.name}: {rows[-1].speedup:.2f}x, adherence {rows[-1].adherence:.3f}, "
            f"FD-classifier {rows[-1].fd_classifier:.2f}"
            + ("" if eff is None else f", FD-EffLite0 {rows[-1].fd_efflite:.2f}"))
    real_images = test_images[real_idx]
    rows.append(Row(
        name="test images", note="real images, disjoint from the reference: the floor at this sample count",
        definition="Fashion-MNIST test set", samples=len(real_images), speedup=None, seconds_per_image=None,
        compile_s=None, attn_share=None, mlp_share=None, **score(real_images, test_labels[real_idx]),
    ))
    strips.append(("test images", real_images))

    out = Path(args.out)
    png = out.with_suffix(".png")
    device = jax.devices()[0]
    family_name = type(weights.config.dit).family_name
    context = {
        "command": command,
        "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "machine": f"{device.platform}:{device.device_kind}, {os.cpu_count()} CPU cores, jax {jax.__version__}, "
                   f"{platform.machine()}",
        "model": ("the embedded default DiT" if args.weights is None else f"`{args.weights}`")
                 + f" ({family_name} hidden {weights.config.dit.hidden_size}, depth {weights.config.dit.depth}, "
                 f"{weights.config.dit.num_tokens} tokens)",
        "title": "the shipped Fashion-MNIST DiT" if args.weights is None else f"a Fashion-MNIST {family_name}",
        "sampler": FAMILY_DEFAULTS[weights.config.family].sampler.upper(),  # DDIM, DPM++
        "prompts": "captions such as \"a photo of a sneaker\"" if weights.config.text_conditioned else "prompts",
        "steps": args.steps, "cfg_scale": args.cfg, "num_samples": args.num_samples, "batch_size": args.batch_size,
        "seed": args.seed, "repeats": sampler.num_batches,
        "reference_size": len(ref_idx), "classifier_accuracy": judge_info.get("test_accuracy", "unknown"),
        "efflite_size": args.efflite_size, "png_name": png.name, "tome_searches": searches,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown_report(rows, context))
    quality_figure(rows, strips).save(png)
    if args.json:
        Path(args.json).write_text(json.dumps({"context": context, "rows": [r.to_dict() for r in rows],
                                               "round_times": sampler.round_times, "all_times": sampler.times},
                                              indent=2, default=str) + "\n")
    log(f"wrote {out} and {png}")
    return rows


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dit_jax.evaluate", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="presets: " + ", ".join(PRESETS))
    ap.add_argument("--num-samples", type=int, default=50, help="samples per configuration (default 50)")
    ap.add_argument("--steps", type=int, default=20,
                    help="sampler steps (default 20): DDIM for a DiT, DPM-Solver++ for a PixArt")
    ap.add_argument("--cfg", type=float, default=4.0, help="guidance scale (default 4.0)")
    ap.add_argument("--batch-size", type=int, default=10, help="images per timed call (default 10)")
    ap.add_argument("--seed", type=int, default=0, help="batch i uses seed SEED+i in every configuration")
    ap.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), metavar="SPEC",
                    help="presets or sdtm:key=value,... / tome:key=value,... (default: every preset)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="markdown table to write; the plot goes beside it (.png)")
    ap.add_argument("--json", help="also write every number (and every timing) here")
    ap.add_argument("--reference-size", type=int, default=2000, help="balanced test images to compare with")
    ap.add_argument("--skip-efflite", action="store_true", help="leave out FD-EffLite0 (no weights package needed)")
    ap.add_argument("--efflite-size", type=int, default=224, help="EfficientNet-Lite0 input side (default 224)")
    ap.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="where reference features are cached")
    ap.add_argument("--no-cache", action="store_true", help="do not read or write cached reference features")
    ap.add_argument("--weights", help="a Fashion-MNIST bundle (default: the shipped DiT; a text model from "
                                      "`python -m dit_jax.train --family pixart` is prompted with captions)")
    ap.add_argument("--dtype", default="float32", choices=DTYPE_NAMES,
                    help="the model's parameters and compute (load's dtype; the judges stay float32)")
    ap.add_argument("--classifier", help="classifier bundle (default: the shipped one)")
    ap.add_argument("--data-root", help="folder of the Fashion-MNIST idx files")
    ap.add_argument("--compile-cache", metavar="DIR", help="JAX's persistent compilation cache directory")
    ap.add_argument("--probe-calls", type=int, default=PROBE_CALLS,
                    help=f"timed calls per probe of the ToMe ratio search (default {PROBE_CALLS})")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = "python -m dit_jax.evaluate " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    command = command.strip()
    start = time.perf_counter()
    try:
        if args.num_samples < 2 or args.steps < 1 or args.batch_size < 1:
            raise ValueError("--num-samples must be >= 2, --steps and --batch-size >= 1")
        if args.efflite_size < 32:
            raise ValueError(f"--efflite-size must be >= 32 px (EfficientNet-Lite0 halves it five times), "
                             f"got {args.efflite_size}")
        for flag, name in (("--out", args.out), ("--json", args.json)):  # found out now, not after the run
            if name is not None:
                check_output(flag, name)
        if args.compile_cache:
            from dit_jax.weights import use_compilation_cache

            use_compilation_cache(args.compile_cache)
        evaluate(args, command)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"total {time.perf_counter() - start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
