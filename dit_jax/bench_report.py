"""The bench's JSON results (`python -m dit_jax.bench ... --json FILE`) as the markdown tables of
docs/benchmarks.md: per file a heading with the run's setting (mode, model, tokens, batch, dtype,
device, date), the command and the versions where the file records them, one row per strategy,
and with `--profile` the op time per region.

    python -m dit_jax.bench_report docs/gpu-2026-11-26/run2/bench-*.json > tables.md

Numbers are copied, never recomputed: a table says what the run measured.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dit_jax.profiling import OTHER, REGIONS

GiB = 2**30


def _cell(value, fmt: str) -> str:
    return "–" if value is None else format(value, fmt)


def heading(config: dict) -> str:
    """One line naming the run: mode, model, tokens, batch, dtype, steps, device and date."""
    parts = [f"{config['variant']}, {config['tokens']} tokens, batch {config['batch']}, {config['dtype']}"]
    if config.get("mode") == "sample":
        parts.append(f"{config.get('steps')} {config.get('sampler')} steps, guidance {config.get('cfg')}")
    parts.append(f"{config['device']}, {config['date']}")
    return f"**{config['mode']}**: " + "; ".join(parts)


def versions(config: dict) -> str | None:
    """The software line: jax (and whatever else the file records: jaxlib, flax, torch, commit)."""
    found = {"jax": config.get("jax"), **config.get("versions", {})}
    if config.get("commit"):
        found["commit"] = config["commit"]
    found = {k: v for k, v in found.items() if v}
    return ", ".join(f"{k} {v}" for k, v in found.items()) or None


def results_table(config: dict, rows: list[dict]) -> list[str]:
    """The strategies as a markdown table (times in s for the sampler, ms for forward and merge)."""
    scale, unit = (1.0, "s") if config.get("mode") == "sample" else (1e3, "ms")
    peak = any(r.get("share_of_peak") is not None for r in rows)
    temp = any(r.get("temp_bytes") is not None for r in rows)
    head = ["strategy", "compile s", "fusions", f"median {unit}", f"min {unit}", f"max {unit}", "speed-up",
            "attn tokens", "mlp tokens", "TFLOP/s"] + (["% peak"] if peak else []) + (["temp GiB"] if temp else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    digits = ".4f" if scale * min(r["median_s"] for r in rows) < 1 else ".2f"
    for r in rows:
        cells = [
            f"`{r['strategy']}`", _cell(r.get("compile_s"), ".2f"), _cell(r.get("fusions"), "d"),
            format(scale * r["median_s"], digits), format(scale * r["min_s"], digits), format(scale * r["max_s"], digits),
            f"{r['speedup']:.2f}x", _cell(r.get("token_share_attn"), ".3f"), _cell(r.get("token_share_mlp"), ".3f"),
            _cell(None if r.get("achieved_flops_per_s") is None else r["achieved_flops_per_s"] / 1e12, ".3g"),
        ]
        if peak:
            cells.append(_cell(None if r.get("share_of_peak") is None else 100 * r["share_of_peak"], ".1f") + "%")
        if temp:
            cells.append(_cell(None if r.get("temp_bytes") is None else r["temp_bytes"] / GiB, ".3g"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def profile_table(rows: list[dict]) -> list[str]:
    """Op time per call by region, ms (share of the traced total); [] when the run had no profile."""
    profiled = [r for r in rows if r.get("profile_s")]
    if not profiled:
        return []
    names = (*REGIONS, OTHER)
    lines = ["| strategy | traced ms | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 2)]
    for r in profiled:
        profile = r["profile_s"]
        total = sum(profile.values())
        cells = [f"{1e3 * profile.get(n, 0.0):.2f} ({100 * profile.get(n, 0.0) / total if total else 0:.0f}%)"
                 for n in names]
        lines.append(f"| `{r['strategy']}` | {1e3 * total:.2f} | " + " | ".join(cells) + " |")
    return lines


def render(result: dict, source: str | None = None) -> str:
    """One bench JSON result ({"config": ..., "results": [...]}) as markdown."""
    config, rows = result["config"], result["results"]
    if not rows:
        raise ValueError(f"{source or 'the result'} has no rows")
    lines = [heading(config), ""]
    if config.get("command"):
        lines += [f"`{config['command']}`", ""]
    software = versions(config)
    if software:
        lines += [f"Versions: {software}.", ""]
    lines += results_table(config, rows)
    profile = profile_table(rows)
    if profile:
        lines += ["", "Op time per call by region, ms (share of the traced op time):", ""] + profile
    if source:
        lines += ["", f"(`{source}`)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dit_jax.bench_report", description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", type=Path, help="JSON files written by python -m dit_jax.bench --json")
    args = ap.parse_args(argv)
    sections = []
    for path in args.files:
        try:
            result = json.loads(path.read_text())
            if not isinstance(result, dict) or not all(isinstance(row, dict) for row in result.get("results", [])):
                raise ValueError("expected a JSON object whose results are objects")
            sections.append(render(result, str(path)))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            print(f"error: {path}: not a bench result ({what})", file=sys.stderr)
            return 2
    print("\n".join(sections), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
