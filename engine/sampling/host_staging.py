"""Device-to-host copies of the trajectory and the fields through one bounded, reused page-locked buffer.

A copy from the device into pageable host memory makes the host wait for the device; into page-locked memory it
does not, but PyTorch's caching host allocator keeps every page-locked block it ever handed out, so staging a
whole trajectory there (every kept step of every frame) leaves gigabytes locked for the rest of the process.
:class:`HostStaging` keeps one page-locked ring buffer of at most ``capacity`` bytes per run: each copy lands in
a slice of it without waiting, an event marks when that slice has landed, and the slice is moved into ordinary
host memory when the ring needs it again (waiting on that event only, never a full device synchronisation) or at
:meth:`HostStaging.finish`. Only devices whose copies may be asynchronous (``copies_async``: the host's rule)
and that have events (CUDA, ROCm) stage; everywhere else a copy is the ordinary blocking one.
"""
from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import torch

from ..patches.contract import copies_async

log = logging.getLogger(__name__)

CAPACITY_BYTES = 64 * 2**20  # the page-locked bytes one run may hold (two slices of 32 MiB in flight)
SMALLEST_BUFFER_BYTES = 2**16  # the ring's first size: small copies (fields) do not lock the whole capacity


@dataclass
class _Landing:
    start: int  # the slice of the ring the copy occupies
    stop: int
    event: object  # recorded after the copy on the current stream
    target: torch.Tensor  # the bytes of the pageable host tensor the slice belongs in


class HostStaging:
    """Host copies of device tensors for one run; a returned tensor holds its values once :meth:`finish` ran."""

    def __init__(self, capacity: int = CAPACITY_BYTES) -> None:
        self.capacity = max(2, capacity)
        self._buffer: torch.Tensor | None = None
        self._head = 0  # where the next slice starts
        self._landing: deque[_Landing] = deque()  # copies in flight, oldest first

    @staticmethod
    def stages(device: torch.device) -> bool:
        """Whether copies from ``device`` go through the page-locked ring (else they are ordinary blocking ones)."""
        return device.type == "cuda" and copies_async(device)

    def copy(self, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A host copy of ``tensor`` in ``dtype``: at once on the CPU, after :meth:`finish` on an asynchronous
        device (its copy is queued behind the work that computes ``tensor``; the host does not wait for it)."""
        dtype = dtype or tensor.dtype
        if not self.stages(tensor.device):
            return tensor.to(device="cpu", dtype=dtype, copy=True)
        host = torch.empty(tensor.shape, dtype=dtype)
        if host.numel() == 0:
            return host
        source = tensor.to(dtype).contiguous().reshape(-1).view(torch.uint8)
        target = host.reshape(-1).view(torch.uint8)
        piece = self.capacity // 2  # two slices in flight: one lands while the next is queued
        for begin in range(0, source.numel(), piece):
            end = min(begin + piece, source.numel())
            start = self._reserve(end - begin)
            self._buffer[start:start + end - begin].copy_(source[begin:end], non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(tensor.device))  # the stream a copy from that device runs on
            self._landing.append(_Landing(start, start + end - begin, event, target[begin:end]))
            self._head = start + end - begin
        return host

    def finish(self) -> None:
        """Wait for every queued copy and move it into its host tensor."""
        while self._landing:
            self._land_oldest()

    def _land_oldest(self) -> None:
        landing = self._landing.popleft()
        landing.event.synchronize()  # this copy only: later work on the device keeps running
        landing.target.copy_(self._buffer[landing.start:landing.stop])

    def _reserve(self, size: int) -> int:
        """The start of a free slice of ``size`` bytes in the ring, landing the oldest copies until there is one."""
        # Powers of two, as the caching host allocator rounds them: a later run reuses the block this one freed.
        wanted = min(self.capacity, 1 << (max(SMALLEST_BUFFER_BYTES, 2 * size) - 1).bit_length())
        if self._buffer is None or self._buffer.numel() < wanted:
            self.finish()  # the ring grows (at most to the capacity) only when nothing is in flight
            self._buffer = torch.empty(wanted, dtype=torch.uint8, pin_memory=True)
            self._head = 0
        while True:
            if not self._landing:
                self._head = 0
                return 0
            tail = self._landing[0].start
            if self._head > tail:  # the slices in flight are [tail, head): free after head, then before tail
                if self._buffer.numel() - self._head >= size:
                    return self._head
                if tail >= size:
                    return 0
            elif tail - self._head >= size:  # wrapped: the free bytes are [head, tail)
                return self._head
            self._land_oldest()
