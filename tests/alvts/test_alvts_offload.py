"""ALVTS on a model offloaded by accelerate (weights on the ``meta`` device, loaded by hooks around each forward).

Before: the SVD factors were built from the meta weights and the first routed layer failed ("factors on the
meta device"). The offloaded model must route exactly as the same model held in memory.
"""

import copy

import pytest
import torch

import vtprune
from vtprune.alvts.factors import init_factors, model_fingerprint
from vtprune.methods.alvts import ALVTS
from vtprune.models import _tiny

accelerate = pytest.importorskip("accelerate")


def _offload(model, how: str, tmp_path):
    if how == "cpu":
        accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    else:
        accelerate.disk_offload(model, str(tmp_path / "offload"), execution_device=torch.device("cpu"))
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.device.type == "meta"
    return model


@pytest.mark.parametrize("how", ["cpu", "disk"])
def test_offloaded_model_routes_as_the_resident_one(how, tmp_path):
    resident = _tiny.tiny_llava(seed=1)
    batch = _tiny.tiny_inputs(resident, (3, 9), (6, 2), seed=2)
    offloaded = _offload(copy.deepcopy(resident), how, tmp_path)
    with torch.no_grad():
        with vtprune.apply(resident, ALVTS(keep=8, backend="reference")) as h:
            want = resident.generate(**batch, max_new_tokens=4, do_sample=False)
            want_rows = h.stats.visual_tokens_per_row
        with vtprune.apply(offloaded, ALVTS(keep=8, backend="reference")) as h:
            got = offloaded.generate(**batch, max_new_tokens=4, do_sample=False)
            got_rows = h.stats.visual_tokens_per_row
    assert torch.equal(want, got)
    assert got_rows == want_rows
    assert min(min(r) for r in got_rows) < max(max(r) for r in got_rows)  # it did route fewer tokens somewhere


def test_offloaded_factors_and_fingerprint_equal_the_resident_ones(tmp_path):
    resident = _tiny.tiny_llava(seed=1)
    offloaded = _offload(copy.deepcopy(resident), "cpu", tmp_path)
    lm_r, lm_o = resident.model.language_model, offloaded.model.language_model
    assert model_fingerprint(lm_o) == model_fingerprint(lm_r)
    assert model_fingerprint(lm_o)["weight_sample"] is not None  # the sample was read, not skipped
    fr, fo = init_factors(lm_r, 4), init_factors(lm_o, 4)
    for i in range(fr.num_layers):
        torch.testing.assert_close(fo[i], fr[i], rtol=0, atol=0)
    # reading the weights put them back: still offloaded afterwards
    assert lm_o.layers[0].self_attn.q_proj.weight.device.type == "meta"
    # a factors file saved from the resident model is accepted by the offloaded one (fingerprints agree)
    path = tmp_path / "f.safetensors"
    fr.save(path)
    ALVTS(keep=8, factors=str(path)).prepare(lm_o)


def test_meta_weights_without_an_offload_hook_are_refused_clearly():
    with torch.device("meta"):
        model = _tiny.tiny_llava()
    with pytest.raises(ValueError, match="meta device.*factors="):
        init_factors(model.model.language_model, 4)
