"""Settings of the two merging methods, validated when made (before anything compiles).

    SDTMConfig()                                  # the defaults: ratio 0.5 +- 0.2, switch at 40%
    SDTMConfig(ratio=0.3, idm_score="frequency")  # closer to the official release's sample.py
    ToMeConfig(ratio=0.5)                         # ToMe for SD, attention only
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from sdtm.frequency import FREQUENCY_MODES
from sdtm.idm import IDM_SCORES
from sdtm.ops import as_pair, check_merge_sum


def _check_window(window) -> tuple[int, int]:
    try:
        pair = as_pair(window)
    except ValueError as e:
        raise ValueError(f"window: {e}") from None
    if pair[0] < 1 or pair[1] < 1 or pair[0] * pair[1] < 2:
        raise ValueError(f"window {window!r} must be (height, width) with at least 2 tokens, e.g. (2, 2)")
    return pair


def _check_plan_every(value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"plan_every must be an int >= 1 (1: a plan per block), got {value!r}")


def _python_scalars(config) -> None:
    """NumPy scalars in a config's fields -> the Python int, float or bool they hold (a config is
    static under jit and checked as Python numbers; an int switch_step is a step, a float a fraction)."""
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, (np.integer, np.floating, np.bool_)):
            object.__setattr__(config, field.name, value.item())


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _check_number(name: str, value, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} {value} is outside [{low}, {high}]")


@dataclasses.dataclass(frozen=True)
class SDTMConfig:
    """Structure-then-Detail Token Merging.

    ratio, deviation: compression-ratio adjusting; step i of T merges
        floor(N * ((ratio - deviation) + 2 * deviation * cos(pi/2 * i / (T-1)))) tokens,
        from ratio + deviation at the first step down to ratio - deviation at the last.
    switch_step: steps before it run SSM (structure stage), the rest IDM (detail stage). A float
        is a fraction of the steps (rounded to the nearest step), an int a step index.
    max_phases: at most this many distinct (strategy, merge_count) runs of steps; each compiles once.
    window: (height, width) of the merge windows.
    a_s, a_d: weights of the frequency priority in SSM and IDM.
    frequency: counter reading, "independent" (paper: time since last merged), "merged"
        (official release: time spent merged), or None (no priority).
    idm_score: IDM destinations/ranking from "attention" (paper) or "frequency" (release).
    plan_every: build a plan in every plan_every-th block and let the blocks in between reuse
        it (1: every block builds its own, as the paper and the release do). Building a plan is
        a few dozen small kernels; on a GPU they cost more than merging saves unless shared.
    protect_every, cache_weight: the official release's extras, off by default. Steps i with
        i % protect_every == 0 run at full resolution and keep every block's gated attention and
        MLP outputs (PixArt: and its cross-attention's); on the other steps a merged token's
        output becomes cache_weight * its own + (1 - cache_weight) * that cache (the release's
        sample.py: 3 and 0.1). The cache holds depth * branches * batch * N * hidden numbers
        (2 branches, 2.1 GB in bf16 for DiT-XL/2 at 512 px, batch 16; PixArt 3). With
        cache_weight 0 merged tokens take the cache whole, so SSM blocks compute the tokens left
        alone only (the merged windows' outputs would be discarded; they stay attention keys).
    proportional_attention: ToMe's proportional attention, off by default: in the structure
        stage a merged attention key's logit gains log(its group size), so a window merged into
        one key draws the attention its tokens drew together (exactly so when they were equal).
    prompt_weight: (structure stage, detail stage) weights of the prompt in text-conditioned
        models: each block's cross-attention branch is multiplied by the stage's weight (the
        paper's prompt reweighting, whose formula is not published; see dit_jax.models.pixart).
        (1.0, 1.0), the default, leaves the model unchanged; class-conditioned models accept
        only that.
    merge_sum: how IDM merges sum their sources: "scatter" (a scatter-add, the default) or
        "matmul" (a 0/1 matrix product, no scatter; see sdtm.ops.merge_matmul). The same
        result up to round-off; which is faster depends on the device (SSM never scatters).
    """

    ratio: float = 0.5
    deviation: float = 0.2
    switch_step: float | int = 0.4
    max_phases: int = 4
    window: tuple[int, int] = (2, 2)
    a_s: float = 0.05
    a_d: float = 0.05
    frequency: str | None = "independent"
    idm_score: str = "attention"
    plan_every: int = 1
    protect_every: int | None = None
    cache_weight: float = 1.0
    proportional_attention: bool = False
    prompt_weight: tuple[float, float] = (1.0, 1.0)
    merge_sum: str = "scatter"

    def __post_init__(self):
        _python_scalars(self)
        _check_number("ratio", self.ratio, 0.0, 1.0)
        _check_number("deviation", self.deviation, 0.0, 1.0)
        if self.ratio - self.deviation < 0:
            raise ValueError(
                f"ratio - deviation = {self.ratio} - {self.deviation} < 0: the last steps would merge a "
                "negative number of tokens; lower deviation or raise ratio"
            )
        if self.ratio + self.deviation >= 1:
            raise ValueError(
                f"ratio + deviation = {self.ratio} + {self.deviation} >= 1: the first step would merge every "
                "token; keep ratio + deviation below 1 (below 1 - 1/window tokens for SSM to fit)"
            )
        object.__setattr__(self, "window", _check_window(self.window))
        if isinstance(self.switch_step, bool) or not isinstance(self.switch_step, (int, float)):
            raise ValueError(f"switch_step must be a fraction (float) or a step index (int), got {self.switch_step!r}")
        if isinstance(self.switch_step, float):
            _check_number("switch_step (a fraction of the steps)", self.switch_step, 0.0, 1.0)
        elif self.switch_step < 0:
            raise ValueError(f"switch_step {self.switch_step} is negative; give a step index >= 0")
        if isinstance(self.max_phases, bool) or not isinstance(self.max_phases, int) or self.max_phases < 1:
            raise ValueError(f"max_phases must be an int >= 1, got {self.max_phases!r}")
        _check_number("a_s", self.a_s, -math.inf, math.inf)
        _check_number("a_d", self.a_d, -math.inf, math.inf)
        if self.frequency is not None and self.frequency not in FREQUENCY_MODES:
            raise ValueError(f"frequency must be one of {FREQUENCY_MODES} or None, got {self.frequency!r}")
        _check_plan_every(self.plan_every)
        _check_flag("proportional_attention", self.proportional_attention)
        if self.protect_every is not None and (
            isinstance(self.protect_every, bool) or not isinstance(self.protect_every, int) or self.protect_every < 1
        ):
            raise ValueError(f"protect_every must be None or an int >= 1, got {self.protect_every!r}")
        _check_number("cache_weight", self.cache_weight, 0.0, 1.0)
        if self.cache_weight < 1.0 and self.protect_every is None:
            raise ValueError(
                f"cache_weight {self.cache_weight} blends with the outputs of protected (full-resolution) steps: "
                "set protect_every too (the official release uses protect_every=3, cache_weight=0.1)"
            )
        if self.idm_score not in IDM_SCORES:
            raise ValueError(f"idm_score must be one of {IDM_SCORES}, got {self.idm_score!r}")
        weights = self.prompt_weight
        if isinstance(weights, (int, float)) and not isinstance(weights, bool):
            weights = (weights, weights)
        if not isinstance(weights, (tuple, list)) or len(weights) != 2:
            raise ValueError(
                f"prompt_weight must be (structure stage, detail stage), e.g. (1.0, 1.2), got {self.prompt_weight!r}"
            )
        for stage, w in zip(("structure", "detail"), weights):
            _check_number(f"prompt_weight ({stage} stage)", w, 0.0, 10.0)
        object.__setattr__(self, "prompt_weight", tuple(float(w) for w in weights))
        check_merge_sum(self.merge_sum)

    def stage_prompt_weight(self, step: int, steps: int) -> float:
        """The prompt weight at `step` of `steps`: the structure stage's before the switch step."""
        return self.prompt_weight[0] if step < self.switch_index(steps) else self.prompt_weight[1]

    def switch_index(self, steps: int) -> int:
        """The first detail-stage step for a run of `steps` steps."""
        if isinstance(self.switch_step, float):
            return int(round(self.switch_step * steps))
        if self.switch_step > steps:
            raise ValueError(
                f"switch_step {self.switch_step} is past the last of {steps} steps; give a step in [0, {steps}] "
                "or a fraction"
            )
        return self.switch_step

    def replace(self, **changes) -> SDTMConfig:
        """A copy with these fields changed, checked as a new config is."""
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class ToMeConfig:
    """ToMe for Stable Diffusion (the baseline): a fixed fraction of the tokens merged at every step.

    ratio: fraction of the tokens removed (merge_count = floor(N * ratio)); at most 1 - 1/K
        for K-token windows, since each window keeps its destination.
    merge_attn, merge_mlp: which inputs get the plan (both: the same plan).
    window: (height, width) holding one destination each.
    random: random destination per window (shared by the batch), else the top-left token.
    plan_every: as in SDTMConfig: a plan built every plan_every blocks, reused in between.
    proportional_attention: add log(group size) to merged keys' attention logits (ToMe's
        proportional attention; ToMe for SD leaves it off, so does this default).
    merge_sum: "scatter" (default) or "matmul", as in SDTMConfig.
    """

    ratio: float = 0.5
    merge_attn: bool = True
    merge_mlp: bool = False
    window: tuple[int, int] = (2, 2)
    random: bool = True
    plan_every: int = 1
    proportional_attention: bool = False
    merge_sum: str = "scatter"

    def __post_init__(self):
        _python_scalars(self)
        _check_number("ratio", self.ratio, 0.0, 1.0)
        _check_plan_every(self.plan_every)
        check_merge_sum(self.merge_sum)
        for flag in ("merge_attn", "merge_mlp", "random", "proportional_attention"):
            _check_flag(flag, getattr(self, flag))
        object.__setattr__(self, "window", _check_window(self.window))
        k = self.window[0] * self.window[1]
        if self.ratio > 1 - 1 / k:
            raise ValueError(
                f"ToMe ratio {self.ratio} is more than {self.window[0]}x{self.window[1]} windows allow "
                f"(each keeps one destination): use a ratio <= {1 - 1 / k:.4g}"
            )
        if not (self.merge_attn or self.merge_mlp):
            raise ValueError(
                "ToMeConfig with merge_attn=False and merge_mlp=False merges nothing; use no merging instead"
            )

    def replace(self, **changes) -> ToMeConfig:
        """A copy with these fields changed, checked as a new config is."""
        return dataclasses.replace(self, **changes)


def _parse_value(text: str):
    """"none" -> None, "true"/"false" -> bool, then int, float, "a/b" a tuple of those, else the stripped text."""
    if "/" in text:
        return tuple(_parse_value(part) for part in text.split("/"))
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_fields(cls: type, text: str, extra: frozenset[str] = frozenset()) -> dict:
    """"key=value,..." -> {field: value} for the config class `cls` (SDTMConfig or ToMeConfig),
    as the command lines take settings: "ratio=0.3,protect_every=3,frequency=none".

    Values become None, bools, ints or floats where they read as such, else strings; "a/b" is a
    pair (prompt_weight=1.0/1.5, window=2/2); an int window w means (w, w). Keys may also be the names in `extra`, the caller's own options,
    whose values stay the text given. Raises ValueError naming the item that is not key=value
    with a known key; the values themselves are checked when the config is made.
    """
    names = {field.name for field in dataclasses.fields(cls)} | set(extra)
    fields = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in names:
            raise ValueError(f"{item!r} is not key=value with key one of {sorted(names)}")
        fields[key] = value.strip() if key in extra else _parse_value(value)
    if isinstance(fields.get("window"), int):
        fields["window"] = (fields["window"], fields["window"])
    return fields
