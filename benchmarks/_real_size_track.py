"""Live device and host bytes at every allocation, by holder, for the real-size dry run (and its CPU check).

:class:`MemoryTracker` is a ``TorchDispatchMode``: every op's output storages that it has not seen are counted
live on their device (``cuda`` for fake device tensors, ``cpu`` for host ones) until the storage dies (a
``weakref.finalize`` on the untyped storage: PyTorch keeps a storage's Python object while the storage lives).
Each allocation is attributed to a holder by where it happens (the innermost frame of the pack, or ComfyUI's
loading, or a holder a caller names with :meth:`MemoryTracker.holder`):

- ``weights``: the model's parameters and ComfyUI's loading (``model_patcher``, ``model_management``);
- ``trajectory``: the inversion's saved latents (the pack's samplers' recorders, the inversion product);
- ``fields``: the extraction's correspondence fields (the extraction guider, the correspondences product);
- ``bank``: what the pack's step bank keeps between calls (tensors reachable from a ``StepBank``: re-tagged at every
  model call by :func:`retag`, whoever allocated them);
- ``controlnet``: ControlNet copies of keyframe subsets (the pack's ControlNet editor) and the ControlNet's run;
- ``staging``: page-locked host memory (the ring the trajectory and fields reach the host through);
- ``activations``: everything else (the model's forward, the sampler).
It keeps the peak of each device with the holder breakdown at that moment, per phase.
"""
from __future__ import annotations

import functools
import sys
import weakref
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Hashable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = str(Path(__file__).resolve().parents[1]) + "/"
HOLDERS = ("weights", "activations", "bank", "trajectory", "fields", "controlnet", "staging")

# The pack's modules (path under the repo) whose allocations belong to a holder other than activations.
_PACK_HOLDERS = (
    ("engine/ddpm/samplers.py", "trajectory"), ("engine/flow/samplers.py", "trajectory"),
    ("engine/sampling/extraction_guider.py", "fields"), ("engine/ddpm/extract.py", "fields"),
    ("engine/flow/extract.py", "fields"), ("tokenflow_ops/correspondence.py", "fields"),
    ("engine/editors/controlnet.py", "controlnet"),
)
_COMFY_HOLDERS = (("model_patcher.py", "weights"), ("model_management.py", "weights"), ("controlnet.py", "controlnet"),
                  ("cldm/", "controlnet"))


@functools.lru_cache(maxsize=None)
def _comfy_root() -> str:
    """The host's ``comfy`` package folder (ComfyUI's code; its venv's torch is elsewhere)."""
    import comfy.model_management  # comfy is a namespace package: no __file__ of its own

    return str(Path(comfy.model_management.__file__).parent) + "/"


def device_kind(tensor: torch.Tensor) -> str:
    """``cuda`` or ``cpu`` (a fake tensor's storage is on the meta device: its tensor's device is the one)."""
    return "cuda" if tensor.device.type == "cuda" else "cpu"


def leaves(value, out: list | None = None) -> list:
    """The leaves of an op's arguments or result (nested lists, tuples and dicts), as ``tree_flatten`` gives them
    for aten ops, without its per-node bookkeeping (it runs for every op of the dry run). A plain recursive
    function: a nested one that calls itself is a reference cycle, and the tensors in its list would stay alive
    (and counted) until the garbage collector runs."""
    out = [] if out is None else out
    if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
        for item in value:
            leaves(item, out)
    elif isinstance(value, dict):
        for item in value.values():
            leaves(item, out)
    else:
        out.append(value)
    return out


@dataclass
class Peak:
    bytes: int = 0
    holders: dict[str, int] = field(default_factory=dict)


