#!/usr/bin/env bash
# One call on a lent GPU machine (see /work/.library/device/README.md): build the CUDA extension, run the
# GPU tests (with compute-sanitizer where it works) and the benchmarks, and leave logs and JSON results
# under $OUT. Usage from the device tool:  bash benchmarks/gpu_session.sh [quick]
# Copy $OUT/*.json back into benchmarks/results/ and commit them with the test log.
set -uo pipefail
# The device returns at most 8 files from $OUT: everything is written to a work folder and packed into
# $OUT/gpu_run.tgz at the end (plus the test log on its own, for a quick look).
FINAL="${OUT:-/tmp/vtprune-out}"
OUT="$(mktemp -d)"
mkdir -p "$FINAL"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
{
  nvidia-smi -L; python3 -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)"
  git rev-parse --short HEAD 2>/dev/null
} 2>&1 | tee "$OUT/env.log"
time (VTPRUNE_BUILD_CUDA=1 python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -5) 2>&1 | tee "$OUT/build.log"
python3 -m pytest -q -m gpu tests -x -ra 2>&1 | tee "$OUT/gpu_tests.log" | tail -30
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 3 python3 -m pytest -q -m gpu tests/gpu -k "cuda and not slow" -x \
      2>&1 | tail -20 > "$OUT/sanitizer_$tool.log"
    echo "compute-sanitizer $tool: exit ${PIPESTATUS[0]}" | tee -a "$OUT/sanitizer_$tool.log"
  done
fi
for b in benchmarks/bench_*.py; do
  python3 "$b" --device cuda ${1:+--quick} --out "$OUT" 2>&1 | tee "$OUT/$(basename "$b" .py).log" | tail -40
done
ls -la "$OUT"
tar czf "$FINAL/gpu_run.tgz" -C "$OUT" .
cp "$OUT/gpu_tests.log" "$FINAL/"
