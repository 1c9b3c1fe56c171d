#!/usr/bin/env bash
# Downloads into .whl/ (x86-64 Linux, CPython 3.12) the wheels, at constraints.txt's
# versions, of the packages that an offline GPU machine lacks (or has too old: fsspec, whose
# "adaptive" cache gcsfs uses) when its Python 3.12 already has JAX 0.11.2 with
# its CUDA plugin, flax, optax, orbax-checkpoint, absl, etils, tensorboard, numpy, scipy,
# matplotlib, pytest and pytest-xdist. tools/gpu_check.sh installs them there.
set -euo pipefail
cd "$(dirname "$0")/.."
missing=(
  array-record grain ml-collections tensorboardx portpicker tzdata safetensors
  # the tokenizers (mhc_jax/tokenizers.py) and what huggingface tokenizers needs
  sentencepiece tokenizers tiktoken regex huggingface-hub hf-xet filelock httpx2 httpcore2
  anyio h11 click truststore
  # the source formats (mhc_jax/sources.py): parquet and zstd
  pyarrow zstandard
  # the Cloud Storage path test: gcsfs, google-cloud-storage and the emulator
  fsspec gcsfs gcp-storage-emulator google-api-core google-auth google-auth-oauthlib
  google-cloud-core google-cloud-storage google-cloud-storage-control google-crc32c
  google-resumable-media googleapis-common-protos grpc-google-iam-v1 grpcio-status
  oauthlib requests-oauthlib opentelemetry-api proto-plus pyasn1 pyasn1-modules
  cffi pycparser cryptography decorator
  # the notebook tests: jupytext, nbclient and an IPython kernel
  jupytext nbclient nbformat ipykernel ipython ipython-pygments-lexers jupyter-client
  jupyter-core traitlets tornado pyzmq comm debugpy matplotlib-inline nest-asyncio2
  jedi parso pexpect ptyprocess prompt-toolkit wcwidth stack-data executing asttokens
  pure-eval fastjsonschema jsonschema jsonschema-specifications referencing
  rpds-py mdit-py-plugins platformdirs
)
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
      --platform manylinux1_x86_64 --platform any)
mkdir -p .whl
pins=()
for pkg in $(printf '%s\n' "${missing[@]}" | sort -u); do
  pin=$(grep -i "^${pkg}==" <(sed 's/^[^=]*/\L&/; s/_/-/g' constraints.txt) || true)
  [ -n "$pin" ] || { echo "$pkg is not in constraints.txt" >&2; exit 1; }
  pins+=("$pin")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp "${plat[@]}" -d .whl "${pins[@]}"
ls .whl | wc -l
