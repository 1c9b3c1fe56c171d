#!/usr/bin/env bash
# Downloads into .whl/ the wheels that an offline GPU machine with Python 3.12 and
# JAX, flax, optax, orbax-checkpoint, absl, etils and tensorboard preinstalled lacks, for:
#   pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any)
for pkg in ml_collections==1.1.0 grain==0.2.18 array_record==0.8.6 tensorboardX==2.6.5 portpicker==1.6.0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${plat[@]}" -d .whl "$pkg"
done
ls .whl
