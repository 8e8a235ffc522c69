#!/usr/bin/env bash
# The test job: set up the environment, lint (ruff, clang-format on csrc/), then the whole test suite.
# Triton kernels run on the CPU through the interpreter unless TRITON_INTERPRET is set otherwise; tests
# marked `gpu` skip (with a reason) when no CUDA device is visible. Extra arguments go to pytest.
source "$(dirname "$0")/env.sh"
export TRITON_INTERPRET="${TRITON_INTERPRET:-1}"
ruff check .
if [ -d csrc ]; then
  find csrc -name '*.cu' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.h' | xargs -r clang-format --dry-run --Werror
fi
python -c "import torch, transformers, triton, vtprune, vtprune.triton_kernels; print('vtprune', vtprune.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, '| triton', triton.__version__, '| CUDA extension built:', __import__('vtprune._ext', fromlist=['x']).extension_available())"
# pytest exits 5 when it collected no test: that fails this script too (set -e).
python -m pytest -n "${PYTEST_WORKERS:-2}" -ra "$@"
