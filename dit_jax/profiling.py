"""Where a compiled call's time goes: device time per source region (attention, MLP, merge plans,
merge, unmerge, ...), from one profiler trace.

The model and the merging code mark their regions with `jax.named_scope` (names in `REGIONS`);
XLA keeps the scope path in every instruction's metadata, fusions included. `profile_regions`
runs a compiled function under `jax.profiler.trace`, reads the trace's per-op events (GPU
kernels on a GPU, XLA's thunks on CPU), maps each op to its instruction's scope path, and adds
the time up per region: the innermost region of the path wins (a merge inside the MLP region
counts as merge). Ops outside every region (norms, modulation, residuals, the sampler's
arithmetic, copies) are "other".

    regions = profile_regions(compiled, lambda: compiled(*args))   # {"attention": 0.0123, ..., "other": ...} s per call

`distinct_fusions` reads the same text for what drives compile time: XLA compiles each distinct
fused computation once per program (identical ones share a kernel). `loop_ops` counts the ops
each loop iteration runs (a scanned block's kernel launches on a GPU), `loop_kernels` what the
loops launch in a call by kind and region.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import gzip
import json
import os
import re
import tempfile
from collections.abc import Callable

import jax

# Region names, as the code marks them with jax.named_scope.
ATTENTION, MLP, PLAN, MERGE, UNMERGE, KEY_ATTENTION = (
    "attention", "mlp", "merge_plan", "merge", "unmerge", "key_attention")
REGIONS = (ATTENTION, MLP, PLAN, MERGE, UNMERGE, KEY_ATTENTION)
OTHER = "other"

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?op_name=\"([^\"]*)\"")


def instruction_regions(hlo_text: str) -> dict[str, str]:
    """Instruction name -> region, from a compiled module's text (`compiled.as_text()`)."""
    regions = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            regions[match.group(1)] = region_of(match.group(2))
    return regions


def region_of(op_name: str) -> str:
    """The innermost region named in a scope path such as "jit(f)/while/body/mlp/merge/add"."""
    for part in reversed(op_name.split("/")):
        if part in REGIONS:
            return part
    return OTHER


_FUSED_HEADER = re.compile(r"^%?fused[\w.\-]*\s")
_NAMES = re.compile(r"%[\w.\-]+")
_METADATA = re.compile(r", metadata=\{[^}]*\}")


def distinct_fusions(hlo_text: str) -> dict[str, int]:
    """Distinct fused computations of a compiled module (`compiled.as_text()`) per region.

    Two fusions count once when their bodies are the same up to instruction names and
    metadata, as XLA then compiles one kernel for both. A fusion belongs to the region most of
    its instructions come from ("other" when none is in a region).
    """
    seen: dict[str, str] = {}
    for computation in hlo_text.split("\n\n"):
        header, _, body = computation.strip().partition("\n")
        if not _FUSED_HEADER.match(header):
            continue
        key = hashlib.sha1(_NAMES.sub("%", _METADATA.sub("", body)).encode()).hexdigest()
        if key in seen:
            continue
        votes = collections.Counter(region_of(name) for name in re.findall(r'op_name="([^"]*)"', body))
        votes.pop(OTHER, None)
        seen[key] = votes.most_common(1)[0][0] if votes else OTHER
    return dict(collections.Counter(seen.values()))


