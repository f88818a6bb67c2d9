"""The keyframe bank in host memory, brought to the device block by block for each call.

When the planner puts the bank in host memory (:mod:`..plan.memory_plan`), every record the keyframe pass makes (a
block's keyframe outputs, its source tokens) is copied off the device as it is made, and a propagation call reads
each block's record from one of a few rotating device buffers (:data:`SLOTS`): while a block computes, the next
block's record is already on its way on a side stream (the order of the reads is learnt from the calls before: the
same model reads its blocks in the same order). Host copies are pinned where the device copies asynchronously
(``contract.copies_async``); without a side stream (the CPU, MPS) the same code runs synchronously. Nothing here
waits for the device on the host: streams wait for streams, and the host memory of a pinned copy is read only by
copies queued after it. The bytes moved are counted per step for the run's record.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Hashable

import torch

from .contract import copies_async

SLOTS = 3  # the block in use, the next prefetched, a mispredicted prefetch (memory_plan.STAGING_SLOTS)


class HostBank:
    """Host copies of a step's keyframe records and the device buffers they come back through."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # Page-locked copies and a side stream need a CUDA runtime (not the dry run's fake device) that copies
        # asynchronously (not under --deterministic); elsewhere the same code runs synchronously.
        self.pinned = device.type == "cuda" and torch.cuda.is_available() and copies_async(device)
        self.stream = torch.cuda.Stream(device) if self.pinned else None
        self.slots: list[torch.Tensor | None] = [None] * SLOTS
        self.next_slot = 0
        self.successor: dict[Hashable, Hashable] = {}  # the record read after each one, learnt from the calls
        self.last: Hashable | None = None
        self.pending: tuple[Hashable, torch.Tensor, object] | None = None
        self.moved = 0  # bytes moved between host and device this step

    # -- the keyframe pass: off the device --------------------------------------------------------------------
    def keep(self, tensor: torch.Tensor) -> torch.Tensor:
        """A host copy of ``tensor`` (queued after the work that made it; pinned where copies are asynchronous)."""
        host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=self.pinned)
        host.copy_(tensor, non_blocking=self.pinned)
        self.moved += host.nbytes
        return host

    # -- propagation: back to the device, block by block ------------------------------------------------------
    def fetch(self, key: Hashable, parts: list[torch.Tensor], resolve: Callable[[Hashable], list | None]
              ) -> torch.Tensor:
        """The record ``key`` on the device (its host ``parts`` joined along the rows), valid until two more records
        are fetched; the record that followed it last time starts on its way (``resolve``: its host parts)."""
        if self.pending is not None and self.pending[0] == key:
            _, tensor, event = self.pending
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
        else:
            tensor, _ = self._to_device(parts, None)
        self.pending = None
        if self.last is not None:
            self.successor[self.last] = key
        self.last = key
        following = self.successor.get(key)
        following_parts = resolve(following) if following is not None else None
        if following_parts:
            self.pending = (following, *self._to_device(following_parts, self.stream))
        return tensor

    def _to_device(self, parts: list[torch.Tensor], stream) -> tuple[torch.Tensor, object]:
        rows = sum(p.shape[0] for p in parts)
        shape, dtype = (rows, *parts[0].shape[1:]), parts[0].dtype
        nbytes = rows * parts[0][:1].numel() * parts[0].element_size()
        slot = self.slots[self.next_slot]
        if slot is None or slot.numel() < nbytes:
            slot = self.slots[self.next_slot] = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        self.next_slot = (self.next_slot + 1) % SLOTS
        out = slot[:nbytes].view(dtype).view(shape)
        if stream is not None:  # after everything queued so far: the reads of this buffer's last record included
            stream.wait_stream(torch.cuda.current_stream(self.device))
        elif self.stream is not None:  # a copy on the compute stream: after a prefetch not read (into this buffer)
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            row = 0
            for part in parts:  # a block's calls of the keyframe pass: at most one per branch
                out[row:row + part.shape[0]].copy_(part, non_blocking=self.pinned)
                row += part.shape[0]
            event = stream.record_event() if stream is not None else None
        if stream is not None:
            slot.record_stream(stream)
        self.moved += nbytes
        return out, event

    def finish_step(self) -> int:
        """The bytes moved this step; the next step starts with nothing in flight."""
        moved, self.moved, self.pending, self.last = self.moved, 0, None, None
        return moved

    def release(self) -> None:
        """Drop the device buffers (the compute stream waits for the side stream's last copy first)."""
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self.slots = [None] * SLOTS
        self.pending = None
