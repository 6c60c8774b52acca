"""The compression-ratio schedule: CRA values, phase bucketing, and configuration errors."""

from __future__ import annotations

import dataclasses
import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sdtm
from sdtm import IDMMerger, NoMerger, SDTMConfig, SSMMerger, ToMeConfig, ToMeMerger
from sdtm.config import parse_fields

SETTINGS = settings(max_examples=20, deadline=None)


def test_cra_matches_the_release_table():
    # The official release's defaults (ratio 0.3, deviation 0.2, 50 steps), read from its code.
    table = {0: 0.500, 10: 0.480, 20: 0.421, 25: 0.378, 37: 0.250, 49: 0.100}
    for step, want in table.items():
        assert sdtm.compression_ratio(step, 50, 0.3, 0.2) == pytest.approx(want, abs=5e-4)
    assert sdtm.compression_ratio(0, 1, 0.5, 0.2) == pytest.approx(0.7)  # one step: the start


def test_step_counts_floor_and_ssm_rounding():
    counts = sdtm.step_merge_counts(SDTMConfig(ratio=0.3, deviation=0.2, switch_step=20), 50, 4096)
    assert counts[0] == ("ssm", 2046)  # floor(4096 * 0.5) = 2048, down to a multiple of 3
    assert counts[19][0] == "ssm" and counts[20][0] == "idm"
    assert counts[25] == ("idm", math.floor(4096 * sdtm.compression_ratio(25, 50, 0.3, 0.2)))
    assert counts[49] == ("idm", 409)  # floor(409.6)


def brute_force_loss(counts: list[tuple[str, int]], max_phases: int) -> int:
    """Least tokens given up by any split into <= max_phases runs that never mix strategies."""
    steps = len(counts)
    best = math.inf
    for cuts in range(max_phases):
        for inner in itertools.combinations(range(1, steps), cuts):
            bounds = [0, *inner, steps]
            runs = [counts[a:b] for a, b in zip(bounds, bounds[1:])]
            if any(len({name for name, _ in run}) > 1 for run in runs):
                continue
            best = min(best, sum(c - min(x for _, x in run) for run in runs for _, c in run))
    return best


def _config(ratio_fraction, dev_fraction, switch, max_phases, window) -> SDTMConfig:
    # Keep ratio + deviation below 1 - 1/K, the most that K-token windows can merge.
    limit = 1 - 1 / (window[0] * window[1]) - 0.01
    ratio = round(ratio_fraction * limit, 3)
    deviation = round(dev_fraction * min(ratio, limit - ratio), 3)
    return SDTMConfig(ratio=ratio, deviation=deviation, switch_step=switch, max_phases=max_phases, window=window)


CONFIGS = st.builds(
    _config,
    st.sampled_from([0.1, 0.4, 0.6, 0.8]),
    st.floats(0.0, 1.0),
    st.one_of(st.floats(0.0, 1.0), st.integers(0, 6)),
    st.integers(2, 5),
    st.sampled_from([(2, 2), (1, 2)]),
)


@SETTINGS
@given(CONFIGS, st.integers(1, 9), st.sampled_from([(8, 8), (4, 6), (6, 12)]))
def test_phases_cover_the_steps_within_max_phases_losing_least(config, steps, grid):
    num_tokens = grid[0] * grid[1]
    if isinstance(config.switch_step, int) and config.switch_step > steps:
        config = dataclasses.replace(config, switch_step=steps)
    phases = sdtm.schedule(config, steps, num_tokens, grid=grid)
    per_step = sdtm.step_merge_counts(config, steps, num_tokens, grid=grid)
    assert 1 <= len(phases) <= config.max_phases
    assert phases[0].start == 0 and phases[-1].stop == steps
    assert all(a.stop == b.start and a.start < a.stop for a, b in zip(phases, phases[1:]))
    # Neighbours differ (equal ones are one phase); two "none" phases can be apart, e.g. an SSM
    # step and a last IDM step that both round down to 0 around a merging step.
    assert all((a.strategy, a.merge_count) != (b.strategy, b.merge_count) for a, b in zip(phases, phases[1:]))
    k = config.window[0] * config.window[1]
    lost = 0
    for phase in phases:
        in_phase = per_step[phase.start : phase.stop]
        names = {name for name, _ in in_phase}
        # A phase is rounded down to its smallest step count and never spans the switch.
        assert phase.merge_count == min(c for _, c in in_phase)
        if phase.merge_count == 0:
            assert phase.strategy == "none"
        else:
            assert names == {phase.strategy}
        lost += sum(c for _, c in in_phase) - phase.merge_count * phase.num_steps
        if phase.strategy == "ssm":
            assert phase.merge_count % (k - 1) == 0
            assert phase.merger == SSMMerger(phase.merge_count, config.window, config.a_s, config.frequency)
        elif phase.strategy == "idm":
            assert phase.merger == IDMMerger(
                phase.merge_count, config.window, config.a_d, config.frequency, config.idm_score
            )
        else:
            assert isinstance(phase.merger, NoMerger)
        hash(phase.merger)  # static under jit
    assert lost == brute_force_loss(per_step, config.max_phases)


