#!/usr/bin/env bash
# The model-integration tests again on the oldest supported transformers (5.17, the version on the lent GPU
# machines), in a separate virtual environment .venv-tf517 (made once, reused). Run by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x .venv-tf517/bin/python ]; then
  python3 -m venv .venv-tf517
fi
py=.venv-tf517/bin/python
if ! "$py" -c "import transformers, sys; sys.exit(transformers.__version__ != '5.17.0')" 2>/dev/null; then
  "$py" -m pip install -q "torch==2.13.0" "transformers==5.17.0" numpy safetensors tqdm pillow pytest pytest-xdist \
    hypothesis "triton==3.6.*"
fi
VTPRUNE_BUILD_CUDA=0 "$py" -m pip install -q --no-deps -e .
"$py" -c "import transformers; print('transformers', transformers.__version__)"
TRITON_INTERPRET=1 "$py" -m pytest -q -n "${PYTEST_WORKERS:-2}" tests/models tests/alvts
