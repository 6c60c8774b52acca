#!/usr/bin/env bash
# The one prepared GPU call: times DiT-XL/2 (baseline, SDTM, ToMe, diffusers/PyTorch) and
# PixArt-XL/2 at 1024 px on the card, writing logs and JSON results to $OUT, a table last.
#   bash docs/gpu_run.sh            (on the GPU machine, from the repository root)
# Needs .whl/ (orbax-checkpoint and diffusers wheels, for the PyTorch comparison) carried along,
# made here first: pip download --no-deps -d .whl diffusers==0.42.1 orbax-checkpoint==0.12.8
# TRAIN_SECONDS>0 also trains the embedded default (then .data/fashion-mnist/ must come too).
# A CPU dry run (every step; 5 min on the 2-core VM on 2026-12-07). --input-size 16 shrinks the
# bench runs to 64 tokens: without it step 1 alone outlasts its 240 s on a CPU.
#   VARIANT=DiT-S/2 PIXART=PixArt-alpha-XL/2-256 PIXART_SIZE=256 BENCH_EXTRA="--depth 1 --input-size 16" \
#   REPEATS=2 SAMPLE_REPEATS=1 BATCHES=1 MERGE_TOKENS=256 BUDGET=3000 \
#   CARD_MEMORY_EXTRA="--sizes 256 --t5-layers 1 --depth 1 --steps 2" bash docs/gpu_run.sh
# The cards' image holds jax 0.11.2 (Python 3.12), this VM jax 0.10.2: the same dry run in a
# Python 3.12 venv with jax/jaxlib 0.11.2, flax 0.12.10, numpy 2.5.2 and orbax-checkpoint 0.12.8
# (PATH=/tmp/venv312/bin:$PATH bash docs/gpu_run.sh ..., 2026-12-08) ran every step in 3 min but
# the two --torch ones, which stopped at the missing torch (there on the cards).
# Everything after the set-up shares BUDGET seconds (default 480), most important first; what
# does not fit is skipped, and the table of what ran prints last.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
TRAIN_SECONDS=${TRAIN_SECONDS:-0}
VARIANT=${VARIANT:-DiT-XL/2}
PIXART=${PIXART:-PixArt-alpha-XL/2-1024}
BENCH_EXTRA=${BENCH_EXTRA:-}
REPEATS=${REPEATS:-10}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.8
start=$(date +%s)
stamp() { echo "== $(( $(date +%s) - start ))s: $*"; }

stamp "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>/dev/null
rm -rf /tmp/site
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
python3 -c "import jax, flax; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__)" || exit 1

if [ "$TRAIN_SECONDS" -gt 0 ]; then
  stamp "train the embedded default for ${TRAIN_SECONDS}s"
  python3 -m dit_jax.train --out /tmp/fashion --data-root .data/fashion-mnist --steps 200000 \
    --time-limit "$TRAIN_SECONDS" --export-dtype bfloat16 --dtype bfloat16 ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/train.log"
  if [ -f /tmp/fashion/final/config.json ]; then
    tar -C /tmp/fashion -cf - final | split -b 15m - "$OUT/fashion-dit.tar.part-"
  fi
fi

BUDGET=${BUDGET:-480}  # seconds for everything below; the device call's limit is 600 s
# ONLY: the steps to run, by name (default: all), e.g. a second call on the warm machine for what the
# first one's budget skipped: ONLY="card_memory bench_merge fwd256 sample512-b1 sample512-b32".
# Names: sample512-b8 fwd512 align512 pixart1024 card_memory bench_merge fwd256 sample512-b1 sample512-b32
# cublaslt-fwd512 cublaslt-sample512 graphs512 old-vs-new.
ONLY=${ONLY:-}
wanted() { [ -z "$ONLY" ] || [[ " $ONLY " == *" $1 "* ]] || { stamp "skip $1: not in ONLY"; return 1; }; }
bench_start=$(date +%s)
bench() {  # name, then bench arguments. Runs only while the budget lasts, and at most 240 s or
  # what is left of it, so the table at the end always prints. One compile per strategy unless
  # the call asks for more rounds.
  local name=$1; shift
  wanted "$name" || return
  local left=$(( BUDGET - ($(date +%s) - bench_start) ))
  [ "$left" -gt 240 ] && left=240
  if [ "$left" -lt 30 ]; then stamp "skip $name: the budget is spent"; return; fi
  stamp "bench $name (at most ${left}s): $*"
  timeout "$left" python3 -m dit_jax.bench --compile-rounds "${COMPILE_ROUNDS:-1}" "$@" --json "$OUT/bench-$name.json" 2>&1 \
    | grep -v Warning | tee -a "$OUT/bench.log"
}
# Most important first. 1. The whole sampler, 20 DDIM steps with guidance, batch 8: the issues'
# 1.55x target, IDM and ToMe merges summed by a scatter-add (the default) and by a matmul, and
# plans shared by 4 blocks, alone and with the matmul sum (plan_every=4: no quality change on the shipped model,
# docs/quality-plan-every.md; 1.24x -> 1.33x on the H200 before the scatter-free SSM merge, and
# while sharing still copied the blocks' weights in every forward, fixed 2026-12-07), and the
# setting that keeps the shipped model's quality (sdtm-cached: lone slots only on SSM steps), also
# with plans shared by 4 blocks (no quality change either).
bench sample512-b8 sample --variant "$VARIANT" $BENCH_EXTRA --image-size 512 --batch 8 --dtype bfloat16 \
  --strategies "${SAMPLE:-baseline,sdtm,sdtm:merge_sum=matmul,sdtm*4,sdtm:merge_sum=matmul*4,tome:0.5,sdtm:protect_every=3,cache_weight=0.0,switch_step=0.7,sdtm:protect_every=3,cache_weight=0.0,switch_step=0.7*4}" \
  --steps 20 --repeats "${SAMPLE_REPEATS:-3}" \
  --compile-rounds 2
