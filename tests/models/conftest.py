import pytest
import torch

from vtprune.models._tiny import tiny_inputs, tiny_llava


@pytest.fixture(scope="module")
def llava():
    return tiny_llava()


@pytest.fixture
def inputs(llava):
    return tiny_inputs(llava, (3,), (5,))


@pytest.fixture
def batch(llava):
    """Two different prompts of different lengths, left-padded."""
    out = tiny_inputs(llava, (3, 7), (6, 4), seed=1)
    assert not out["attention_mask"].all()  # row 0 really is padded
    return out


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield
