"""Replay of repeated model calls in the real-size dry run: a call layout seen to keep nothing is not run again.

On fake tensors a model call costs the dispatch of every op whatever the frame size, so a dry run's time is its
number of calls; where memory is tight the pack splits a phase into many equal calls (Flux-dev bf16 1024² on a
24 GB card inverts 40 one-frame chunks, up to 3 evaluations each per step). Every such call makes the same ops on
the same shapes, so its memory is known from one that ran.

:class:`CallReplay` wraps the diffusion model's ``forward`` (the module's own hooks still run). Each call gets a
layout key: the phase, the shapes, dtypes and devices of the tensors it is given, the cond order, and what the
pack's pass says of the call (its phase, frames, keyframes, injections, where the step's keyframe bank lives and
the shapes of its records). A call of a key runs for
real and is watched: its device and host peak above the bytes live at its start (with the holder breakdown) and
what it leaves behind. A call is *pure* when it leaves nothing but its output (on both devices). After
:data:`CHECKED_RUNS` consecutive pure runs (the first run of a key may keep something: a host bank's device buffers
or a cache that later calls reuse) of a key with equal peaks and equal keyframe-bank bytes moved between
host and device (``HostBank.moved``: a propagation call reading a bank kept in host memory), later calls of that key
are replayed: the tracker is given the recorded peak on top of what is live now, the host bank is credited the
recorded bytes, and the call returns a new tensor with the recorded output's layout (same storage size, strides and
offset), allocated as the call would allocate it. A later impure run (it filled a bank, a recorder) marks its key
as never replayed. Calls made while FLOPs are being counted always run (the counter must see their ops).
"""
from __future__ import annotations

import logging
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from _real_size_track import MemoryTracker, leaves

log = logging.getLogger(__name__)

CHECKED_RUNS = 2  # pure runs with equal peaks before a layout is replayed (the first may fill a host cache)
DEVICES = ("cuda", "cpu")
_PASS_FIELDS = ("phase", "source_index", "pnp_attention", "pnp_residual", "stop_after_residuals", "keyframes",
                "key", "image_tokens")


@dataclass
class CallWatch:
    """The bytes live at a call's start and the high-water mark during it, per device (with the holders then)."""

    start: dict[str, int]
    start_live: dict[str, dict[str, int]]
    peak: dict[str, int] = field(default_factory=dict)
    peak_live: dict[str, dict[str, int]] = field(default_factory=dict)

    def deltas(self) -> dict[str, tuple[int, dict[str, int]]]:
        """Per device: (peak above the start, holder changes at that peak)."""
        out = {}
        for device in DEVICES:
            live = self.peak_live.get(device, self.start_live[device])
            holders = {h: live.get(h, 0) - self.start_live[device].get(h, 0)
                       for h in set(live) | set(self.start_live[device])}
            out[device] = (self.peak.get(device, self.start[device]) - self.start[device],
                           {h: v for h, v in holders.items() if v})
        return out


@dataclass
class Layout:
    """What the runs of one call layout showed."""

    runs: int = 0
    pure_runs: int = 0
    never: bool = False
    deltas: dict | None = None
    output: tuple | None = None  # (shape, stride, storage_offset, storage elements, dtype, device)
    moved: dict | None = None  # host bank -> bytes the call moved between host and device (weak keys)
    replayed: int = 0


def _describe(value) -> object:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device.type)
    return type(value).__name__  # a timestep or strength: the same ops whatever its value


def _pass_of(transformer_options: dict):
    for value in transformer_options.values():
        if type(value).__name__ == "PassContext":
            return value
    return None


def _bank_layout(bank) -> tuple:
    """What a call reads from the step's keyframe bank, as shapes: where it lives and the rows of each record (a
    step's bank differs from the last one's in values only, when its keyframes are as many)."""
    if bank is None:
        return ()
    outputs = tuple(sum(int(part[0].shape[0]) for part in parts) for parts in bank.keyframe_outputs.values())
    tokens = tuple(tuple(t.shape) for t in bank.keyframe_tokens.values())
    return (bank.host is None, outputs, tokens, len(bank.pnp_qk), len(bank.residuals), len(bank.fields))


def layout_key(phase: str, args: tuple, kwargs: dict) -> tuple:
    """The layout of a call: everything that decides which ops it makes on which shapes."""
    options = kwargs.get("transformer_options") or {}
    tensors = tuple(_describe(v) for v in leaves([a for a in args] + [v for k, v in sorted(kwargs.items())
                                                                         if k != "transformer_options"]))
    context = _pass_of(options)
    pass_facts = None
    if context is not None:
        pass_facts = tuple(repr(getattr(context, name, None)) for name in _PASS_FIELDS) + (
            _bank_layout(context.bank), tuple(context.frames.shape), context.pairing is None,
            context.field_provider is None, context.source_input is None)
    patches = tuple(sorted((k, tuple(sorted(v))) for k, v in (options.get("patches_replace") or {}).items()))
    return (phase, tensors, tuple(options.get("cond_or_uncond") or ()), patches, pass_facts)


