#!/usr/bin/env bash
# Puts JAX's CUDA PJRT plugin (jax-cuda13-pjrt at the installed jaxlib's version, whose
# library compiles Mosaic GPU kernels) into .cache/cuda-compiler/jaxlib-VERSION, outside
# the environment, so that tools/ptxas_check.py can compile the kernels through ptxas on
# a host without a GPU (installed into the environment, it would make JAX look for one).
# On a platform without the plugin (not x86-64 or aarch64 Linux) it says so and exits 0;
# a failed download fails.
# usage: tools/fetch_cuda_compiler.sh [PYTHON]
set -euo pipefail
python=$(command -v "${1:-python}")
cd "$(dirname "$0")/.."
if [ "$(uname -s)" != Linux ] || ! [[ $(uname -m) =~ ^(x86_64|aarch64)$ ]]; then
  echo "fetch_cuda_compiler: no JAX CUDA plugin for $(uname -s) $(uname -m); skipped" >&2
  exit 0
fi
version=$("$python" -c 'import jaxlib; print(jaxlib.__version__)')
target=.cache/cuda-compiler/jaxlib-$version
if [ -f "$target/.complete" ]; then
  exit 0
fi
rm -rf "$target"
"$python" -m pip install -q --no-deps --no-compile --target "$target" "jax-cuda13-pjrt==$version"
touch "$target/.complete"
echo "fetch_cuda_compiler: $target"
