#!/usr/bin/env bash
# Installs, on an offline GPU machine whose Python 3.12 has JAX 0.11.2 with its CUDA
# plugin, the wheels tools/fetch_wheels.sh put in .whl/ and this project (editable).
# usage: tools/gpu_install.sh LOG_FILE
set -uo pipefail
cd "$(dirname "$0")/.."
log=${1:?usage: $0 LOG_FILE}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir .whl/*.whl \
  > "$log" 2>&1 || { tail -5 "$log"; exit 1; }
python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . \
  >> "$log" 2>&1 || { tail -5 "$log"; exit 1; }
