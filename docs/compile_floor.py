"""The compile time a phased sampler costs before any merging code: its floor.

Runs the bench's fair compile measurement (every strategy from scratch, round-robin, median) on
the real SDTM schedules, once as they are and once with the merging machinery replaced by its
cheapest stand-in: plans of constant indices, merge = keep the first N - R tokens (a slice),
unmerge = pad back to N. The stand-in sampler has the same phases, token counts and block shapes
as the real one, so its compile time is what the phases cost by themselves; the rest of the real
sampler's is what the plans, merges and unmerges add. An experiment, not an API: it swaps module
functions for the run.

    python docs/compile_floor.py --variant DiT-S/2 --strategies "baseline;sdtm;sdtm:max_phases=2"
"""

from __future__ import annotations

import argparse
import types

import jax.numpy as jnp

import dit_jax.bench as bench
import dit_jax.models.dit as dit
import dit_jax.nn.attention as attention
import sdtm.idm
import sdtm.ssm
from dit_jax.profiling import distinct_fusions
from dit_jax.weights import dit_module
from sdtm.ops import MergePlan


def constant_plan(metric, merge_count: int) -> MergePlan:
    batch, num_tokens, _ = metric.shape
    zeros = lambda width: jnp.zeros((batch, width), jnp.int32)  # noqa: E731
    return MergePlan(zeros(num_tokens - merge_count), zeros(merge_count), zeros(merge_count),
                     jnp.ones((batch, num_tokens - merge_count)), zeros(num_tokens))


def slice_merge(plan, x):
    return x if plan is None else x[:, : plan.num_tokens - plan.merge_count]


def pad_unmerge(plan, y):
    return y if plan is None else jnp.pad(y, ((0, 0), (0, plan.merge_count), (0, 0)))


def use_stand_in() -> None:
    """Swap the merging machinery for the stand-in (for the rest of the process)."""
    dit.merge, dit.unmerge = slice_merge, pad_unmerge
    attention.merge, attention.unmerge = slice_merge, pad_unmerge

    def ssm_build(self, metric, state, *, grid, key_attention=None):
        plan = constant_plan(metric, self.merge_count)
        return plan, plan, state

    def idm_build(self, metric, state, *, grid, key_attention=None):
        return None, constant_plan(metric, self.merge_count), state

    sdtm.ssm.SSMMerger.build, sdtm.idm.IDMMerger.build = ssm_build, idm_build


def measure(args, label: str) -> None:
    cfg = bench.model_variant(args.variant, input_size=args.image_size // 8)
    weights = bench.random_weights(cfg, jnp.float32)
    dit_module(weights)  # the module graph is built once, before any timed compile (as bench does)
    options = types.SimpleNamespace(batch=args.batch, sampler=None, steps=args.steps, cfg=None,
                                    compile_rounds=args.compile_rounds)
    cases = bench.build_sample_cases(weights, args.strategies.split(";"), options)
    for case in cases:
        fusions = sum(distinct_fusions(case.compiled.as_text()).values())
        print(f"{label:10s} {case.name:24s} compile {case.compile_s:5.2f} s  "
              f"{case.compile_s / cases[0].compile_s:4.2f}x  fusions {fusions}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="DiT-S/2")
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--compile-rounds", type=int, default=3)
    ap.add_argument("--strategies", default="baseline;sdtm;sdtm:max_phases=3;sdtm:max_phases=2",
                    help="';'-separated bench strategies, the first is the ratio's reference")
    args = ap.parse_args()
    measure(args, "real")
    use_stand_in()
    measure(args, "stand-in")


if __name__ == "__main__":
    main()
