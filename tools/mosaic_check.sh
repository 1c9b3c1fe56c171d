#!/usr/bin/env bash
# The Mosaic GPU kernels natively (see experiments/results/mosaic_gpu/NOTES.md): their
# tests, then kernels.py's api timings (xla, Triton and Mosaic rows) at the notes' sizes.
# usage: tools/mosaic_check.sh OUT_DIR [TEST_SECONDS] [BENCH_SECONDS]
# TESTS (pytest targets), TEST_FILTER (a pytest -k expression) and BENCH_ARGS
# (kernels.py arguments) override the defaults.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: $0 OUT_DIR [TEST_SECONDS] [BENCH_SECONDS]}
mkdir -p "$out"
tools/gpu_install.sh "$out/pip.log" || exit 1
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
filter=()
# the Mosaic GPU kernels' tests: their shared pieces, and each op family's Mosaic GPU class
MOSAIC_TESTS="tests/test_mosaic_kernels.py tests/test_mapping_kernels.py::TestMappingMosaicGpu
  tests/test_pre_kernels.py::TestPreMosaicGpu tests/test_post_res_kernels.py::TestPostResMosaicGpu
  tests/test_transition.py::TestTransitionMosaicGpu"
[[ -n ${TEST_FILTER:-} ]] && filter=(-k "$TEST_FILTER")
timeout "${2:-200}" python3 -m pytest -v -p no:cacheprovider -rfEs --tb=short \
  --durations=10 "${filter[@]}" ${TESTS:-$MOSAIC_TESTS} > "$out/tests.log" 2>&1
echo "tests rc=$?" | tee -a "$out/tests.log"
# ptxas -v for every Mosaic kernel compiled by the benchmark: registers and spills.
MOSAIC_GPU_DUMP_PTXAS=1 timeout "${3:-300}" python3 experiments/benchmarks/kernels.py \
  ${BENCH_ARGS:---tokens 8192 32768 --hidden 1280 4096} > "$out/kernels.log" 2>&1
grep -E "^(FAILED|ERROR)" "$out/tests.log" | head -20
grep -E " passed| failed" "$out/tests.log" | tail -1
grep -ciE "[1-9][0-9]* bytes spill" "$out/kernels.log" | sed 's/^/ptxas lines with spills: /'
grep -E "copy ceiling|^ +T |mapping|pre |post-res |connection" "$out/kernels.log"
