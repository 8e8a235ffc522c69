"""Test configuration: the ``gpu`` marker skips (with a reason) when no CUDA device is visible."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # so tests can `import utils`

# Without a GPU, Triton kernels can only run through the interpreter; set it before any kernel module is
# imported so a plain `pytest` behaves like the README's test command.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none visible); benchmarks/gpu_session.sh runs these")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