class MemoryTracker(TorchDispatchMode):
    """Counts live bytes per device and holder; ``peaks[phase][device]`` is the high-water mark with its breakdown."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[str, Counter] = {"cuda": Counter(), "cpu": Counter()}
        self.total: Counter = Counter()
        self.phase = "setup"
        self.peaks: dict[str, dict[str, Peak]] = {}
        self._named: list[str] = []
        self._seen: dict[int, tuple] = {}
        self.by_holder_end: dict[str, Counter] = {}
        self.watches: list = []  # calls being watched (``_real_size_replay.CallWatch``): their own high-water marks

    # -- bookkeeping ---------------------------------------------------------------------------------
    def live_bytes(self, device: str) -> int:
        return self.total[device]

    @contextmanager
    def holder(self, name: str):
        self._named.append(name)
        try:
            yield
        finally:
            self._named.pop()

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.peaks.setdefault(phase, {d: Peak(self.total[d], dict(self.live[d])) for d in ("cuda", "cpu")})

    def _holder(self) -> str:
        if self._named:
            return self._named[-1]
        frame = sys._getframe(3)
        while frame is not None:
            name = frame.f_code.co_filename
            if name.startswith(REPO) and "/benchmarks/" not in name:
                rel = name[len(REPO):]
                for prefix, holder in _PACK_HOLDERS:
                    if rel.startswith(prefix):
                        return holder
            elif name.startswith(_comfy_root()):
                for suffix, holder in _COMFY_HOLDERS:
                    if suffix in name:
                        return holder
                # The model's forward, the sampler's step, the conds batched for a call: whoever called them,
                # working memory of the call, not what the pack's caller keeps (a trajectory grows per step).
                return "activations"
            frame = frame.f_back
        return "activations"

    def track(self, tensor: torch.Tensor, holder: str | None = None) -> None:
        """Count ``tensor``'s storage if it is new (also for tensors made outside the mode, e.g. inputs)."""
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._seen:
            return
        nbytes = storage.nbytes()
        kind = device_kind(tensor)
        holder = holder or self._holder()
        self._seen[key] = (kind, holder, nbytes)
        weakref.finalize(storage, self._release, key)
        self.live[kind][holder] += nbytes
        self.total[kind] += nbytes
        for watch in self.watches:
            if self.total[kind] > watch.peak.get(kind, watch.start[kind]):
                watch.peak[kind] = self.total[kind]
                watch.peak_live[kind] = dict(self.live[kind])
        self.note_peak(kind, self.total[kind], self.live[kind])

    def note_peak(self, kind: str, total: int, holders: dict[str, int]) -> None:
        """Raise the phase's ``kind`` peak to ``total`` (with ``holders``) if it is higher."""
        peak = self.peaks.setdefault(self.phase, {d: Peak() for d in ("cuda", "cpu")})[kind]
        if total > peak.bytes:
            peak.bytes = total
            peak.holders = dict(holders)

    def _release(self, key: int) -> None:
        kind, holder, nbytes = self._seen.pop(key)
        self.live[kind][holder] -= nbytes
        self.total[kind] -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Page-locked host memory is the staging ring of the host copies, whoever asks for it: not a trajectory that
        # grows with the steps.
        holder = "staging" if kwargs and kwargs.get("pin_memory") else None
        for value in (out,) if isinstance(out, torch.Tensor) else leaves(out):
            if isinstance(value, torch.Tensor) and value.layout == torch.strided:
                self.track(value, holder)
        return out


class StepFlops:
    """FLOPs of each model evaluation (ComfyUI's ``CFGGuider.outer_predict_noise``), per phase:
    ``torch.utils.flop_counter.FlopCounterMode`` entered around an evaluation of the same run. Evaluations of one
    kind on inputs of one shape do the same work (``step_kind(phase, index)`` names the kind; None: every evaluation
    of the phase is of one kind), so each is counted once and its later evaluations get its count: the counter's
    per-op dispatch is a large share of a model evaluation's cost on fake tensors."""

    def __init__(self, tracker: MemoryTracker, step_kind: Callable[[str, int], Hashable] | None = None) -> None:
        self.tracker = tracker
        self.step_kind = step_kind or (lambda phase, index: None)
        self.per_phase: dict[str, list[float]] = {}
        self.counted: dict[tuple, float] = {}  # (phase, kind, input shape) -> FLOPs of its first evaluation
        self.counting = False  # an evaluation is being counted (its model calls must run, not be replayed)

    @contextmanager
    def installed(self):
        import comfy.samplers
        from torch.utils.flop_counter import FlopCounterMode

        original = comfy.samplers.CFGGuider.outer_predict_noise
        counts = self.per_phase

        def counted(guider, *args, **kwargs):
            phase = self.tracker.phase
            done = counts.setdefault(phase, [])
            # Same kind and same input shape (an inversion chunk may be a frame shorter): the same calls.
            shape = tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else None
            key = (phase, self.step_kind(phase, len(done)), shape)
            if key in self.counted:
                out = original(guider, *args, **kwargs)
            else:
                counter = FlopCounterMode(display=False)
                self.counting = True
                try:
                    with counter:
                        out = original(guider, *args, **kwargs)
                finally:
                    self.counting = False
                self.counted[key] = float(counter.get_total_flops())
            done.append(self.counted[key])
            return out

        comfy.samplers.CFGGuider.outer_predict_noise = counted
        try:
            yield self
        finally:
            comfy.samplers.CFGGuider.outer_predict_noise = original

    def per_step(self, phase: str) -> float:
        values = self.per_phase.get(phase) or [0.0]
        return sum(values) / len(values)


