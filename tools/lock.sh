#!/usr/bin/env bash
# Re-locks the pinned dependencies from a fresh Python 3.12 virtualenv:
#   tools/lock.sh pinned   constraints.txt: JAX/jaxlib 0.11.2 (what the GPU machines run)
#   tools/lock.sh newest   constraints-newest.txt: the newest JAX on the registry (CI smoke)
# Everything else takes the newest release that fits. Review the diff before committing.
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
  pinned) out=constraints.txt; jax=(jax==0.11.2 jaxlib==0.11.2) ;;
  newest) out=constraints-newest.txt; jax=(--upgrade jax jaxlib) ;;
  *) echo "usage: $0 pinned|newest" >&2; exit 2 ;;
esac
python=$(command -v python3.12 || true)
[ -n "$python" ] || { echo "$0 needs python3.12 on PATH" >&2; exit 1; }
venv=$(mktemp -d)
trap 'rm -rf "$venv"' EXIT
"$python" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q "${jax[@]}" -e ".[dev]"
"$venv/bin/pip" freeze --exclude-editable | grep -v '^#' > "$out"
echo "$out: jax $(grep -i '^jax==' "$out" | cut -d= -f3), $(wc -l < "$out") packages"
