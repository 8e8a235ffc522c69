"""The sync-counting harness (vtprune.testing.syncs) counts what would synchronise a CUDA device, and only that."""

import pytest
import torch

from vtprune.testing.syncs import DEVICE, DeviceTensor, SyncCounter, SyncError, on_device, to_device, to_host


def _count(fn, *args):
    with SyncCounter(launches="skip") as c:
        fn(*args)
    return c


@pytest.mark.parametrize("name, fn, kind", [
    ("item", lambda x: x.sum().item(), "item"),
    ("int", lambda x: int(x[0]), "item"),
    ("float", lambda x: float(x.max()), "item"),
    ("bool", lambda x: bool((x > 2).any()), "item"),
    ("if", lambda x: 1 if x.sum() else 0, "item"),
    ("equal", lambda x: torch.equal(x, x), "item"),
    ("tolist", lambda x: x.tolist(), "tolist"),
    ("cpu", lambda x: x.cpu(), "d2h copy"),
    ("to cpu", lambda x: x.to("cpu", non_blocking=True), "d2h copy"),
    ("copy_ to host", lambda x: torch.empty(6).copy_(x), "d2h copy"),
    ("nonzero", lambda x: torch.nonzero(x), "data-dependent size"),
    ("argwhere", lambda x: torch.argwhere(x > 1), "data-dependent size"),
    ("bool mask read", lambda x: x[x > 2], "data-dependent size"),
    ("bool mask write", lambda x: x.clone().__setitem__(x > 2, 0.0), "data-dependent size"),
    ("masked_select", lambda x: x.masked_select(x > 2), "data-dependent size"),
    ("unique", lambda x: torch.unique(x), "data-dependent size"),
    ("repeat_interleave", lambda x: torch.repeat_interleave(x.long()), "data-dependent size"),
    ("pageable h2d", lambda x: torch.arange(3).to(x.device), "pageable h2d copy"),
    ("pageable non_blocking", lambda x: torch.arange(3).to(x.device, non_blocking=True), "pageable h2d copy"),
    ("pinned but blocking", lambda x: torch.arange(3).pin_memory().to(x.device), "pageable h2d copy"),
    ("torch.tensor", lambda x: torch.tensor([1, 2], device=x.device), "pageable h2d copy"),
    ("host index", lambda x: x[torch.tensor([0, 2])], "pageable h2d copy"),
])
def test_each_sync_kind_counts_once(name, fn, kind):
    c = _count(fn, to_device(torch.arange(6.0)))
    assert [s.kind for s in c.syncs] == [kind], c.report()


@pytest.mark.parametrize("name, fn", [
    ("arithmetic and reductions", lambda x: (x * 2 + 1).sum(0).softmax(0)),
    ("factory on the device", lambda x: torch.zeros(3, device=x.device) + torch.arange(3, device=x.device)),
    ("pinned non_blocking", lambda x: torch.arange(3).pin_memory().to(x.device, non_blocking=True)),
    ("pinned staging buffer", lambda x: torch.empty(3, dtype=torch.int64, pin_memory=True).copy_(torch.arange(3))
     .to(x.device, non_blocking=True)),
    ("device index", lambda x: x[torch.arange(2, device=x.device)]),
    ("repeat_interleave with output_size", lambda x: torch.repeat_interleave(x, x.long(), output_size=15)),
    ("host scalar operand", lambda x: x * torch.tensor(2.0)),
    ("topk, sort, gather", lambda x: x.gather(0, x.topk(2).indices.sort().values)),
    ("device-side assert", lambda x: torch._assert_async((x >= 0).all())),
    ("empty torch.tensor", lambda x: torch.tensor([], device=x.device)),
    ("shape reads", lambda x: (x.shape[0], x.numel(), x.dim(), x.stride())),
])
def test_sync_free_code_counts_zero(name, fn):
    c = _count(fn, to_device(torch.arange(6.0)))
    assert c.count == 0, c.report()


def test_results_are_real_values_on_the_simulated_device():
    x = torch.randn(4, 5)
    with SyncCounter() as c:
        y = to_device(x).softmax(-1) @ to_device(x).T
        host = y.cpu()
    assert isinstance(y, DeviceTensor) and y.device == DEVICE
    torch.testing.assert_close(host, x.softmax(-1) @ x.T)
    torch.testing.assert_close(to_host(y), host)
    assert c.count == 1  # the .cpu()


def test_report_names_the_call_site_and_assert_fails():
    x = to_device(torch.arange(6.0))

    def hot_path(t):
        return t * t.sum().item()  # the sync the harness must find

    with SyncCounter() as c:
        hot_path(x)
        hot_path(x)
    assert c.count == 2
    ((kind, site), n), = c.by_site().items()
    assert (kind, n) == ("item", 2) and "test_sync_harness.py" in site and "hot_path" in site
    with pytest.raises(SyncError, match=r"(?s)synchronised 2 times \(allowed 0\).*hot_path"):
        c.assert_at_most(0)
    c.assert_at_most(2)


def test_mixing_device_and_host_tensors_is_an_error_as_on_cuda():
    with SyncCounter(), pytest.raises(RuntimeError, match="mixes device tensors with a host tensor"):
        to_device(torch.ones(3)) + torch.ones(3)


def test_on_device_moves_a_module_and_restores_it():
    m = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).eval()
    x = torch.randn(2, 4)
    ref = m(x)
    weight = m[0].weight
    with on_device(m), SyncCounter() as c:
        assert isinstance(m[0].weight, DeviceTensor) and isinstance(m[1].running_mean, DeviceTensor)
        out = m(to_device(x))
    assert c.count == 0, c.report()
    torch.testing.assert_close(to_host(out), ref)
    assert m[0].weight is weight and not isinstance(m[1].running_mean, DeviceTensor)