# Objects of the pack whose tensors belong to a holder (class name -> holder), re-tagged by :func:`retag`.
_KNOWN = {"StepBank": "bank", "InversionRecorder": "trajectory", "FlowInversionSampler": "trajectory",
          "TokenFlowInversion": "trajectory", "TokenFlowCorrespondences": "fields", "ExtractionGuider": "fields"}


def _tensors(value, depth: int = 0):
    if isinstance(value, torch.Tensor):
        yield value
    elif depth > 4:
        return
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item, depth + 1)


class _Registry:
    """The live instances of the pack's classes named in ``_KNOWN``: their ``__init__`` registers them (instead of
    a scan of every object the garbage collector holds before each model call)."""

    def __init__(self) -> None:
        self.refs: dict[int, weakref.ref] = {}
        self.patched: list[tuple[type, Callable]] = []

    def install(self) -> None:
        classes = {value for name, module in list(sys.modules.items())
                   if name.startswith("comfyui_tokenflow") and module is not None
                   for value in vars(module).values()
                   if isinstance(value, type) and value.__name__ in _KNOWN and value.__module__ == name}
        for cls in classes:
            original = cls.__init__

            def registering(obj, *args, _original=original, **kwargs):
                _original(obj, *args, **kwargs)
                if type(obj).__name__ in _KNOWN:
                    key = id(obj)
                    self.refs[key] = weakref.ref(obj, lambda _, key=key: self.refs.pop(key, None))

            cls.__init__ = registering
            self.patched.append((cls, original))

    def uninstall(self) -> None:
        for cls, original in self.patched:
            cls.__init__ = original
        self.patched.clear()

    def objects(self) -> list:
        return [obj for obj in (ref() for ref in list(self.refs.values())) if obj is not None]


_REGISTRY = _Registry()


def _known_objects() -> list:
    return _REGISTRY.objects()


def retag_known(tracker: MemoryTracker, objects: list | None = None) -> list:
    """Give the storages reachable from the pack's banks, recorders and products (``objects``; default: all found
    by the garbage collector) their holder. Returns weak references to the objects walked."""
    objects = _known_objects() if objects is None else objects
    for obj in objects:
        holder = _KNOWN[type(obj).__name__]
        for value in vars(obj).values():
            for tensor in _tensors(value):
                key = id(tensor.untyped_storage())
                seen = tracker._seen.get(key)
                if seen is None or seen[1] == holder:
                    continue
                kind, old, nbytes = seen
                tracker._seen[key] = (kind, holder, nbytes)
                tracker.live[kind][old] -= nbytes
                tracker.live[kind][holder] += nbytes
    return [weakref.ref(obj) for obj in objects]


@contextmanager
def retag(tracker: MemoryTracker, model_patcher):
    """Re-tag the known holders before every model call (found by the garbage collector) and before each block of
    the model (the objects found at the call: a bank filled during a call is then its own holder from the next
    block on, not the call's activations; within the block that allocates it, it still counts as activations)."""
    found: list = []

    def at_call(*_):
        found[:] = retag_known(tracker)

    def at_block(*_):
        retag_known(tracker, [obj for obj in (ref() for ref in found) if obj is not None])

    unet = model_patcher.model.diffusion_model
    handles = [unet.register_forward_pre_hook(at_call)]
    handles += [module.register_forward_pre_hook(at_block) for name, module in unet.named_modules()
                if name and name.count(".") <= 2]
    _REGISTRY.install()
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        retag_known(tracker)
        _REGISTRY.uninstall()
