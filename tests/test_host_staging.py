"""Host staging through one bounded page-locked ring (engine/sampling/host_staging.py).

This host has no CUDA driver, so the ring runs here on host tensors with CUDA's event and stream calls standing in
(a host copy has landed when it returns) and page-locking left out; what it checks is the ring's bookkeeping: no
slice is reused before its copy has moved on, every copy arrives whole, and the locked bytes stay within the
capacity however much is staged. The bytes a real run locks are measured by the dry run (tests/test_real_size.py).
"""
from __future__ import annotations

import torch

import comfy.model_management
from comfyui_tokenflow.engine.sampling import host_staging
from comfyui_tokenflow.engine.sampling.host_staging import HostStaging


class _Event:
    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass


def _ring_on_the_host(monkeypatch) -> list[int]:
    """Stage as a CUDA device would, on host tensors; returns the sizes of the page-locked buffers allocated."""
    allocated: list[int] = []
    real_empty = torch.empty

    def empty(*args, pin_memory=False, **kwargs):
        out = real_empty(*args, **kwargs)
        if pin_memory:
            allocated.append(out.numel() * out.element_size())
        return out

    monkeypatch.setattr(HostStaging, "stages", staticmethod(lambda device: True))
    monkeypatch.setattr(host_staging.torch, "empty", empty)
    monkeypatch.setattr(host_staging.torch.cuda, "Event", _Event)
    monkeypatch.setattr(host_staging.torch.cuda, "current_stream", lambda device=None: None)
    return allocated


def test_every_staged_copy_arrives_whole_through_a_ring_smaller_than_the_copies(monkeypatch):
    allocated = _ring_on_the_host(monkeypatch)
    staging = HostStaging(capacity=4096)
    g = torch.Generator().manual_seed(0)
    sources = [torch.randn(n, generator=g) for n in (300, 7, 1500, 2, 999, 64, 4000, 1, 513)]  # 4-byte elements
    sources += [torch.randint(0, 2**15, (n, 2), generator=g, dtype=torch.int16) for n in (100, 900, 3)]
    copies = [staging.copy(s, torch.float32 if s.is_floating_point() else torch.int16) for s in sources]
    staging.finish()
    for source, copy in zip(sources, copies):
        assert copy.dtype == source.dtype and torch.equal(copy, source)
    assert max(allocated) <= 4096 and sum(allocated) <= 2 * 4096, allocated  # the ring grows in powers of two


def test_a_long_trajectory_keeps_at_most_the_capacity_locked(monkeypatch):
    allocated = _ring_on_the_host(monkeypatch)
    staging = HostStaging(capacity=2**16)
    step = torch.ones(40, 16, 8, 8)  # 160 KiB of float32 per step: every step is staged in pieces
    saved = [staging.copy(step * i, torch.float32) for i in range(50)]
    staging.finish()
    assert all(torch.equal(s, step * i) for i, s in enumerate(saved))
    assert sum(allocated) <= 2**16, allocated  # 50 x 160 KiB staged through 64 KiB


def test_devices_without_asynchronous_copies_copy_as_before(monkeypatch):
    x = torch.arange(6, dtype=torch.float64).reshape(2, 3)
    assert not HostStaging.stages(torch.device("cpu"))
    monkeypatch.setattr(comfy.model_management, "device_supports_non_blocking", lambda device: False)
    assert not HostStaging.stages(torch.device("cuda", 0))  # e.g. --deterministic: ComfyUI's blocking copies
    monkeypatch.setattr(comfy.model_management, "device_supports_non_blocking", lambda device: True)
    assert HostStaging.stages(torch.device("cuda", 0))
    copy = HostStaging().copy(x, torch.float32)
    assert copy.dtype == torch.float32 and torch.equal(copy, x.float()) and copy.data_ptr() != x.data_ptr()