# Instructions that launch nothing: what `loop_ops` leaves out.
_NOT_OPS = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "after-all"}
_COMPUTATION_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s")
_OPCODE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*.*?\s([a-z][\w\-]*)\(")
_WHILE_BODY = re.compile(r"\swhile\(.*\bbody=%?([\w.\-]+)")


def loop_ops(hlo_text: str) -> list[int]:
    """Ops each loop iteration runs, per `while` body of a compiled module (`compiled.as_text()`),
    largest first: its fusions, custom calls, sorts, copies, ... (not parameters, tuples,
    bitcasts or constants). A scanned block's body is one entry: the kernels a block launches on
    a GPU, the thunks it runs on CPU. A nested loop counts as one op of its parent's body."""
    bodies, _ = _computations(hlo_text)
    loops = {m.group(1) for lines in bodies.values() for line in lines if (m := _WHILE_BODY.search(line))}
    return sorted((_count_ops(bodies.get(name, [])) for name in loops), reverse=True)


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str | None]:
    """A compiled module's text -> ({computation name: its instruction lines}, the entry's name)."""
    computations: dict[str, list[str]] = {}
    entry = None
    for computation in hlo_text.split("\n\n"):
        lines = computation.strip().splitlines()
        if lines and (header := _COMPUTATION_HEADER.match(lines[0])):
            computations[header.group(1)] = lines[1:]
            entry = header.group(1) if lines[0].startswith("ENTRY") else entry
    return computations, entry


def _count_ops(lines: list[str]) -> int:
    """Ops among a computation's instruction lines: what runs, not parameters, tuples, ..."""
    return sum(m.group(1) not in _NOT_OPS for line in lines if (m := _OPCODE.match(line)))


_TOP_K = re.compile(r'custom_call_target="[^"]*top_?k', re.IGNORECASE)


def entry_ops(hlo_text: str) -> dict[str, int]:
    """What a compiled module without loops (`compiled.as_text()`) launches: {"ops": the entry
    computation's ops (as `loop_ops` counts them), "sort": sorts and top-k calls, "scatter": ...},
    the last two counted wherever they sit (XLA's CPU backend wraps a scatter in a fusion)."""
    entry = hlo_text[hlo_text.index("\nENTRY"):].strip().split("\n\n")[0].splitlines()[1:]
    lines = hlo_text.splitlines()
    everywhere = collections.Counter(m.group(1) for line in lines if (m := _OPCODE.match(line)))
    top_k = sum(bool(_TOP_K.search(line)) for line in lines if " custom-call(" in line)
    return {
        "ops": _count_ops(entry),
        "sort": everywhere["sort"] + top_k,
        "scatter": everywhere["scatter"],
    }


