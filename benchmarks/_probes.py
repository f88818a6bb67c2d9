"""Timing and memory probes for the benchmark scripts (the op / UNet-call counters are in ``_counting.py``).

Import after ``_host.bootstrap(...)``. Nothing in the pack is changed: the per-pass timings come
from wrapping ``calc_on_frames`` / ``predict_noise`` of the pack's guider classes for the
duration of one measured run (:func:`instrument`), keyed by the ``PassContext.phase`` each call
carries, and restored afterwards.
"""
from __future__ import annotations

import ctypes
import gc
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

import comfy.samplers

import _host
from comfyui_tokenflow.engine.patches.contract import Phase
from comfyui_tokenflow.engine.sampling.edit_guider import TokenFlowGuider
from comfyui_tokenflow.engine.sampling.extraction_guider import ExtractionGuider
from comfyui_tokenflow.engine.sampling.frame_guider import FrameSubsetGuider
from comfyui_tokenflow.engine.sampling.inversion_guiders import FrameBatchGuider

KEYFRAME_PASS = "keyframe"
PROPAGATION = "propagation"
STEP = "step"
SUBPHASE = {
    Phase.KEYFRAMES: KEYFRAME_PASS, Phase.EXTRACT_KEYFRAMES: KEYFRAME_PASS,
    Phase.FRAMES: PROPAGATION, Phase.EXTRACT_FRAMES: PROPAGATION,
}
KEYFRAME_PHASES = (Phase.KEYFRAMES, Phase.EXTRACT_KEYFRAMES)


def tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


# -- the C allocator ------------------------------------------------------------------------------
def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc.mallopt(-3, mmap_threshold) == 1 and libc.mallopt(-1, trim_threshold) == 1  # M_MMAP/M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def memory_mode() -> bool:
    """Serve every allocation >= 4 KiB by its own mmap, unmapped on free (glibc ``mallopt``).

    Call it at process start, before the model is built, and measure memory before any timing run.
    glibc's default raises the mmap threshold dynamically (up to 32 MiB) and then serves tensors
    from its heap, and a free chunk in the heap is reused before any new mmap: a phase's peak RSS
    then depends on how earlier work fragmented the heap (measured: +-15 MiB between identical
    processes, and tens of MiB too much after a timed run). With a fresh heap and a 4 KiB threshold,
    RSS follows the live tensors. The page faults slow a run down by up to 1.5x: never time in it.
    """
    ok = _mallopt(4096, 4096)
    malloc_trim()
    return ok


def timing_mode() -> bool:
    """glibc's steady state after its dynamic adjustment: tensors < 32 MiB from the heap, no page-fault churn."""
    return _mallopt(32 << 20, 64 << 20)


