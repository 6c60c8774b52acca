"""dit_jax.profiling: op time per named region, from a real profiler trace on CPU."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from dit_jax import bench
from dit_jax.profiling import (
    OTHER,
    REGIONS,
    _leaves,
    _op_events,
    distinct_fusions,
    entry_ops,
    instruction_regions,
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