# 2. One forward of DiT-XL/2 at 512 px (batch 8): where merging pays and where it does not
# (--profile: kernel time per region: attention, MLP, merge plans, merge, unmerge), and PyTorch.
bench fwd512 forward --variant "$VARIANT" $BENCH_EXTRA --image-size 512 --batch 8 --dtype bfloat16 --repeats "$REPEATS" \
  --strategies "baseline,ssm:0.5,idm:0.5,idm:ratio=0.5,merge_sum=matmul,tome:0.5,tome:ratio=0.5,merge_sum=matmul" \
  --torch --profile
# 2b. (About 30 s.) Do slot counts that are not multiples of the kernels' tiles cost a whole tile? SSM at 640
# slots (a multiple of 128) and 637; 514 (ratio 0.5) and 448; 385. If 637 costs what 640 does and
# 514 more than its share, rounding the schedule's counts to aligned slot counts pays on a GPU.
bench align512 forward --variant "$VARIANT" $BENCH_EXTRA --image-size 512 --batch 8 --dtype bfloat16 --repeats "$REPEATS" \
  --strategies "baseline,ssm:0.375,ssm:0.3808,ssm:0.5,ssm:0.5625,ssm:0.625"
# 3. PixArt at 1024 px (4,096 image tokens), 20 DPM-Solver++ steps with guidance, random weights and text
# (sdtm-cached: the toy text model's quality-keeping setting; merged windows compute no branch on SSM steps).
# Its JSON's temp_bytes is the sampler's device memory beside the weights on the card (the README's
# 16 GB question; this CPU's analysis says 2.4 GiB at 512 px, most of it a float32 copy of the weights
# that only the CPU backend makes).
bench pixart1024 sample --variant "$PIXART" $BENCH_EXTRA --image-size "${PIXART_SIZE:-1024}" --batch 2 --dtype bfloat16 \
  --strategies "${PIXART_SAMPLE:-baseline,sdtm,sdtm:protect_every=3,cache_weight=0.0,switch_step=0.7,tome:0.5}" \
  --steps 20 --repeats "${SAMPLE_REPEATS:-3}"
# 3b. (About 1-2 min.) Issue 7's 16 GB question: the whole PixArt-alpha pipeline (T5-XXL, XL/2, VAE; bf16
# weights made on the card) sampling one image at 512 and 1024 px, the allocator's peak after each stage,
# for the README's two routes (encode-then-drop, and the T5 kept on the card). Without preallocation.
left=$(( BUDGET - ($(date +%s) - bench_start) ))
if ! wanted card_memory; then :
elif [ "$left" -ge 90 ]; then
  stamp "card_memory (at most 150s)"
  timeout 160 python3 docs/card_memory.py --timeout 150 ${CARD_MEMORY_EXTRA:-} 2>&1 | grep -v Warning | tee "$OUT/card_memory.log"
else
  stamp "skip card_memory: the budget is spent"
fi
# 4. The plans' kernels and the merge op's implementations side by side on the card
# (sdtm.bench_merge: "plan ops" the kernels a plan launches; "offsets" is sdtm.merge, "scatter"
# its scatter-add, "matmul" the scatter-free sum of merge_sum="matmul"; segment sum, one-hot
# matmul, ...), at DiT-XL/2's 1024 tokens, 16 rows (batch 8 + guidance).
left=$(( BUDGET - ($(date +%s) - bench_start) ))
if ! wanted bench_merge; then :
elif [ "$left" -ge 60 ]; then
  stamp "bench_merge"
  timeout 60 python3 -m sdtm.bench_merge --tokens ${MERGE_TOKENS:-1024} --batch 16 --channels 1152 --dtype bfloat16 \
    --reps 20 2>&1 | grep -v Warning | tee "$OUT/bench_merge.log"
fi
# 5. The forward at 256 px against PyTorch, then the sampler at batch 1 and 32.
bench fwd256 forward --variant "$VARIANT" $BENCH_EXTRA --image-size 256 --batch 8 --dtype bfloat16 --repeats "$REPEATS" \
  --strategies "baseline,ssm:0.5,tome:0.5" --torch
