"""python -m sdtm.bench_merge runs on a tiny grid and prints a row per strategy with every variant
(the GPU script runs it on the card; speed itself is never asserted). tests/test_ops.py checks
that the variants compute `sdtm.merge`."""

from sdtm import bench_merge


def test_bench_merge_prints_every_variant_per_strategy(capsys):
    bench_merge.main(["--tokens", "16", "--batch", "2", "--channels", "8", "--reps", "2", "--one-hot-max", "16"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("N=")]
    assert [(row[1], row[2]) for row in rows] == [("16", "ssm"), ("16", "idm"), ("16", "tome")]
    for row in rows:
        timed = dict(zip(row[12::2], row[13::2]))  # after "plan ops K (sorts S, scatters T)"
        variants = {"build", "offsets", "scatter", "all_slots", "matmul", "row_indexed", "sum_scatter",
                    "segment_sum", "sorted_sum", "one_hot", "unmerge"} | ({"grid_means"} if row[2] == "ssm" else set())
        assert set(timed) == variants
        assert all(float(ms) > 0 for ms in timed.values())
