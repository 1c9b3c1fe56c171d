#!/usr/bin/env bash
# Shapes A and B of the end-to-end overhead benchmark on one GPU, every variant of
# a shape in one process (see docs/benchmarks.md). Logs and JSON go to $1 (default /tmp).
#   bash experiments/benchmarks/step_overhead_ab.sh /tmp/overhead
set -uo pipefail
out=${1:-/tmp}
mkdir -p "$out"
variants=${VARIANTS:-residual:xla:none,hc:xla:mhc_blocks,mhc:xla:none,mhc:auto:none,mhc:auto:mhc_blocks}
# Per shape: about 60 s to start plus 110 s per variant (compile, warm-up, steps) on an H100.
count=$(($(tr -cd , <<<"$variants" | wc -c) + 1))
shape_timeout=${SHAPE_TIMEOUT_S:-$((60 + 110 * count))}
for shape in ${SHAPES:-A B}; do
  batch_var=BATCH_$shape
  batch=${!batch_var:-$([ "$shape" = A ] && echo 8 || echo 4)}
  timeout "$shape_timeout" python3 experiments/benchmarks/step_overhead.py \
    --shape="$shape" --batch="$batch" --seq=2048 --steps="${STEPS:-10}" --warmup=3 \
    --variants="$variants" --out="$out/shape_$shape.json" ${EXTRA:-} 2>&1 |
    grep -v "^W0000\|^I0000\|^WARNING: All log" | tee "$out/shape_$shape.log"
done
