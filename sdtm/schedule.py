"""The compression-ratio schedule: sampling steps -> a few phases with static merge counts.

Each phase is a run of consecutive steps sharing one (strategy, merge_count) and one
`BlockMerger`; the sampler compiles one `lax.scan` per phase. SDTM's per-step counts follow the
cosine compression-ratio adjusting (CRA) curve; to keep the number of compiled phases small,
runs of steps are rounded down to a common count, choosing the runs (by dynamic programming)
that give up the fewest merged tokens over the whole schedule.

    phases = schedule(SDTMConfig(), steps=50, num_tokens=256)   # DiT-XL/2 at 256 px: 16x16 grid
    for p in phases: print(p.start, p.stop, p.strategy, p.merge_count)
"""

from __future__ import annotations

import dataclasses
import math

from sdtm.config import SDTMConfig, ToMeConfig
from sdtm.idm import IDMMerger
from sdtm.merger import BlockMerger, NoMerger
from sdtm.ops import as_pair, check_grid
from sdtm.ssm import SSMMerger
from sdtm.tome import ToMeMerger

# floor(N * ratio) with this slack, so that round-off in ratio +- deviation (0.3 - 0.2 + 0.4 is
# 0.49999999999999994 in floats) does not cost a token.
_FLOOR_SLACK = 1e-9


@dataclasses.dataclass(frozen=True)
class Phase:
    """Steps [start, stop) run `merger`; strategy is "ssm", "idm", "tome" or "none" (merge_count 0)."""

    start: int
    stop: int
    strategy: str
    merge_count: int
    merger: BlockMerger

    @property
    def num_steps(self) -> int:
        return self.stop - self.start


def compression_ratio(step: int, steps: int, ratio: float, deviation: float) -> float:
    """CRA: (ratio - deviation) + 2 * deviation * cos(pi/2 * step / (steps - 1)); one step: the start."""
    progress = step / (steps - 1) if steps > 1 else 0.0
    return (ratio - deviation) + 2.0 * deviation * math.cos(progress * math.pi / 2)


def _resolve_grid(num_tokens: int, grid, window: tuple[int, int]) -> tuple[int, int]:
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    if grid is None:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise ValueError(f"{num_tokens} tokens are not a square grid; pass grid=(height, width)")
        grid = (side, side)
    grid = as_pair(grid)
    check_grid(num_tokens, grid, window)
    return grid