for batch in ${BATCHES:-1 32}; do
  bench "sample512-b$batch" sample --variant "$VARIANT" $BENCH_EXTRA --image-size 512 --batch "$batch" --dtype bfloat16 \
    --strategies "baseline,sdtm,sdtm:max_phases=2" --steps 20 --repeats "${SAMPLE_REPEATS:-3}"
done
# 6. (About 2 min.) The MLP's GELU as a GEMM epilogue. XLA's default GEMMs are Triton fusions
# that leave bias + GELU to a kernel of their own: at batch 8 it reads and writes the [8192, 4608]
# hidden activations, 151 MB per block. With cuBLASLt and no Triton GEMMs XLA calls cuBLASLt with
# a BIAS_GELU epilogue instead (seen in the program compiled for an H200 without a card,
# docs/device_compile.py, 2026-12-08), so that kernel goes; whether cuBLAS's GEMMs are as fast as
# the autotuned Triton ones only the card says. Compare with steps 1 and 2 on the same machine.
(
  export XLA_FLAGS="${CUBLASLT_FLAGS:---xla_gpu_enable_cublaslt=true --xla_gpu_enable_triton_gemm=false}"
  bench cublaslt-fwd512 forward --variant "$VARIANT" $BENCH_EXTRA --image-size 512 --batch 8 --dtype bfloat16 \
    --repeats "$REPEATS" --strategies "baseline,ssm:0.5,idm:0.5"
  bench cublaslt-sample512 sample --variant "$VARIANT" $BENCH_EXTRA --image-size 512 --batch 8 --dtype bfloat16 \
    --strategies "baseline,sdtm,sdtm*4" --steps 20 --repeats "${SAMPLE_REPEATS:-3}"
)
# 7. (About 1 min.) CUDA graphs for the loops: XLA records runs of fusions into command buffers by
# default, but not while loops (the scans over the steps and the blocks), so every block of every
# step launches from the host. +WHILE records whole loops where the body allows it; compiled for
# an H200 without a card (jaxlib 0.10.2, docs/device_compile.py) the cuDNN call and the weight copies
# stayed outside and so did the loop. If the merged strategies gain more than the baseline here,
# the card's XLA did better, and the plans' small kernels were bound by launches.
(
  export XLA_FLAGS="${GRAPH_FLAGS:---xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL}"
  bench graphs512 sample --variant "$VARIANT" $BENCH_EXTRA --image-size 512 --batch 8 --dtype bfloat16 \
    --strategies "baseline,sdtm,sdtm*4,sdtm:protect_every=3,cache_weight=0.0,switch_step=0.7" --steps 20 --repeats "${SAMPLE_REPEATS:-3}"
)
# 8. (Six short processes, only when .old/ was carried.) A change timed side by side with the code before
# it: .old/ holds an earlier commit's dit_jax and sdtm, made here with
#   mkdir -p .old && git archive REV dit_jax sdtm ':(exclude)dit_jax/assets' | tar -x -C .old
# (e.g. REV=275fd77: the blocks' adaLN tables computed inside the block loop; 580 KB), and carried
# along. The baseline forward runs from both trees in alternating processes, three rounds
# (OLD_ROUNDS), each writing its JSON. Each runs from its tree's folder: `python -m` puts the
# working folder first on the path, before PYTHONPATH.
left=$(( BUDGET - ($(date +%s) - bench_start) ))
if [ ! -d .old/dit_jax ] || ! wanted old-vs-new; then :
elif [ "$left" -ge 60 ]; then
  stamp "old-vs-new: the baseline forward from .old/ and from this tree, alternating"
  for round in $(seq 1 "${OLD_ROUNDS:-3}"); do
    for tree in old new; do
      root=$PWD; [ "$tree" = old ] && root=$PWD/.old
      (cd "$root" && PYTHONPATH="$root:$PYTHONPATH" timeout 60 python3 -m dit_jax.bench forward --variant "$VARIANT" \
        $BENCH_EXTRA --image-size 512 --batch 8 --dtype bfloat16 --repeats "$REPEATS" --strategies baseline \
        --json "$OUT/old-vs-new-$tree-$round.json") 2>&1 | grep -E "^baseline" | sed "s/^/$tree $round: /" | tee -a "$OUT/bench.log"
    done
  done
else
  stamp "skip old-vs-new: the budget is spent"
fi
stamp "done"
python3 -m dit_jax.bench_report "$OUT"/bench-*.json > "$OUT/tables.md" 2>&1  # the markdown tables for docs/benchmarks.md
[ -f "$OUT/bench.log" ] && grep -E "^#|^[a-z]" "$OUT/bench.log" | grep -v "^wrote"
cat "$OUT/bench_merge.log" 2>/dev/null
cat "$OUT/card_memory.log" 2>/dev/null