def test_default_schedule_at_50_steps():
    phases = sdtm.schedule(SDTMConfig(), 50, 256)
    assert [p.strategy for p in phases][0] == "ssm" and phases[0].start == 0
    switch = next(p.start for p in phases if p.strategy == "idm")
    assert switch == 20  # 40% of 50
    assert len(phases) == 4 and phases[-1].stop == 50
    assert all(not p.merger.needs_key_attention for p in phases if p.strategy == "ssm")
    assert all(p.merger.needs_key_attention for p in phases if p.strategy == "idm")
    counts = [p.merge_count for p in phases if p.strategy == "idm"]
    assert counts == sorted(counts, reverse=True) and len(counts) > 1  # the ratio falls along the steps


def test_two_phases_round_each_stage_down():
    # max_phases=2 (the compile-time option): each stage at the least count the paper's schedule
    # gives its steps, so no step merges more than compression ratio adjusting says.
    def count(i):  # CRA at step i of 50, 256 tokens
        return math.floor(256 * (0.3 + 0.4 * math.cos(math.pi / 2 * i / 49)))

    ssm, idm = sdtm.schedule(SDTMConfig(max_phases=2), 50, 256)
    assert (ssm.strategy, ssm.start, ssm.stop) == ("ssm", 0, 20)
    assert (idm.strategy, idm.start, idm.stop) == ("idm", 20, 50)
    assert ssm.merge_count == min(count(i) // 3 * 3 for i in range(20))  # whole 2x2 windows
    assert idm.merge_count == count(49) == 76


def test_zero_counts_apart_stay_apart():
    # The example hypothesis found: SSM's one step and IDM's last step both round down to 0.
    config = SDTMConfig(ratio=0.074, deviation=0.037, switch_step=0.25, max_phases=3)
    phases = sdtm.schedule(config, 3, 24, grid=(4, 6))
    assert [(p.start, p.stop, p.strategy, p.merge_count) for p in phases] == [
        (0, 1, "none", 0), (1, 2, "idm", 2), (2, 3, "none", 0)]


def test_few_distinct_counts_lose_nothing():
    config = SDTMConfig(ratio=0.5, deviation=0.0, switch_step=3, max_phases=2)
    phases = sdtm.schedule(config, 10, 64)
    assert [(p.start, p.stop, p.strategy, p.merge_count) for p in phases] == [(0, 3, "ssm", 30), (3, 10, "idm", 32)]


def test_zero_counts_make_a_none_phase():
    phases = sdtm.schedule(SDTMConfig(ratio=0.0, deviation=0.0), 10, 64)
    assert [(p.start, p.stop, p.strategy, p.merge_count) for p in phases] == [(0, 10, "none", 0)]
    assert phases[0].merger == NoMerger()
    last = sdtm.schedule(SDTMConfig(ratio=0.2, deviation=0.2, switch_step=0, max_phases=2), 10, 64)
    assert last[-1].strategy == "none" and last[-1].stop == 10  # the final step merges nothing


def test_tome_is_one_phase():
    (phase,) = sdtm.schedule(ToMeConfig(ratio=0.4, merge_mlp=True, random=False), 25, 256)
    assert (phase.start, phase.stop, phase.strategy, phase.merge_count) == (0, 25, "tome", 102)
    assert phase.merger == ToMeMerger(102, (2, 2), random=False, merge_attn=True, merge_mlp=True)
    (none,) = sdtm.schedule(ToMeConfig(ratio=0.0), 5, 256)
    assert none.strategy == "none"


def test_non_square_grid_and_switch_step_forms():
    phases = sdtm.schedule(SDTMConfig(switch_step=7), 20, 48, grid=(6, 8))
    assert next(p.start for p in phases if p.strategy == "idm") == 7
    phases = sdtm.schedule(SDTMConfig(switch_step=1.0), 20, 48, grid=(6, 8))
    assert {p.strategy for p in phases} == {"ssm"}


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SDTMConfig(ratio=0.6, deviation=0.4), "ratio \\+ deviation .* >= 1"),
        (lambda: SDTMConfig(ratio=0.1, deviation=0.2), "ratio - deviation .* < 0"),
        (lambda: SDTMConfig(switch_step=1.5), "switch_step .* outside"),
        (lambda: SDTMConfig(switch_step=-1), "negative"),
        (lambda: SDTMConfig(window=(1, 1)), "at least 2 tokens"),
        (lambda: SDTMConfig(frequency="often"), "frequency must be one of"),
        (lambda: SDTMConfig(idm_score="maps"), "idm_score must be one of"),
        (lambda: SDTMConfig(max_phases=0), "max_phases must be an int >= 1"),
        (lambda: SDTMConfig(merge_sum="segments"), "merge_sum must be one of \\('scatter', 'matmul'\\)"),
        (lambda: ToMeConfig(merge_sum=None), "merge_sum must be one of"),
        (lambda: ToMeConfig(ratio=0.8), "more than 2x2 windows allow"),
        (lambda: ToMeConfig(merge_attn=False), "merges nothing"),
        (lambda: ToMeConfig(merge_attn="no"), "merge_attn must be True or False, got 'no'"),
        (lambda: ToMeConfig(random="false"), "random must be True or False"),
        (lambda: SDTMConfig(ratio=float("nan")), "ratio must be a finite number"),
    ],
)
def test_config_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_numpy_scalars_are_python_numbers_in_a_config():
    """An int switch_step is a step and a float one a fraction, NumPy's included."""
    config = SDTMConfig(ratio=np.float32(0.5), switch_step=np.int64(7), protect_every=np.int64(3))
    assert (config.ratio, config.switch_step, config.protect_every) == (0.5, 7, 3)
    assert type(config.ratio) is float and type(config.switch_step) is int and hash(config) == hash(config.replace())
    assert SDTMConfig(switch_step=np.float32(0.5)).switch_index(20) == 10
    assert ToMeConfig(ratio=np.float64(0.25), random=np.bool_(False)).random is False


