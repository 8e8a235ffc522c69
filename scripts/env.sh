# Sourced by scripts/demo.sh, scripts/test.sh and scripts/test_set.sh: make (once) and activate a virtual
# environment with the locked package set (and the evaluation set, requirements/eval.txt), and vtprune installed
# editable into it.
#
# VTPRUNE_VENV (default .venv) names the environment. It gets exactly requirements/lock.txt (the set CI last
# passed with: torch, triton, transformers, the test and build tools), so a fresh machine reproduces a
# known-good set whatever is released tomorrow; then vtprune itself, editable, built without isolation against
# the locked build tools. Each step is redone only when its inputs change, so a release you install by hand
# into the environment (`pip install -U transformers triton`) stays until the lock file itself changes.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
venv="${VTPRUNE_VENV:-.venv}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1090,SC1091
. "$venv/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
stamp_of() { sha1sum | cut -d' ' -f1; }
lock_want="$(stamp_of < requirements/lock.txt)"
if [ "$(cat "$venv/.vtprune-lock" 2>/dev/null)" != "$lock_want" ]; then
  python -m pip install -q -r requirements/lock.txt
  echo "$lock_want" > "$venv/.vtprune-lock"
  rm -f "$venv/.vtprune-build"
fi
# The evaluation set (lmms-eval and what its core imports), without dependencies: the locked torch stays.
eval_want="$(stamp_of < requirements/eval.txt)"
if [ "$(cat "$venv/.vtprune-eval" 2>/dev/null)" != "$eval_want" ]; then
  python -m pip install -q --no-deps -r requirements/eval.txt
  echo "$eval_want" > "$venv/.vtprune-eval"
fi
build_want="$( (cat pyproject.toml setup.py CMakeLists.txt; find csrc -type f | sort | xargs cat;
                echo "cuda=${VTPRUNE_BUILD_CUDA:-}") | stamp_of)"
if [ "$(cat "$venv/.vtprune-build" 2>/dev/null)" != "$build_want" ] || ! python -c "import vtprune" 2>/dev/null; then
  python -m pip install -q --no-deps --no-build-isolation -e .
  echo "$build_want" > "$venv/.vtprune-build"
fi