_TRIP_COUNT = re.compile(r'known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_CALLS = re.compile(r"\bcalls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def loop_kernels(hlo_text: str) -> collections.Counter:
    """What the loops of a compiled module (`compiled.as_text()`) launch in one call,
    {(kind, region): count}: every op of every loop body, counted as often as its loops iterate
    (a loop's known trip count; nested loops multiply, as when k blocks share a plan). Divided
    by the model's depth it is what one scanned block launches, the kernels on a GPU.

    kind: "gemm" (a fusion around a dot, or a cuBLAS call), "sort", "scatter", "cudnn" (a cuDNN
    call), "weight copy" (a fusion that only slices and copies, e.g. one block's weights out of
    the stacked ones), else XLA's fusion kind ("loop": elementwise, "input": a reduction,
    "custom", ...) or the opcode. region: as `region_of` reads the op's scope."""
    computations, entry = _computations(hlo_text)
    counts: collections.Counter = collections.Counter()

    def visit(name: str, times: int, in_loop: bool) -> None:
        for line in computations.get(name, []):
            match = _OPCODE.match(line)
            if not match or match.group(1) in _NOT_OPS:
                continue
            if match.group(1) == "while":
                trips = _TRIP_COUNT.search(line)
                visit(_WHILE_BODY.search(line).group(1), times * (int(trips.group(1)) if trips else 1), True)
            elif in_loop:
                called = _CALLS.search(line)
                inner = {m.group(1) for x in computations.get(called.group(1), []) if (m := _OPCODE.match(x))} \
                    if called else set()
                op_name = _OP_NAME.search(line)
                region = region_of(op_name.group(1)) if op_name else OTHER
                counts[(_kernel_kind(line, match.group(1), inner), region)] += times

    visit(entry, 1, False)
    return counts


def _kernel_kind(line: str, opcode: str, inner: set[str]) -> str:
    """What one launched op (a line of a computation, its opcode, the opcodes it calls) does."""
    if opcode == "custom-call":
        if "__cublas" in line:  # a library GEMM (with `--xla_gpu_enable_triton_gemm=false`)
            return "gemm"
        return "cudnn" if "cudnn" in line else "sort" if _TOP_K.search(line) else "custom-call"
    for kind in ("dot", "sort", "scatter"):
        if kind in inner or opcode == kind:
            return "gemm" if kind == "dot" else kind
    if "dynamic-slice" in inner and inner - _NOT_OPS <= {"dynamic-slice", "copy"}:
        return "weight copy"
    fusion_kind = re.search(r"\bkind=k(\w+)", line)
    return fusion_kind.group(1).lower() if opcode == "fusion" and fusion_kind else opcode


def module_name(hlo_text: str) -> str:
    first = hlo_text.split("\n", 1)[0]
    return first.split()[1].rstrip(",") if first.startswith("HloModule") else ""


def _op_events(trace: dict | list, module: str, on_accelerator: bool = False) -> list[tuple[str, float]]:
    """(instruction name, microseconds) of every op event of `module`: a GPU's kernel events
    when the trace has them, else the host's (CPU thunks). on_accelerator: the module ran on a
    GPU or TPU, so host events would time launches, not ops: no device events is an error."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    process = {e["pid"]: e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "process_name"}
    ops = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})
           and not e["name"].startswith("end: ") and e["args"].get("hlo_module", module) == module]
    on_device = [e for e in ops if "/device:" in process.get(e["pid"], "")]
    if on_accelerator and not on_device:
        raise RuntimeError(
            "the profiler trace has no device op events for this module (on a GPU: is CUPTI usable here?); "
            "host events would time kernel launches, not kernels"
        )
    return [(e["args"]["hlo_op"], float(e.get("dur", 0.0))) for e in _leaves(on_device or ops)]


def _leaves(events: list[dict]) -> list[dict]:
    """The events that hold no other event of their thread: a CPU `while` or `conditional` op's
    event spans the ops of its body, which are counted themselves."""
    by_thread = collections.defaultdict(list)
    for e in events:
        by_thread[(e["pid"], e.get("tid"))].append(e)
    leaves = []
    for thread in by_thread.values():
        thread.sort(key=lambda e: (float(e["ts"]), -float(e.get("dur", 0.0))))
        for e, following in zip(thread, [*thread[1:], None]):
            end = float(e["ts"]) + float(e.get("dur", 0.0))
            if following is None or float(following["ts"]) >= end:
                leaves.append(e)
    return leaves


def profile_regions(compiled, run: Callable[[], object], calls: int = 3) -> dict[str, float]:
    """Seconds per call spent in each region (and "other"), measured over `calls` calls of
    `run()`, which calls the executable `compiled` (whose text names the ops), under the profiler.

    The sum is the op time the trace records: on a GPU the kernels' busy time (the wall time
    can be longer, by launch gaps), on CPU the thunks' time.
    """
    hlo = compiled.as_text()
    regions, module = instruction_regions(hlo), module_name(hlo)
    jax.block_until_ready(run())  # warm
    with tempfile.TemporaryDirectory() as log_dir:
        with jax.profiler.trace(log_dir, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(run())
        files = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)
        if not files:
            raise RuntimeError(f"the profiler wrote no perfetto trace under {log_dir}")
        with gzip.open(files[0], "rt") as f:
            trace = json.load(f)
    totals: dict[str, float] = collections.Counter({name: 0.0 for name in (*REGIONS, OTHER)})
    on_accelerator = jax.default_backend() != "cpu"
    for op, micros in _op_events(trace, module, on_accelerator):
        totals[regions.get(op, OTHER)] += micros * 1e-6 / calls
    return dict(totals)