def test_settings_parse_from_command_line_text():
    fields = parse_fields(SDTMConfig, " ratio=0.3, protect_every=3,frequency=none,window=2,proportional_attention=true")
    assert fields == {"ratio": 0.3, "protect_every": 3, "frequency": None, "window": (2, 2),
                      "proportional_attention": True}
    assert SDTMConfig(**fields).frequency is None
    assert parse_fields(ToMeConfig, "ratio=0.4,target=1.0", extra=frozenset({"target"})) == {"ratio": 0.4, "target": "1.0"}
    pair = parse_fields(SDTMConfig, "prompt_weight=1/1.5,window=2/4")
    assert pair == {"prompt_weight": (1, 1.5), "window": (2, 4)}
    assert SDTMConfig(**pair).prompt_weight == (1.0, 1.5)
    with pytest.raises(ValueError, match="'rate=0.3' is not key=value with key one of"):
        parse_fields(SDTMConfig, "rate=0.3")
    with pytest.raises(ValueError, match="'ratio' is not key=value"):
        parse_fields(ToMeConfig, "ratio")


@pytest.mark.parametrize(
    "config, steps, tokens, grid, message",
    [
        (SDTMConfig(), 50, 25, None, "window 2x2 does not tile the 5x5 token grid"),
        (SDTMConfig(window=(3, 3)), 50, 64, (8, 8), "window 3x3 does not tile the 8x8 token grid"),
        (SDTMConfig(), 50, 24, None, "not a square grid; pass grid"),
        (SDTMConfig(switch_step=60), 50, 64, None, "switch_step 60 is past the last of 50 steps"),
        (SDTMConfig(ratio=0.5, deviation=0.3), 50, 64, None, "SSM to merge 51 of 64 tokens.* at most 48"),
        (SDTMConfig(ratio=0.5, deviation=0.3, switch_step=0), 50, 64, None, "IDM to merge 51 of 64"),
        (SDTMConfig(max_phases=1), 50, 64, None, "max_phases 1 cannot hold both"),
        (SDTMConfig(), 0, 64, None, "steps must be a positive int"),
        (ToMeConfig(), 10, 36, (4, 9), "window 2x2 does not tile the 4x9 token grid"),
    ],
)
def test_schedule_errors(config, steps, tokens, grid, message):
    with pytest.raises(ValueError, match=message):
        sdtm.schedule(config, steps, tokens, grid=grid)
