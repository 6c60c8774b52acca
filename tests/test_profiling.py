"""dit_jax.profiling: op time per named region, from a real profiler trace on CPU."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from dit_jax import bench, profiling
from dit_jax.profiling import (
    OTHER,
    REGIONS,
    _leaves,
    _op_events,
    distinct_fusions,
    entry_ops,
    instruction_regions,
    loop_kernels,
    loop_ops,
    profile_regions,
    region_of,
)


def test_region_is_the_innermost_named_one():
    assert region_of("jit(_run)/while/body/mlp/merge/add") == "merge"
    assert region_of("jit(f)/while/body/attention/key_attention/dot_general") == "key_attention"
    assert region_of("jit(f)/attention/dot_general") == "attention"
    assert region_of("jit(f)/while/body/closed_call/add") == OTHER
    assert region_of("jit(f)/mlpx/add") == OTHER  # whole names only


def test_nested_events_count_once():
    outer = {"pid": 1, "tid": 1, "ts": 0.0, "dur": 10.0}
    inner = [{"pid": 1, "tid": 1, "ts": 1.0, "dur": 3.0}, {"pid": 1, "tid": 1, "ts": 5.0, "dur": 2.0}]
    other_thread = {"pid": 1, "tid": 2, "ts": 2.0, "dur": 4.0}
    assert _leaves([outer, *inner, other_thread]) == [*inner, other_thread]


def _twice(a, b, scale_b):
    """Two elementwise chains XLA fuses separately; the second in the mlp region."""
    first = jnp.sin(a) * 3.0 + jnp.cos(a) / 2.0
    with jax.named_scope("mlp"):
        second = jnp.sin(b) * scale_b + jnp.cos(b) / 2.0
    return first, second


def test_identical_fusions_count_once():
    a, b = jnp.ones(1000), jnp.full(1000, 2.0)

    def fusions(scale_b):
        return distinct_fusions(jax.jit(_twice, static_argnums=2).lower(a, b, scale_b).compile().as_text())

    assert sum(fusions(3.0).values()) == 1  # the same chain on two inputs: one kernel
    assert fusions(4.0) == {OTHER: 1, "mlp": 1}  # a different constant: two, each in its region


def _scoped(x, w):
    with jax.named_scope("mlp"):
        for _ in range(4):
            x = jnp.tanh(x @ w)
    with jax.named_scope("merge"):
        x = jnp.sort(x[:8, :64], axis=1)  # a small op XLA cannot fuse into the matmuls
    return x


def test_profile_attributes_time_to_regions():
    x = jnp.ones((256, 512))
    w = jnp.full((512, 512), 1e-3)
    compiled = jax.jit(_scoped).lower(x, w).compile()
    names = instruction_regions(compiled.as_text())
    assert "mlp" in names.values() and "merge" in names.values()
    profile = profile_regions(compiled, lambda: compiled(x, w), calls=2)
    assert set(profile) == {*REGIONS, OTHER}
    assert profile["mlp"] > 0
    assert profile["merge"] > 0
    assert profile["mlp"] > 3 * profile["merge"]  # four 256x512x512 matmuls against sorting 8 rows of 64


def test_bench_profile_splits_a_merged_forward(tmp_path, capsys):
    out = tmp_path / "r.json"
    code = bench.main(["forward", "--variant", "DiT-S/2", "--image-size", "128", "--depth", "2", "--batch", "2",
                       "--repeats", "1", "--strategies", "baseline,ssm:0.5,idm:0.5", "--profile", "--json", str(out)])
    assert code == 0
    import json

    rows = {r["strategy"]: r["profile_s"] for r in json.loads(out.read_text())["results"]}
    assert rows["baseline"]["merge_plan"] == 0 and rows["baseline"]["attention"] > 0 and rows["baseline"]["mlp"] > 0
    assert rows["ssm:0.5"]["merge_plan"] > 0 and rows["ssm:0.5"]["merge"] > 0
    assert rows["idm:0.5"]["key_attention"] > 0
    assert "# profile" in capsys.readouterr().out


def _event(pid, op, dur, ts=0.0):
    return {"ph": "X", "pid": pid, "tid": 1, "ts": ts, "dur": dur, "name": op, "args": {"hlo_op": op, "hlo_module": "m"}}


def test_device_events_win_and_their_absence_on_an_accelerator_is_an_error():
    names = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
             {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}}]
    host, kernel = _event(1, "fusion.1", 5.0), _event(2, "fusion.1", 2.0)
    assert _op_events({"traceEvents": [*names, host, kernel]}, "m", on_accelerator=True) == [("fusion.1", 2.0)]
    assert _op_events({"traceEvents": [*names, host]}, "m") == [("fusion.1", 5.0)]  # CPU: the thunks
    with pytest.raises(RuntimeError, match="no device op events"):
        _op_events({"traceEvents": [*names, host]}, "m", on_accelerator=True)


def test_bench_keeps_its_timings_when_profiling_fails(tmp_path, capsys, monkeypatch):
    def broken(compiled, run):
        raise RuntimeError("no CUPTI")

    monkeypatch.setattr(bench, "profile_regions", broken)
    out = tmp_path / "r.json"
    assert bench.main(["forward", "--variant", "DiT-S/2", "--image-size", "64", "--depth", "1", "--batch", "1",
                       "--repeats", "1", "--strategies", "baseline", "--profile", "--json", str(out)]) == 0
    import json

    (row,) = json.loads(out.read_text())["results"]
    assert row["profile_s"] is None and row["median_s"] > 0
    assert "profile of baseline failed: no CUPTI" in capsys.readouterr().err


def test_missing_trace_is_an_error(monkeypatch):
    monkeypatch.setattr("glob.glob", lambda *a, **k: [])
    compiled = jax.jit(lambda x: x + 1).lower(1.0).compile()
    with pytest.raises(RuntimeError, match="no perfetto trace"):
        profile_regions(compiled, lambda: compiled(1.0), calls=1)


def test_loop_ops_counts_each_loop_body():
    def two_loops(x):
        def step(carry, _):
            return jnp.sort(jnp.sin(carry) * 2.0), None  # a fusion and a sort per iteration

        x, _ = jax.lax.scan(step, x, None, length=3)
        return jax.lax.fori_loop(0, 4, lambda i, c: jnp.cos(c) + i, x)

    text = jax.jit(two_loops).lower(jnp.ones(8)).compile().as_text()
    counts = loop_ops(text)
    assert len(counts) == 2 and all(c >= 1 for c in counts)
    assert max(counts) >= 2  # the scan body runs at least the fusion and the sort
    assert loop_ops(jax.jit(jnp.sin).lower(jnp.ones(8)).compile().as_text()) == []


def test_loop_kernels_multiply_nested_loops_and_name_kinds():
    def nested(x):
        def inner(c, _):
            with jax.named_scope("merge_plan"):
                return jnp.sort(jnp.sin(c) * 2.0), None

        def outer(c, _):
            c, _ = jax.lax.scan(inner, c, None, length=3)
            order = jnp.argsort(c)  # a sort, then a scatter, once per outer iteration
            return c + jnp.zeros(8).at[order].set(jnp.arange(8.0)), None

        return jax.lax.scan(outer, x, None, length=4)[0]

    counts = loop_kernels(jax.jit(nested).lower(jnp.ones(8)).compile().as_text())
    assert counts[("sort", "merge_plan")] == 12  # 3 inner iterations in each of 4 outer ones
    assert counts[("sort", OTHER)] == 4 and counts[("scatter", OTHER)] == 4
    assert loop_kernels(jax.jit(jnp.sin).lower(jnp.ones(8)).compile().as_text()) == {}  # no loop, nothing counted


def test_kernel_kind_names_library_gemms_and_cudnn():
    gemm = '%cublas-lt-matmul.1 = (bf16[8192,4608]{1,0}, s8[4194304]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul"'
    attention = '%fmha = (bf16[8,16,1024,72]{3,1,2,0}, u8[0]{0}) custom-call(%q, %k, %v), custom_call_target="__cudnn$fmhaSoftmax"'
    assert profiling._kernel_kind(gemm, "custom-call", set()) == "gemm"
    assert profiling._kernel_kind(attention, "custom-call", set()) == "cudnn"


def test_loop_kernels_of_a_dit_count_a_shared_plan_once_per_group():
    cfg = bench.model_variant("DiT-S/2", input_size=8, depth=4)
    weights = bench.random_weights(cfg, jnp.float32)
    x = jnp.ones((2, 8, 8, 4))
    t, y = jnp.full((2,), 500), jnp.zeros((2,), jnp.int32)

    def plan_kernels(text: str) -> float:
        merger = bench.forward_phase(bench.parse_strategy(text), cfg).merger
        fn = jax.jit(functools.partial(bench._forward, scan_blocks=True, merger=merger))
        counts = loop_kernels(fn.lower(weights, x, t, y).compile().as_text())
        assert sum(v for (kind, _), v in counts.items() if kind == "gemm") >= 4 * cfg.depth  # qkv, proj, two MLP matmuls
        return sum(v for (_, region), v in counts.items() if region == "merge_plan")

    every_block, shared = plan_kernels("ssm:0.5"), plan_kernels("ssm:0.5*2")
    assert every_block > 0 and every_block % cfg.depth == 0  # the same plan kernels in each of the 4 blocks
    assert shared < every_block  # two plans built where four were


def test_entry_ops_counts_sorts_and_scatters():
    def plan_like(x):
        order = jnp.argsort(jnp.sin(x))  # a fusion and a sort
        return jnp.zeros(8, jnp.int32).at[order].set(jnp.arange(8, dtype=jnp.int32)) + 1  # a scatter

    counts = entry_ops(jax.jit(plan_like).lower(jnp.ones(8)).compile().as_text())
    assert counts["sort"] == 1 and counts["scatter"] == 1
    assert counts["ops"] >= 3
    top_k = entry_ops(jax.jit(lambda x: jax.lax.top_k(x, 3)[1]).lower(jnp.ones((2, 8))).compile().as_text())
    assert top_k["sort"] == 1  # a top-k sorts too (XLA's CPU backend calls a library routine)
    assert entry_ops(jax.jit(jnp.sin).lower(jnp.ones(8)).compile().as_text()) == {"ops": 1, "sort": 0, "scatter": 0}
