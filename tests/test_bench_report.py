"""python -m dit_jax.bench_report: bench JSON -> the markdown tables of docs/benchmarks.md."""

import json
from pathlib import Path

from dit_jax import bench, bench_report

H200_RUN = Path(__file__).resolve().parents[1] / "docs" / "gpu-2026-11-26" / "run2" / "bench-fwd512.json"


def test_renders_the_recorded_h200_run_as_docs_table_it_made(capsys):
    # docs/benchmarks.md's hand-written table of this file says: baseline 4.0 s compile, 19.9 ms,
    # 42.7% of peak; ssm:0.5 16.0 ms, 1.24x; PyTorch 26.4 ms, 0.75x.
    assert bench_report.main([str(H200_RUN)]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0] == "**forward**: DiT-XL/2, 1024 tokens, batch 8, bfloat16; gpu:NVIDIA H200, 2026-11-26 05:22:33"
    assert "Versions: jax 0.11.2." in lines
    assert "| strategy | compile s | fusions | median ms | min ms | max ms | speed-up | attn tokens | mlp tokens " \
           "| TFLOP/s | % peak |" in lines
    assert "| `baseline` | 4.03 | – | 19.85 | 19.49 | 20.20 | 1.00x | 1.000 | 1.000 | 423 | 42.7% |" in lines
    assert "| `ssm:0.5` | 3.76 | – | 16.02 | 15.64 | 16.71 | 1.24x | 0.502 | 0.502 | 246 | 24.9% |" in lines
    assert "| `torch (diffusers)` | 0.25 | – | 26.41 | 25.79 | 30.81 | 0.75x | 1.000 | 1.000 | 318 | 32.1% |" in lines
    assert sum(line.startswith("| `") for line in lines) == 10  # every strategy, no profile table
    assert lines[-1] == f"(`{H200_RUN}`)"


def test_command_records_the_xla_flags_it_ran_under(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert bench.bench_command(["sample"]) == "python -m dit_jax.bench sample"
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_command_buffer=+WHILE --xla_foo=1")
    assert bench.bench_command(["sample"]) == (
        "XLA_FLAGS='--xla_gpu_enable_command_buffer=+WHILE --xla_foo=1' python -m dit_jax.bench sample")


def test_renders_a_fresh_run_with_its_command_versions_and_profile(tmp_path, capsys):
    out = tmp_path / "run.json"
    argv = ["forward", "--variant", "DiT-S/2", "--input-size", "8", "--depth", "1", "--batch", "1", "--repeats", "2",
            "--compile-rounds", "1", "--strategies", "baseline,ssm:0.5", "--profile", "--json", str(out)]
    assert bench.main(argv) == 0
    config = json.loads(out.read_text())["config"]
    assert config["command"] == "python -m dit_jax.bench " + " ".join(argv)
    assert set(config["versions"]) >= {"jaxlib", "flax", "numpy"} and "commit" in config
    capsys.readouterr()

    assert bench_report.main([str(out)]) == 0
    text = capsys.readouterr().out
    assert f"`{config['command']}`" in text
    assert f"Versions: jax {config['jax']}, jaxlib {config['versions']['jaxlib']}, flax " in text
    table = [line for line in text.splitlines() if line.startswith("| `")]
    assert [line.split(" | ")[0] for line in table] == ["| `baseline`", "| `ssm:0.5`"] * 2  # results, then profile
    assert "temp GiB |" in text and "% peak" not in text  # a CPU: memory analysis, no bf16 peak
    assert "| strategy | traced ms | attention | mlp | merge_plan | merge | unmerge | key_attention | other |" in text


def test_a_file_that_is_no_bench_result_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"config": {}}))
    assert bench_report.main([str(bad)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {bad}: not a bench result (missing field 'results')"
    assert bench_report.main([str(tmp_path / "missing.json")]) == 2
    assert "missing.json: not a bench result" in capsys.readouterr().err
    for text in ("[1, 2]", '{"config": {}, "results": [[1, 2]]}'):
        bad.write_text(text)
        assert bench_report.main([str(bad)]) == 2
        assert "expected a JSON object whose results are objects" in capsys.readouterr().err