def malloc_trim() -> None:
    """Give the C allocator's free pages back to the OS so that a phase's peak RSS counts all it touches."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakTracker:
    """Peak memory above a phase's starting point, overall and per (possibly nested) region.

    CPU: the kernel's resident-set high-water mark (VmHWM), reset through ``/proc/self/clear_refs``
    at every region boundary, so each region's peak is exact (no sampling). CUDA:
    ``torch.cuda.max_memory_allocated`` with ``reset_peak_memory_stats`` at the boundaries.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.base = 0.0
        self.peaks: dict[str, float] = {}
        self.open: list[str] = []

    def _current(self) -> float:
        return torch.cuda.memory_allocated() / 2**20 if self.cuda else _host.rss_mib()

    def _read_and_reset(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            value = torch.cuda.max_memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
        else:
            value = _host.peak_rss_mib()
            _host.reset_peak_rss()
        return value - self.base

    def _credit(self, value: float) -> None:
        self.peaks["total"] = max(self.peaks.get("total", 0.0), value)
        for label in self.open:
            self.peaks[label] = max(self.peaks.get(label, 0.0), value)

    def begin(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            malloc_trim()
            if not _host.reset_peak_rss():
                raise RuntimeError("cannot reset the peak RSS through /proc/self/clear_refs (Linux >= 4.0 needed)")
        self.base = self._current()
        self.peaks = {"total": 0.0}
        self.open = []

    def enter(self, label: str) -> None:
        self._credit(self._read_and_reset())
        self.open.append(label)

    def exit(self, label: str) -> None:
        self._credit(self._read_and_reset())
        self.open.remove(label)

    def end(self) -> dict[str, float]:
        self._credit(self._read_and_reset())
        return dict(self.peaks)


# -- steps ----------------------------------------------------------------------------------------
def step_kind(guider, timestep) -> str:
    """Steps of one kind cost the same: TokenFlow steps differ only by which PnP injections they do."""
    if isinstance(guider, TokenFlowGuider):
        # The pack's samplers set current_step before each model call (older engines: the step from the sigma).
        step = guider.current_step if hasattr(guider, "current_step") else guider._step_index(timestep)
        needs = guider.plan.needs[step]
        return ("attn+" if needs.attention_injection else "") + ("res" if needs.residual_injection else "plain")
    return "step"


# Every guider class whose predict_noise is one model evaluation (one step) of a measured phase.
STEP_CLASSES = (comfy.samplers.CFGGuider, TokenFlowGuider, ExtractionGuider,
                FrameBatchGuider)
_ORIGINAL_PREDICT = {cls: cls.__dict__["predict_noise"] for cls in STEP_CLASSES}
_ORIGINAL_CALC = FrameSubsetGuider.calc_on_frames


@contextmanager
def wrap_steps(enter: Callable[[Any, torch.Tensor], None], leave: Callable[[], None]):
    """Call ``enter(guider, timestep)`` / ``leave()`` around every model evaluation, for this block only."""

    def make_predict(original):
        def predict_noise(self, x, timestep, model_options={}, seed=None):
            enter(self, timestep)
            try:
                return original(self, x, timestep, model_options, seed)
            finally:
                leave()
        return predict_noise

    for cls, original in _ORIGINAL_PREDICT.items():
        cls.predict_noise = make_predict(original)
    try:
        yield
    finally:
        for cls, original in _ORIGINAL_PREDICT.items():
            cls.predict_noise = original


@dataclass
class Probe:
    """Per-run accumulators filled by the instrumented guider methods."""

    device: torch.device
    tracker: PeakTracker
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    steps: list[dict] = field(default_factory=list)  # per model evaluation: kind, seconds, per-pass seconds
    keyframes_per_step: list[int] = field(default_factory=list)
    bank_bytes: int = 0
    _step: dict | None = None
    _start: float = 0.0

    def sync(self) -> None:
        _host.synchronize(self.device)

    def clock(self) -> float:
        return _host.clock()

    def enter_step(self, guider, timestep) -> None:
        self._step = {"kind": step_kind(guider, timestep)}
        self.tracker.enter(STEP)
        self.sync()
        self._start = self.clock()

    def leave_step(self) -> None:
        self.sync()
        self._step["seconds"] = self.clock() - self._start
        self.steps.append(self._step)
        self._step = None
        self.tracker.exit(STEP)


@contextmanager
def instrument(probe: Probe):
    """Time/measure every ``calc_on_frames`` by pass and every model evaluation (step), for this block only."""

    def calc_on_frames(self, names, x, timestep, idx, model_options, context, n_frames, cache=True, calc=None):
        label = SUBPHASE.get(context.phase, "other") if context is not None else "other"
        probe.tracker.enter(label)
        probe.sync()
        start = probe.clock()
        try:
            return _ORIGINAL_CALC(self, names, x, timestep, idx, model_options, context, n_frames, cache, calc)
        finally:
            probe.sync()
            elapsed = probe.clock() - start
            probe.seconds[label] += elapsed
            probe.calls[label] += 1
            if probe._step is not None:
                probe._step[label] = probe._step.get(label, 0.0) + elapsed
            probe.tracker.exit(label)
            if context is not None and context.phase in KEYFRAME_PHASES:
                bank = context.bank
                probe.bank_bytes = max(probe.bank_bytes, tensor_bytes(bank.keyframe_outputs)
                                       + tensor_bytes(bank.keyframe_tokens) + tensor_bytes(bank.pnp_qk))
                probe.keyframes_per_step.append(int(context.frames.numel()))

    FrameSubsetGuider.calc_on_frames = calc_on_frames
    try:
        with wrap_steps(probe.enter_step, probe.leave_step):
            yield probe
    finally:
        FrameSubsetGuider.calc_on_frames = _ORIGINAL_CALC
