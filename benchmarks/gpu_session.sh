#!/usr/bin/env bash
# One run on a GPU machine with torch, triton, transformers and the CUDA toolkit preinstalled: build the CUDA
# extension, run the GPU tests (with compute-sanitizer where it works) and the benchmarks, and leave logs and
# JSON results under $OUT (default: a temporary folder). Each stage fits in about 10 minutes:
#   bash benchmarks/gpu_session.sh ops            build, GPU tests, sanitizers, the two op benchmarks
#   bash benchmarks/gpu_session.sh e2e MODEL      the end-to-end benchmark of one model (llava15_7b,
#                                                 llava_next_7b, qwen25vl_7b, qwen25vl_3b); builds first
# Unpack $OUT/gpu_run.tgz into benchmarks/results/ and commit the JSON files with the test log.
set -uo pipefail
# Everything is written to a work folder and packed into one archive, $OUT/gpu_run.tgz, at the end (plus the
# test log on its own, for a quick look), so a remote run has few files to copy back.
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
stage="${1:-ops}"
if [ "$stage" = e2e ]; then
  python3 benchmarks/bench_e2e.py --device cuda --models "${2:?e2e needs a model name}" --out "$OUT" 2>&1 \
    | tee "$OUT/bench_e2e_$2.log" | tail -40
  tar czf "$FINAL/gpu_run.tgz" -C "$OUT" .
  exit 0
fi
python3 -m pytest -q -m gpu tests -x -ra 2>&1 | tee "$OUT/gpu_tests.log" | tail -30
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    compute-sanitizer --tool "$tool" --error-exitcode 3 python3 -m pytest -q -m gpu tests/gpu -k "cuda and not slow" -x \
      2>&1 | tail -20 > "$OUT/sanitizer_$tool.log"
    echo "compute-sanitizer $tool: exit ${PIPESTATUS[0]}" | tee -a "$OUT/sanitizer_$tool.log"
  done
fi
for b in benchmarks/bench_visiondrop_ops.py benchmarks/bench_alvts_ops.py; do
  python3 "$b" --device cuda --out "$OUT" 2>&1 | tee "$OUT/$(basename "$b" .py).log" | tail -40
done
ls -la "$OUT"
tar czf "$FINAL/gpu_run.tgz" -C "$OUT" .
cp "$OUT/gpu_tests.log" "$FINAL/"
