"""Host-to-device copies follow the host's rule for asynchronous copies (``device_supports_non_blocking``):
ComfyUI turns them off for MPS, Intel XPU, DirectML and ``--deterministic``, and so must the pack."""
from __future__ import annotations

import torch

import comfy.model_management
from comfyui_tokenflow.engine.patches import contract as transfer


def test_copies_are_asynchronous_only_where_the_host_allows(monkeypatch):
    seen = []
    real_to = torch.Tensor.to

    def recording_to(self, *args, **kwargs):
        seen.append(kwargs.get("non_blocking"))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recording_to)
    x = torch.arange(4)
    monkeypatch.setattr(comfy.model_management, "device_supports_non_blocking", lambda device: False)
    assert not transfer.copies_async("cpu") and torch.equal(transfer.to_device(x, "cpu"), x)
    monkeypatch.setattr(comfy.model_management, "device_supports_non_blocking", lambda device: True)
    assert transfer.copies_async("cpu") and transfer.to_device(x, "cpu", torch.float64).dtype == torch.float64
    assert seen == [False, True]


def test_no_hot_path_copy_hard_codes_non_blocking():
    """Every asynchronous copy of the engine goes through the host's rule (the page-locked host staging asks it
    itself: ``HostStaging.stages``)."""
    from pathlib import Path

    engine = Path(__file__).resolve().parents[1] / "engine"
    offenders = [f"{path.relative_to(engine)}:{n}" for path in engine.rglob("*.py")
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if "non_blocking=True" in line and path.name != "host_staging.py"]
    assert not offenders
