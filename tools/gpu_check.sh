#!/usr/bin/env bash
# The native GPU checks, on an offline machine whose Python 3.12 has JAX 0.11.2 with its
# CUDA plugin (the packages it lacks come from tools/fetch_wheels.sh's .whl/):
#   1. the whole test suite, verbose (a log cut short still names each result);
#   2. the training.deterministic switch's step-time cost, and whether two deterministic
#      runs end on the same loss (step_overhead.py, scanned medium shape, batch 2).
# usage: tools/gpu_check.sh OUT_DIR [SUITE_SECONDS] [BENCH_SECONDS]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: $0 OUT_DIR [SUITE_SECONDS] [BENCH_SECONDS]}
mkdir -p "$out"
tools/gpu_install.sh "$out/pip.log" || exit 1
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1  # test processes share the GPU
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
start=$SECONDS
timeout "${2:-400}" python3 -m pytest -v -n "$(( $(nproc) - 1 ))" -p no:cacheprovider -rfEs \
  --tb=short --durations=15 tests > "$out/suite.log" 2>&1
echo "suite rc=$? in $(( SECONDS - start )) s" | tee -a "$out/suite.log"
bench="python3 experiments/benchmarks/step_overhead.py --shape=medium --scan --batch=2
  --seq=2048 --steps=8 --warmup=2 --copy_mib=256"
# deterministic variants take XLA attention (train.deterministic_model): the last run
# gives the default mode's cost with that attention, to split the two effects.
timeout "${3:-120}" $bench --attention=auto --out="$out/determinism_medium.json" \
  --variants=mhc:pallas:none,mhc:pallas:none:deterministic,mhc:pallas:none:deterministic \
  > "$out/determinism_medium.log" 2>&1
timeout 60 $bench --attention=xla --variants=mhc:pallas:none \
  --out="$out/xla_attention_medium.json" > "$out/xla_attention_medium.log" 2>&1
grep -E "^(FAILED|ERROR)" "$out/suite.log" | head -30
grep -E " passed| failed" "$out/suite.log" | tail -1
echo "PASSED $(grep -c ' PASSED ' "$out/suite.log")  FAILED $(grep -c ' FAILED ' "$out/suite.log")"
grep -E "^mhc:pallas" "$out/determinism_medium.log" "$out/xla_attention_medium.log"
