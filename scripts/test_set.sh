#!/usr/bin/env bash
# CI's release sets beside the lock, each in its own virtual environment .venv-<set> (made once, reused):
#   oldest  the oldest supported releases (requirements/oldest.txt, installed over the lock): the model, ALVTS
#           and Triton tests must pass; a failure fails this script.
#   newest  the newest transformers and Triton the package registry offers at run time, even past the cap in
#           pyproject.toml: the same tests, run as a report that names the releases and what broke. It never
#           fails (exit 0): it tells the team of the next break before a user meets it.
# Usage: bash scripts/test_set.sh oldest|newest [pytest arguments]
set -euo pipefail
name="${1:-}"
case "$name" in
  oldest | newest) shift ;;
  *) echo "usage: bash scripts/test_set.sh oldest|newest [pytest arguments]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
export VTPRUNE_VENV=".venv-$name" VTPRUNE_BUILD_CUDA=0 TRITON_INTERPRET=1 PIP_DISABLE_PIP_VERSION_CHECK=1
tests=(tests/models tests/alvts tests/triton tests/ops)
versions='import torch, transformers, triton; print(f"torch {torch.__version__}, transformers {transformers.__version__}, triton {triton.__version__}")'

if [ "$name" = oldest ]; then
  source scripts/env.sh
  want="$(cat requirements/lock.txt requirements/oldest.txt | sha1sum | cut -d' ' -f1)"
  if [ "$(cat "$VTPRUNE_VENV/.vtprune-set" 2>/dev/null)" != "$want" ]; then
    python -m pip install -q -r requirements/oldest.txt
    echo "$want" > "$VTPRUNE_VENV/.vtprune-set"
  fi
  echo "oldest supported set: $(python -c "$versions")"
  exec python -m pytest -q -n "${PYTEST_WORKERS:-2}" -p no:cacheprovider "${tests[@]}" "$@"
fi

# newest: a report, never a failure
if ! (source scripts/env.sh && python -m pip install -q -U transformers triton); then
  echo "newest-release report: could not install the newest transformers/triton (registry unreachable?); nothing tested"
  exit 0
fi
# shellcheck disable=SC1091
. "$VTPRUNE_VENV/bin/activate"
releases="$(python -c "$versions" 2>&1 | tail -n 1)"
log="$VTPRUNE_VENV/newest-report.log"
set +e
python -m pytest -q -n "${PYTEST_WORKERS:-2}" -p no:cacheprovider -rfE "${tests[@]}" "$@" > "$log" 2>&1
rc=$?
set -e
summary="$( (grep -E '(passed|failed|error).* in [0-9.]+s' "$log" || true) | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//')"
if [ "$rc" -eq 0 ]; then
  echo "newest-release report: $releases: all model, ALVTS and Triton tests pass (${summary:-no summary})"
else
  echo "newest-release report: $releases: BROKEN (pytest exit $rc; ${summary:-no summary}). What broke:"
  (grep -E '^(FAILED|ERROR) ' "$log" || true) | head -n 50 | cut -c1-300 | sed 's/^/  /'
  echo "  (full log in $log; the cap in pyproject.toml keeps users on the tested releases)"
fi
exit 0
