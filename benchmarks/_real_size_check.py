"""The dry run's accounting against an independent count (``real_size.py --check tiny|mid``).

The same workload as the dry run (:func:`_real_size_run.run_phases`: inversion, plain sampling, the PnP edit,
through the pack's nodes) runs on the CPU with real tensors and a real random-weight SD1.5-layout UNet
(``models.make_unet``), under the dry run's :class:`_real_size_track.MemoryTracker` and under
``torch.profiler`` with ``profile_memory=True``. The profiler records every allocation and free of PyTorch's CPU
allocator; the peak of their running sum is the independent count. Both counts start at zero when the workload
starts (the model and inputs already exist), so the comparison is of what the run itself allocates: here the CPU
is the device, and the tracker's device peak is its ``cpu`` peak.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

import models
from _real_size_run import Workload, run_phases
from _real_size_track import MemoryTracker

MEMORY_EVENT = "[memory]"
# (frames, frame size in pixels, steps per phase) of each check size; the model is models.make_unet(size).
SIZES = {"tiny": (4, 128, 2), "mid": (8, 256, 2)}
log = logging.getLogger(__name__)


@dataclass
class AccountingCheck:
    size: str
    tracker_peak: int
    profiler_peak: int

    @property
    def difference(self) -> float:
        """|tracker - profiler| / profiler."""
        return abs(self.tracker_peak - self.profiler_peak) / max(self.profiler_peak, 1)


def _profiler_peak(prof: profile) -> int:
    """The peak of the running sum of the CPU allocator's events (allocations positive, frees negative)."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == MEMORY_EVENT]
    running = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        if event.device_type() != torch.autograd.DeviceType.CPU:
            continue
        running += event.nbytes()
        peak = max(peak, running)
    return peak


def _conditioning(context: int, seed: int) -> list:
    return [[torch.randn(1, 77, context, generator=torch.Generator().manual_seed(seed)), {}]]


def accounting_check(size: str) -> AccountingCheck:
    frames, pixels, steps = SIZES[size]
    model = models.make_unet(size, "cpu")
    context = models.MODELS[size]["context_dim"]
    latent = torch.randn(frames, 4, pixels // 8, pixels // 8, generator=torch.Generator().manual_seed(0))
    work = Workload(model, latent, _conditioning(context, 1), _conditioning(context, 2), _conditioning(context, 3),
                    7.5, "pnp", False, steps)
    tracker = MemoryTracker()
    # What exists before the window is counted before it, as the dry run counts its weights when it builds them:
    # a view of a weight inside the run is then no new storage.
    for tensor in [*model.model.state_dict(keep_vars=True).values(), latent,
                   *(c[0] for c in work.source + work.positive + work.negative)]:
        tracker.track(tensor, "weights")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with tracker:
            start = tracker.live_bytes("cpu")
            run_phases(work, tracker)
            work.results.clear()  # the products die inside both counts' window
    tracker_peak = max(peaks["cpu"].bytes for peaks in tracker.peaks.values()) - start
    return AccountingCheck(size, tracker_peak, _profiler_peak(prof))