class CallReplay:
    """Replays the diffusion model's repeated pure calls (see the module docstring); counts what it did."""

    def __init__(self, tracker: MemoryTracker, counting: Callable[[], bool],
                 forget: Callable[..., None] = lambda *tensors: None) -> None:
        self.tracker = tracker
        self.counting = counting  # True while FLOPs are counted
        # A stand-in output has no real values, as a result of fake weights has none: ``forget`` drops what the dry
        # run's small-value shadowing would keep for a new tensor (an empty one's garbage).
        self.forget = forget
        self.host_banks: weakref.WeakSet = weakref.WeakSet()  # the pack's keyframe banks in host memory
        self.layouts: dict[tuple, Layout] = {}
        self.ran = 0
        self.replayed = 0

    def _run_watched(self, forward, args, kwargs, layout: Layout):
        tracker = self.tracker
        moved_before = self.moved()
        watch = CallWatch(start={d: tracker.total[d] for d in DEVICES},
                          start_live={d: dict(tracker.live[d]) for d in DEVICES})
        tracker.watches.append(watch)
        try:
            out = forward(*args, **kwargs)
        finally:
            tracker.watches.remove(watch)
        self.ran += 1
        if layout.never:
            return out
        if not isinstance(out, torch.Tensor):
            layout.never = True
            return out
        moved = weakref.WeakKeyDictionary({bank: n - moved_before.get(bank, 0) for bank, n in self.moved().items()
                                          if n != moved_before.get(bank, 0)})
        storage = out.untyped_storage()
        out_bytes = {d: 0 for d in DEVICES}
        out_bytes["cuda" if out.device.type == "cuda" else "cpu"] = storage.nbytes()
        kept = {d: tracker.total[d] - watch.start[d] - out_bytes[d] for d in DEVICES}
        deltas = watch.deltas()
        shape = (tuple(out.shape), tuple(out.stride()), out.storage_offset(),
                 storage.nbytes() // out.element_size(), out.dtype, out.device)
        layout.runs += 1
        if any(kept.values()) and layout.runs == 1:
            return out  # a first call may fill what later calls reuse (a host bank's device buffers, a cache)
        if any(kept.values()) or (layout.pure_runs and (deltas != layout.deltas or shape != layout.output
                                                         or dict(moved) != dict(layout.moved))):
            layout.never = True
            log.info("replay: layout not replayed (kept %s, or runs differ)", kept)
            return out
        layout.pure_runs += 1
        layout.deltas, layout.output, layout.moved = deltas, shape, moved
        return out

    def _replay(self, layout: Layout) -> torch.Tensor:
        tracker = self.tracker
        for device, (rise, holders) in layout.deltas.items():
            tracker.note_peak(device, tracker.total[device] + rise,
                              {h: tracker.live[device].get(h, 0) + holders.get(h, 0)
                               for h in set(tracker.live[device]) | set(holders)})
        shape, stride, offset, elements, dtype, device = layout.output
        for bank, nbytes in list(layout.moved.items()):  # the host bank's transfers the call would make
            bank.moved += nbytes
        base = torch.empty(elements, dtype=dtype, device=device)  # allocated (and counted) as the call's output
        out = base.as_strided(shape, stride, offset)
        self.forget(base, out)
        layout.replayed += 1
        self.replayed += 1
        return out

    def moved(self) -> dict:
        """Keyframe-bank bytes each host bank has moved between host and device so far this step (``.moved``)."""
        return {bank: bank.moved for bank in list(self.host_banks)}

    @contextmanager
    def installed(self, diffusion_model: torch.nn.Module, host_bank_class: type):
        original = diffusion_model.forward
        original_init = host_bank_class.__init__

        def registering(bank, *args, **kwargs):
            original_init(bank, *args, **kwargs)
            self.host_banks.add(bank)

        def forward(*args, **kwargs):
            key = layout_key(self.tracker.phase, args, kwargs)
            layout = self.layouts.setdefault(key, Layout())
            if not layout.never and layout.pure_runs >= CHECKED_RUNS and not self.counting():
                return self._replay(layout)
            return self._run_watched(original, args, kwargs, layout)

        diffusion_model.forward = forward  # an instance attribute: nn.Module.__call__ still runs the hooks
        host_bank_class.__init__ = registering
        try:
            yield self
        finally:
            del diffusion_model.forward
            host_bank_class.__init__ = original_init

    def summary(self) -> str:
        never = sum(1 for layout in self.layouts.values() if layout.never)
        return (f"model calls: {self.ran} run, {self.replayed} replayed from {CHECKED_RUNS} checked pure runs of "
                f"their layout ({len(self.layouts)} layouts, {never} never replayed: they keep something)")