def step_merge_counts(
    config: SDTMConfig, steps: int, num_tokens: int, *, grid: tuple[int, int] | None = None
) -> list[tuple[str, int]]:
    """Per-step (strategy, merge_count) before bucketing into phases: "ssm" before the switch
    (counts rounded down to a multiple of K-1), "idm" after. Raises if a count does not fit."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    grid = _resolve_grid(num_tokens, grid, config.window)
    k = config.window[0] * config.window[1]
    num_windows = num_tokens // k
    switch = config.switch_index(steps)
    counts = []
    for step in range(steps):
        count = math.floor(num_tokens * compression_ratio(step, steps, config.ratio, config.deviation) + _FLOOR_SLACK)
        count = max(count, 0)
        if step < switch:
            count = count // (k - 1) * (k - 1)
            limit, name = num_windows * (k - 1), "ssm"
        else:
            limit, name = num_tokens - num_windows, "idm"
        if count > limit:
            raise ValueError(
                f"step {step} of {steps} asks {name.upper()} to merge {count} of {num_tokens} tokens, but "
                f"{config.window[0]}x{config.window[1]} windows on the {grid[0]}x{grid[1]} grid allow at most "
                f"{limit}; lower ratio + deviation below {1 - 1 / k:.4g}"
            )
        counts.append((name, count))
    return counts


def _fewest_lost_runs(values: list[int], weights: list[int], max_runs: int) -> list[tuple[int, list[tuple[int, int]]]]:
    """Split `values` (one stage's distinct consecutive counts, each held for weights[i] steps)
    into consecutive runs, each rounded down to its minimum, giving up the fewest tokens:
    sum of weight * (value - run minimum). Entry p-1 of the result is (tokens lost, [(first,
    last+1), ...]) for the best split into at most p runs, p = 1..max_runs."""
    n = len(values)
    # lost[i][j]: tokens given up when values[i:j] become one run (built right to left from j).
    lost = [[0] * (n + 1) for _ in range(n + 1)]
    for j in range(1, n + 1):
        low, total_w, total_wv = math.inf, 0, 0
        for i in range(j - 1, -1, -1):
            low = min(low, values[i])
            total_w += weights[i]
            total_wv += weights[i] * values[i]
            lost[i][j] = total_wv - low * total_w
    # best[p][j]: least loss covering values[:j] with exactly p runs; cut[p][j]: last run's start.
    best = [[math.inf] * (n + 1) for _ in range(max_runs + 1)]
    cut = [[0] * (n + 1) for _ in range(max_runs + 1)]
    best[0][0] = 0
    for p in range(1, max_runs + 1):
        for j in range(p, n + 1):
            for i in range(p - 1, j):
                total = best[p - 1][i] + lost[i][j]
                if total < best[p][j]:
                    best[p][j], cut[p][j] = total, i
    results = []
    for budget in range(1, max_runs + 1):
        runs = min(range(1, min(budget, n) + 1), key=lambda q: (best[q][n], q))  # fewest runs on ties
        bounds, j, p = [], n, runs
        while j > 0:
            i = cut[p][j]
            bounds.append((i, j))
            j, p = i, p - 1
        results.append((best[runs][n], bounds[::-1]))
    return results


def _stage_options(counts: list[int], offset: int, max_runs: int) -> list[tuple[int, list[tuple[int, int, int]]]]:
    """For one stage whose steps begin at `offset`: entry p-1 is (tokens lost, [(start, stop,
    merge_count), ...]) with at most p phases."""
    values, weights, starts = [], [], []  # consecutive equal counts collapsed
    for step, count in enumerate(counts):
        if values and values[-1] == count:
            weights[-1] += 1
        else:
            values.append(count)
            weights.append(1)
            starts.append(step)
    options = []
    for loss, bounds in _fewest_lost_runs(values, weights, max_runs):
        phases = [
            (offset + starts[i], offset + (starts[j] if j < len(starts) else len(counts)), min(values[i:j]))
            for i, j in bounds
        ]
        options.append((loss, phases))
    return options


def _sdtm_schedule(config: SDTMConfig, steps: int, num_tokens: int, grid) -> list[Phase]:
    per_step = step_merge_counts(config, steps, num_tokens, grid=grid)
    switch = config.switch_index(steps)
    ssm_counts = [count for name, count in per_step[:switch]]
    idm_counts = [count for name, count in per_step[switch:]]
    budget = config.max_phases
    if ssm_counts and idm_counts:
        if budget < 2:
            raise ValueError(
                f"max_phases {budget} cannot hold both the SSM and the IDM stage; use max_phases >= 2 "
                "(or a switch_step of 0 or all the steps)"
            )
        ssm_options = _stage_options(ssm_counts, 0, budget - 1)
        idm_options = _stage_options(idm_counts, switch, budget - 1)
        # Share the phase budget between the stages so that the fewest tokens are given up.
        split = min(
            range(1, budget), key=lambda a: (ssm_options[a - 1][0] + idm_options[budget - a - 1][0], a)
        )
        raw = [(*p, "ssm") for p in ssm_options[split - 1][1]]
        raw += [(*p, "idm") for p in idm_options[budget - split - 1][1]]
    elif ssm_counts:
        raw = [(*p, "ssm") for p in _stage_options(ssm_counts, 0, budget)[-1][1]]
    else:
        raw = [(*p, "idm") for p in _stage_options(idm_counts, 0, budget)[-1][1]]
    phases: list[Phase] = []
    for start, stop, count, name in raw:
        if count == 0:
            name = "none"
        if phases and phases[-1].strategy == name and phases[-1].merge_count == count:
            phases[-1] = dataclasses.replace(phases[-1], stop=stop)  # coalesce equal neighbours
            continue
        phases.append(Phase(start, stop, name, count, _merger(config, name, count)))
    return phases


def _merger(config: SDTMConfig, name: str, count: int) -> BlockMerger:
    if name == "none":
        return NoMerger()
    if name == "ssm":
        return SSMMerger(
            count, window=config.window, a_s=config.a_s, frequency=config.frequency, plan_every=config.plan_every,
            proportional_attention=config.proportional_attention,
        )
    return IDMMerger(
        count, window=config.window, a_d=config.a_d, frequency=config.frequency, score=config.idm_score,
        plan_every=config.plan_every, merge_sum=config.merge_sum,
    )


def schedule(
    config: SDTMConfig | ToMeConfig, steps: int, num_tokens: int, *, grid: tuple[int, int] | None = None
) -> list[Phase]:
    """The phases covering steps 0..steps-1 in order, for a `num_tokens`-token grid.

    grid: (height, width); None means square. SDTM: at most config.max_phases phases (SSM
    phases first, then IDM); ToMe: one phase. Phases with merge_count 0 are "none" (NoMerger).
    Every impossible setting raises a ValueError here, before anything compiles.
    """
    if isinstance(config, ToMeConfig):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        _resolve_grid(num_tokens, grid, config.window)
        count = math.floor(num_tokens * config.ratio + _FLOOR_SLACK)
        if count == 0:
            return [Phase(0, steps, "none", 0, NoMerger())]
        merger = ToMeMerger(
            count, window=config.window, random=config.random,
            merge_attn=config.merge_attn, merge_mlp=config.merge_mlp, plan_every=config.plan_every,
            proportional_attention=config.proportional_attention, merge_sum=config.merge_sum,
        )
        return [Phase(0, steps, "tome", count, merger)]
    if isinstance(config, SDTMConfig):
        return _sdtm_schedule(config, steps, num_tokens, grid)
    raise ValueError(f"schedule takes an SDTMConfig or a ToMeConfig, got {type(config).__name__}")
