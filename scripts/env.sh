# Sourced by scripts/demo.sh and scripts/test.sh: make (once) and activate the project's virtual environment.
#
# .venv in the repository root; torch==2.13.0 (the local CPU build on the project machines) is installed
# first when the environment has no torch, so pip never pulls a multi-gigabyte CUDA build by accident; then
# vtprune itself, editable, with its test extras. The install is redone only when the build inputs change.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==2.13.0"
fi
stamp=.venv/.vtprune-build
want="$( (cat pyproject.toml setup.py CMakeLists.txt; find csrc -type f | sort | xargs cat; echo "cuda=${VTPRUNE_BUILD_CUDA:-}") | sha1sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || ! python -c "import vtprune" 2>/dev/null; then
  python -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi
