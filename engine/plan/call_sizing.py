"""How many frames one UNet call may hold: sized from the device's memory, never from the clip.

ComfyUI's ``calc_cond_batch`` batches whole conds over one input and only splits by conds when
memory is short, so splitting a pass by frames is TokenFlow's job. On CUDA (and other
accelerators) the split follows the free memory and the model's own ``memory_required``
estimate; on the CPU it follows a fixed budget so that CPU results are bit-identical from run
to run (unless the machine really lacks the memory, which is logged).
"""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Callable

import torch

import comfy.model_management

log = logging.getLogger(__name__)

# What one CPU call may use, whatever the machine's free memory. ComfyUI's CPU estimate (0.15 MiB per latent
# pixel and image, whatever the width of the model) is generous: 16 GiB holds the 3 branches of ~9 frames at
# 512x512 for SD1.5, of 40 frames at 128x128.
CPU_BUDGET_BYTES = 16 << 30
COMFY_FACTOR = 1.5  # calc_cond_batch's own margin over memory_required
TOKENFLOW_FACTOR = 1.3  # propagation gathers, fields and the margin that keeps calc_cond_batch from re-splitting
# The device's budget in bytes in place of its free memory (and of its total, with nothing reserved, for the
# refusals): tests and the dry run force small budgets with it. None: the device's own.
BUDGET_OVERRIDE_BYTES: int | None = None


@contextlib.contextmanager
def overriding(module, name: str, value):
    """``module.name`` is ``value`` within the block (a planner's override knob)."""
    previous = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, previous)


def budget(nbytes: int | None):
    """Size calls (and refusals) for a device of ``nbytes`` within the block (None: the device's own memory)."""
    return overriding(sys.modules[__name__], "BUDGET_OVERRIDE_BYTES", nbytes)


def call_bytes(model, images: int, latent_shape: tuple[int, ...]) -> float:
    """What ComfyUI budgets (with TokenFlow's extra) for one call of ``images`` latents."""
    return model.memory_required([images, *latent_shape]) * COMFY_FACTOR * TOKENFLOW_FACTOR


def available_bytes(device: torch.device) -> float:
    if BUDGET_OVERRIDE_BYTES is not None:
        return float(BUDGET_OVERRIDE_BYTES)
    free = comfy.model_management.get_free_memory(device)
    if device.type == "cpu":
        if free < CPU_BUDGET_BYTES:
            log.info("TokenFlow: %.1f GiB of free memory, less than the CPU budget of %.1f GiB: smaller calls",
                     free / 2**30, CPU_BUDGET_BYTES / 2**30)
        return min(free, CPU_BUDGET_BYTES)
    # ComfyUI keeps its minimum inference memory free when it loads weights, for what no estimate counts (the
    # driver's context, the allocator's fragmentation): TokenFlow's calls and bank plan within the rest.
    return max(0.0, free - comfy.model_management.minimum_inference_memory())


def frames_per_call(model, branches: int, latent_shape: tuple[int, ...], device: torch.device, n_frames: int,
                    cap: int = 0) -> int:
    """The most frames (each evaluated in ``branches`` branches) that fit one call; at least 1.

    ``cap`` > 0 limits it further (a user's frame_batch).
    """
    budget = available_bytes(device)
    per_frame = call_bytes(model, branches, latent_shape)
    fit = most_that_fit(lambda frames: call_bytes(model, frames * branches, latent_shape), budget,
                        min(n_frames, int(budget // max(per_frame, 1.0))))
    return min(fit, cap) if cap > 0 else fit


def most_that_fit(need: Callable[[int], float], budget: float, start: int) -> int:
    """The most frames, at least 1 and at most ``start`` (an estimate from above), whose ``need`` (bytes, growing
    with the frames) fits ``budget``."""
    fit = max(1, start)
    while fit > 1 and need(fit) > budget:
        fit -= 1
    return fit


def fits(model, images: int, latent_shape: tuple[int, ...], device: torch.device) -> bool:
    return call_bytes(model, images, latent_shape) <= available_bytes(device)


def budget_total() -> tuple[float, float]:
    """(the device's total memory, ComfyUI's minimum inference memory reserved on it), or (the override, 0)."""
    if BUDGET_OVERRIDE_BYTES is not None:
        return float(BUDGET_OVERRIDE_BYTES), 0.0
    total = comfy.model_management.get_total_memory(comfy.model_management.get_torch_device())
    return float(total), float(comfy.model_management.minimum_inference_memory())


def even_chunks(n_frames: int, per_call: int) -> list[range]:
    """Consecutive frame ranges of at most ``per_call`` frames whose sizes differ by at most one."""
    calls = -(-n_frames // max(1, per_call))
    base, extra = divmod(n_frames, calls)
    starts = [i * base + min(i, extra) for i in range(calls + 1)]
    return [range(a, b) for a, b in zip(starts, starts[1:])]


def largest_fitting_frame(h: int, w: int, fits_at: Callable[[int, int], bool]) -> tuple[int, int] | None:
    """The largest latent (height, width) of the same aspect below (h, w), in 64 px steps of width, that ``fits_at``:
    a size the user can set (None: none fits)."""
    def same_aspect(lw: int) -> int:
        return max(8, round(h * lw / w / 8) * 8)

    lw = next((lw for lw in range((w - 1) // 8 * 8, 7, -8) if fits_at(same_aspect(lw), lw)), None)
    return None if lw is None else (same_aspect(lw), lw)


def resolution_advice(fitting: tuple[int, int] | None, what: str) -> str:
    """What the user can do about a frame size that does not fit (``fitting``: a latent size that does)."""
    if fitting is None:
        return f"no frame size fits {what}; use a device with more memory"
    return (f"lower the resolution to {fitting[1] * 8}x{fitting[0] * 8} px or less (TokenFlow Load Video's "
            "width/height, or scale the images before VAE Encode)")


def check_frame_size_fits(model, latent_shape: tuple[int, ...], input_name: str) -> None:
    """Refuse frames so large that one model call on a single frame cannot run on the device at all: its
    activations and ComfyUI's minimum inference memory. The weights are not counted: ComfyUI loads them partly and
    streams the rest when they do not fit (Flux-dev bf16 on a 24 GB card), so they never make a size impossible."""
    total, reserve = budget_total()
    h, w = latent_shape[-2:]

    def need(lh: int, lw: int) -> float:
        return call_bytes(model.model, 1, (*latent_shape[:-2], lh, lw)) + reserve

    if need(h, w) <= total:
        return
    advice = resolution_advice(largest_fitting_frame(h, w, lambda lh, lw: need(lh, lw) <= total),
                               "beside ComfyUI's minimum inference memory")
    raise ValueError(f"{input_name}: one model call on a single {w * 8}x{h * 8} px frame needs about "
                     f"{need(h, w) / 2**30:.2f} GiB besides the weights (ComfyUI can keep those off the device), more "
                     f"than this device has ({total / 2**30:.2f} GiB); {advice}")
