"""python -m dit_jax.bench on a tiny variant: it runs, its JSON has every field, bad options fail clearly.
(Speed itself is never asserted.)"""

import json
import re
from pathlib import Path

import pytest

import sdtm
from dit_jax.bench import device_peak, main, parse_strategy, split_strategies

TINY = ["--variant", "DiT-S/2", "--input-size", "8", "--depth", "1", "--batch", "2", "--repeats", "2",
        "--compile-rounds", "2"]
FIELDS = {"strategy", "compile_s", "compile_times_s", "fusions", "loop_ops", "median_s", "min_s", "max_s", "speedup", "token_share_attn", "token_share_mlp",
          "flops", "xla_flops", "temp_bytes", "achieved_flops_per_s", "share_of_peak"}


@pytest.mark.parametrize("mode,strategies", [
    ("sample", "baseline,sdtm,tome:0.5"),
    ("forward", "baseline,ssm:0.5,idm:0.5,tome:0.5"),
    ("merge", "ssm:0.5,idm:0.5,tome:0.5"),
])
def test_bench_runs_and_writes_every_field(tmp_path, capsys, mode, strategies):
    out = tmp_path / "b.json"
    extra = ["--steps", "2"] if mode == "sample" else []
    assert main([mode, *TINY, *extra, "--strategies", strategies, "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["config"]["mode"] == mode and data["config"]["tokens"] == 16
    assert [r["strategy"] for r in data["results"]] == strategies.split(",")
    for row in data["results"]:
        assert set(row) == FIELDS
        assert row["median_s"] > 0 and row["min_s"] <= row["median_s"] <= row["max_s"]
        # Two compiles from scratch each, the median reported.
        assert len(row["compile_times_s"]) == 2 and min(row["compile_times_s"]) > 0
        assert row["compile_s"] == pytest.approx(sum(row["compile_times_s"]) / 2, abs=1e-3)
    if mode != "merge":
        assert data["results"][0]["speedup"] == 1.0
        assert data["results"][1]["token_share_mlp"] < 1.0
        # Merging adds plan, merge and unmerge kernels to what XLA compiles.
        assert data["results"][1]["fusions"] > data["results"][0]["fusions"] > 0
    assert all(r["temp_bytes"] > 0 for r in data["results"])  # XLA's memory analysis on CPU
    # Ops per loop iteration, one entry per loop XLA kept (it unrolls loops of one iteration).
    assert all(isinstance(r["loop_ops"], list) for r in data["results"])
    if mode == "sample":
        assert data["results"][0]["loop_ops"][0] > 0  # the baseline's two steps stay a loop
    assert "speed-up" in capsys.readouterr().out


def test_bench_bad_options(capsys):
    assert main(["sample", *TINY, "--strategies", "sdtm,baseline"]) == 2
    assert "must start with baseline" in capsys.readouterr().err
    assert main(["forward", *TINY, "--strategies", "baseline,fast"]) == 2
    assert "unknown strategy 'fast'" in capsys.readouterr().err
    assert main(["sample", *TINY, "--torch"]) == 2
    assert "--torch compares one forward pass" in capsys.readouterr().err
    assert main(["sample", "--image-size", "100"]) == 2
    assert "not a multiple of 8" in capsys.readouterr().err
    assert main(["sample", *TINY, "--compile-rounds", "0"]) == 2
    assert "--compile-rounds must be >= 1" in capsys.readouterr().err
    assert main(["forward", *TINY, "--depth", "0"]) == 2  # 0 once meant "the variant's depth"
    assert "--depth must be >= 1, got 0" in capsys.readouterr().err
    assert main(["forward", *TINY, "--json", "/proc/no/such/x.json"]) == 2  # once found out after the run
    assert "--json /proc/no/such/x.json: cannot write it" in capsys.readouterr().err


def test_strategies_take_config_fields():
    assert split_strategies("baseline, sdtm:max_phases=2,deviation=0 ,tome:0.5,sdtm*4") == [
        "baseline", "sdtm:max_phases=2,deviation=0", "tome:0.5", "sdtm*4"]
    assert parse_strategy("sdtm:max_phases=2,deviation=0*4") == sdtm.SDTMConfig(max_phases=2, deviation=0, plan_every=4)
    assert parse_strategy("tome:ratio=0.3,merge_mlp=true") == sdtm.ToMeConfig(ratio=0.3, merge_mlp=True)
    assert parse_strategy("sdtm:0.3") == sdtm.SDTMConfig(ratio=0.3)
    assert parse_strategy("idm:ratio=0.4,merge_sum=matmul*2") == (
        "idm", sdtm.SDTMConfig(ratio=0.4, deviation=0.0, switch_step=0, merge_sum="matmul", plan_every=2))
    assert parse_strategy("ssm:ratio=0.4") == parse_strategy("ssm:0.4")


@pytest.mark.parametrize("text,message", [
    ("sdtm:max_phase=2", "'max_phase=2' is not key=value"),
    ("sdtm:plan_every=2*4", "sets plan_every twice"),
    ("tome:ratio=2", "strategy 'tome:ratio=2': ratio 2 is outside"),
    ("idm:deviation=0.1", "idm runs one stage at a fixed ratio; drop deviation"),
    ("sdtm*x", "strategy 'sdtm\\*x': what follows '\\*' is how many blocks share a plan"),
])
def test_bad_config_fields_name_the_strategy(text, message):
    with pytest.raises(ValueError, match=message):
        parse_strategy(text)


@pytest.mark.parametrize(
    "kind, peak",
    [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
     ("NVIDIA H200 NVL", 835e12), ("NVIDIA A100-SXM4-40GB", 312e12), ("cpu", None)],
)
def test_device_peak_picks_the_part(kind, peak):
    assert device_peak(kind) == peak


def test_step_tokens_count_protected_steps_and_lone_slots():
    import dataclasses

    from dit_jax import load
    from dit_jax.bench import step_tokens, token_shares
    from dit_jax.pipeline import prepare

    weights = load()
    method = sdtm.SDTMConfig(switch_step=1.0, deviation=0.0, protect_every=3, cache_weight=0.0)
    plan, _ = prepare(weights, "bag", sdtm=method, steps=6, output="latents")
    # SSM at ratio 0.5 of 256 tokens: 126 merged (42 windows of 4), 130 slots, 88 of them alone;
    # steps 0 and 3 protected (full resolution); with cache_weight 0 the MLP and the attention
    # queries skip the windows: (queries, slots, MLP tokens)
    assert step_tokens(plan, 256) == [(256, 256, 256), (88, 130, 88), (88, 130, 88)] * 2
    assert token_shares(step_tokens(plan, 256), 256) == ((2 * 256 + 4 * 88) / 1536, (2 * 256 + 4 * 88) / 1536)
    blended = dataclasses.replace(plan, cache_weight=0.1)  # a partial blend needs every slot
    assert step_tokens(blended, 256) == [(256, 256, 256), (130, 130, 130), (130, 130, 130)] * 2


def test_block_flops_count_queries_and_slots_apart():
    from dit_jax.bench import BlockTokens, block_flops
    from dit_jax.models.dit import variant

    cfg = variant("DiT-S/2")
    n, d = 256, cfg.hidden_size
    # the textbook count of a transformer block: 24 n d^2 matmul FLOPs (qkv, out, 4x MLP) + 4 n^2 d attention
    assert block_flops(cfg, BlockTokens.full(n)) == 24 * n * d * d + 4 * n * n * d
    # 88 lone queries over 130 slots: q and out projections and the logits shrink, k and v do not
    assert block_flops(cfg, BlockTokens(88, 130, 88)) == 4 * 88 * d * d + 4 * 130 * d * d + 4 * 88 * 130 * d + 16 * 88 * d * d
    # PixArt's cross-attention to L text tokens: its queries are the self-attention's
    from dit_jax.models.pixart import variant as pixart_variant

    cfg = pixart_variant("PixArt-alpha-XL/2-512")
    d, text = cfg.hidden_size, cfg.max_text_length
    cross = 4 * 88 * d * d + 4 * text * d * d + 4 * 88 * text * d
    assert block_flops(cfg, BlockTokens(88, 130, 88)) == 4 * 88 * d * d + 4 * 130 * d * d + 4 * 88 * 130 * d + cross + 16 * 88 * d * d


def gpu_script_benches() -> list[tuple[str, list[str]]]:
    """(mode, strategies) of every `bench NAME MODE ...` call in docs/gpu_run.sh, its
    ${VAR:-default} strategy lists read at their defaults."""
    text = (Path(__file__).parent.parent / "docs" / "gpu_run.sh").read_text().replace("\\\n", " ")
    calls = []
    for line in text.splitlines():
        call = re.match(r'\s*bench\s+\S+\s+(\w+)\s', line)
        if call:
            strategies = re.search(r'--strategies\s+"([^"]+)"', line).group(1)
            strategies = re.sub(r"\$\{\w+:-(.*)\}", r"\1", strategies)
            calls.append((call.group(1), split_strategies(strategies)))
    return calls


def test_gpu_script_strategies_parse():
    """A lent GPU is rare: a typo in the prepared script must fail here, not on the card."""
    calls = gpu_script_benches()
    assert {mode for mode, _ in calls} == {"sample", "forward"} and len(calls) >= 5
    for mode, strategies in calls:
        assert parse_strategy(strategies[0]) is False, "speed-ups are against a leading baseline"
        for text in strategies:
            parsed = parse_strategy(text)
            assert mode == "forward" or not isinstance(parsed, tuple), f"{text}: forward-only in a sample bench"
