#!/usr/bin/env bash
# The one prepared GPU call: trains the embedded default (Fashion-MNIST DiT) and times DiT-XL/2
# (baseline, SDTM, ToMe, and diffusers/PyTorch) on the card, writing logs and results to $OUT.
#   bash docs/gpu_run.sh            (on the GPU machine, from the repository root)
# Needs: .whl/ (flax, orbax-checkpoint, diffusers wheels) and .data/fashion-mnist/ carried along.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
TRAIN_SECONDS=${TRAIN_SECONDS:-240}
VARIANT=${VARIANT:-DiT-XL/2}  # a smaller VARIANT and BENCH_EXTRA="--depth 1" make a CPU dry run
BENCH_EXTRA=${BENCH_EXTRA:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.7
start=$(date +%s)
stamp() { echo "== $(( $(date +%s) - start ))s: $*"; }

stamp "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
rm -rf /tmp/site
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
else
  export PYTHONPATH=$PWD
fi
python3 -c "import jax, flax, torch; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'torch', torch.__version__)" || exit 1

if [ "$TRAIN_SECONDS" -gt 0 ]; then
  stamp "train the embedded default for ${TRAIN_SECONDS}s"
  python3 -m dit_jax.train --out /tmp/fashion --data-root .data/fashion-mnist --steps 200000 \
    --time-limit "$TRAIN_SECONDS" --export-dtype bfloat16 --dtype bfloat16 ${TRAIN_ARGS:-} 2>&1 | tee "$OUT/train.log"
  if [ -f /tmp/fashion/final/config.json ]; then
    tar -C /tmp/fashion -cf - final | split -b 15m - "$OUT/fashion-dit.tar.part-"
  fi
fi

bench() {  # name, then bench arguments
  local name=$1; shift
  stamp "bench $name"
  timeout 300 python3 -m dit_jax.bench "$@" --json "$OUT/bench-$name.json" 2>&1 | grep -v Warning | tee -a "$OUT/bench.log"
}
FORWARD=${FORWARD:-baseline,baseline/xla,baseline+unrolled,ssm:0.5,ssm:0.5*4,idm:0.5,idm:0.5*4,tome:0.5,tome:0.5*4}
SAMPLE=${SAMPLE:-baseline,sdtm,sdtm*4,tome:0.5}
for px in ${RESOLUTIONS:-256 512}; do
  bench "fwd$px" forward --variant "$VARIANT" $BENCH_EXTRA --image-size "$px" --batch 8 --dtype bfloat16 \
    --strategies "$FORWARD" --repeats "${REPEATS:-20}" --torch
done
for px in ${SAMPLE_RESOLUTIONS:-512}; do
  bench "sample$px" sample --variant "$VARIANT" $BENCH_EXTRA --image-size "$px" --batch 8 --dtype bfloat16 \
    --strategies "$SAMPLE" --steps 20 --repeats "${SAMPLE_REPEATS:-5}"
done
stamp "samples from the shipped model in bf16 on the GPU (attention: auto)"
timeout 120 python3 -m dit_jax.sample "T-shirt/top" trouser pullover dress coat sandal shirt sneaker bag "ankle boot" \
  --bf16 --sdtm --tome 0.5 --out "$OUT/gpu-samples.png" 2>&1 | grep -v Warning
stamp "done"
grep -E "^#|^[a-z]" "$OUT/bench.log" | grep -v "^wrote"
