"""Counting probes: UNet forward passes (with their batch sizes) and torch ops dispatched, per step.

Import after ``_host.bootstrap(...)``. A counting run is separate from the timed runs (the dispatch
mode puts Python code on every op, which would distort the seconds):

- **ops**: every aten call seen by a ``torch.utils._python_dispatch.TorchDispatchMode`` that is
  active around the whole phase (eager: nothing of the measured path is compiled). Calls made
  while ComfyUI loads models (``comfy.model_management.load_models_gpu``) are not counted. Ops are
  attributed to the model evaluation (step, the guider's ``predict_noise``) they happen in; the
  rest (cond processing, sampler updates, set-up) is counted apart.
- **images** (:class:`ImageCounter`): images entering the diffusion model, the unit of the inversion benchmarks;
- **UNet calls**: a forward pre-hook on ``model.model.diffusion_model`` records the batch size of
  every call (also calls that the pack stops early); a pre-hook on a ControlNet's
  ``control_model`` does the same for the ControlNet.
"""
from __future__ import annotations

import sys
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import comfy.model_management

import _host
from _probes import step_kind, wrap_steps


_PACK_DIRS = tuple(str(_host.REPO / d) + "/" for d in ("nodes", "tokenflow_ops"))
_COMFY_DIR = str(_host.comfyui_path() / "comfy") + "/"


class ImageCounter:
    """Images entering the UNet (a forward pre-hook on ``diffusion_model``; removed on exit)."""

    def __init__(self, model) -> None:
        self.module = model.model.diffusion_model
        self.images = 0
        self.calls = 0

    def _hook(self, module, args, kwargs):
        x = args[0] if args else kwargs.get("x")
        self.images += int(x.shape[0])
        self.calls += 1

    def __enter__(self) -> "ImageCounter":
        self.handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def op_origin() -> str:
    """Who dispatched the current op, by the innermost frame of the pack or of ComfyUI (torch's own frames
    skipped): ``pack:<dir>/<file>:<function>`` (the pack's patches, TokenFlow ops, guider code), else
    ``comfy`` (the UNet, the ControlNet, ComfyUI's sampling code)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(_PACK_DIRS):
            return f"pack:{Path(name).parent.name}/{Path(name).name}:{frame.f_code.co_name}"
        if name.startswith(_COMFY_DIR):
            return "comfy"
        frame = frame.f_back
    return "comfy"


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched while active (unless paused): ``by_op`` by overload packet, ``by_origin``
    by :func:`op_origin` (the pack's own ops versus ComfyUI's)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.paused = 0
        self.by_op: Counter = Counter()
        self.by_origin: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.total += 1
            self.by_op[func.overloadpacket.__name__] += 1
            self.by_origin[op_origin()] += 1
        return func(*args, **(kwargs or {}))


@dataclass
class Counts:
    """One counting run: per step its kind, ops and the batch sizes of its UNet / ControlNet calls."""

    steps: list[dict] = field(default_factory=list)
    outside: dict[str, Any] = field(default_factory=lambda: {"ops": 0, "unet": [], "controlnet": []})
    _step: dict | None = None
    _ops_at_enter: int = 0

    def record(self, kind: str, images: int) -> None:
        target = self._step if self._step is not None else self.outside
        target[kind].append(images)


def _batch_of(args: tuple, kwargs: dict) -> int:
    x = args[0] if args else kwargs.get("x")
    return int(x.shape[0]) if isinstance(x, torch.Tensor) else 0


@contextmanager
def _hooks(counts: Counts, modules: dict[str, list[torch.nn.Module]]):
    handles = []

    def hook_for(kind):
        def hook(module, args, kwargs):
            counts.record(kind, _batch_of(args, kwargs))
        return hook

    try:
        for kind, mods in modules.items():
            for module in {id(m): m for m in mods}.values():
                handles.append(module.register_forward_pre_hook(hook_for(kind), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def _loading_uncounted(counter: OpCounter):
    original = comfy.model_management.load_models_gpu

    def load_models_gpu(*args, **kwargs):
        counter.paused += 1
        try:
            return original(*args, **kwargs)
        finally:
            counter.paused -= 1

    comfy.model_management.load_models_gpu = load_models_gpu
    try:
        yield
    finally:
        comfy.model_management.load_models_gpu = original


def _compiled_frames() -> int:
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover
        return 0
    return int(sum(counters["frames"].values()))


def count_run(run, unet: torch.nn.Module, controlnets: list[torch.nn.Module] = ()) -> tuple[Any, Counts, dict]:
    """Run ``run()`` under the counters; returns (its result, per-step counts, totals)."""
    counts = Counts()
    counter = OpCounter()

    origins_at_enter: Counter = Counter()

    def enter(guider, timestep) -> None:
        counts._step = {"kind": step_kind(guider, timestep), "unet": [], "controlnet": []}
        counts._ops_at_enter = counter.total
        origins_at_enter.clear()
        origins_at_enter.update(counter.by_origin)

    def leave() -> None:
        counts._step["ops"] = counter.total - counts._ops_at_enter
        counts._step["origins"] = dict(counter.by_origin - origins_at_enter)
        counts.steps.append(counts._step)
        counts._step = None

    compiled = _compiled_frames()
    with _hooks(counts, {"unet": [unet], "controlnet": list(controlnets)}), wrap_steps(enter, leave), \
            _loading_uncounted(counter), counter:
        result = run()
    counts.outside["ops"] = counter.total - sum(s["ops"] for s in counts.steps)
    totals = {"ops": counter.total, "compiled_frames": _compiled_frames() - compiled,
              "top_ops": dict(counter.by_op.most_common(12))}
    return result, counts, totals


def _pattern(calls: list[int]) -> str:
    return "+".join(str(c) for c in calls) if calls else "–"


def summarize_counts(counts: Counts, totals: dict) -> dict[str, Any]:
    """Per-step means and the distinct call patterns (images per call) with how many steps had each."""
    steps = counts.steps
    n = max(1, len(steps))
    patterns: Counter = Counter(_pattern(s["unet"]) for s in steps)
    cn_patterns: Counter = Counter(_pattern(s["controlnet"]) for s in steps if s["controlnet"])
    kinds: dict[str, int] = {}
    origins: Counter = Counter()
    for s in steps:
        kinds.setdefault(s["kind"], s["ops"])
        origins.update(s["origins"])
    pack = {k[len("pack:"):]: v / n for k, v in origins.most_common() if k.startswith("pack:")}
    return {
        "count_steps": len(steps),
        "ops_per_step": sum(s["ops"] for s in steps) / n,
        "ops_by_kind": kinds,
        "ops_outside_steps": counts.outside["ops"],
        "pack_ops_per_step": sum(pack.values()), "pack_ops_by_function": pack,
        "unet_calls_per_step": sum(len(s["unet"]) for s in steps) / n,
        "unet_images_per_step": sum(sum(s["unet"]) for s in steps) / n,
        "unet_patterns": dict(patterns),
        "controlnet_calls_per_step": sum(len(s["controlnet"]) for s in steps) / n,
        "controlnet_patterns": dict(cn_patterns),
        "unet_calls_outside_steps": len(counts.outside["unet"]),
        "compiled_frames": totals["compiled_frames"],
        "top_ops": totals["top_ops"],
    }
