"""DDIM timesteps as the official TokenFlow code uses them (diffusers "leading" spacing).

All functions return plain Python lists or tensors; the alpha/sigma values always come
from the caller's own noise schedule (ComfyUI: ``model_sampling.sigmas``), so SD1.x, SD2.x
and SDXL checkpoints with non-default schedules keep working.
"""
from __future__ import annotations

import torch

TRAIN_TIMESTEPS = 1000


def leading_timesteps(steps: int, train_timesteps: int = TRAIN_TIMESTEPS, offset: int = 1) -> list[int]:
    """Ascending timesteps ``k * (train_timesteps // steps) + offset`` for ``k = 0 .. steps-1``.

    This is diffusers' DDIMScheduler with ``timestep_spacing="leading"`` and ``steps_offset=1``
    (the SD1.x/SD2.x scheduler configs the official TokenFlow code loads).
    """
    if steps < 1 or steps > train_timesteps:
        raise ValueError(f"steps must be in 1..{train_timesteps}, got {steps}")
    ratio = train_timesteps // steps
    return [k * ratio + offset for k in range(steps)]


def editing_timesteps(steps: int) -> list[int]:
    """The editing (denoising) timesteps, largest first: 981, 961, ..., 1 for 50 steps."""
    return list(reversed(leading_timesteps(steps)))


def inversion_timesteps(inversion_steps: int) -> list[int]:
    """The DDIM inversion timesteps, smallest first: 1, 3, ..., 999 for 500 steps."""
    return leading_timesteps(inversion_steps)


def sdedit_timesteps(steps: int, start: float) -> list[int]:
    """The editing timesteps kept by the official SDEdit script.

    It slices ``timesteps[int(1 - start * steps):]``: 44 of 50 steps for ``start=0.9``
    (first t = 861). Python's slice semantics are kept on purpose, quirks included.
    """
    if not 0.0 < start <= 1.0:
        raise ValueError(f"sdedit_start must be in (0, 1], got {start}")
    full = editing_timesteps(steps)
    return full[int(1 - start * len(full)):]


def check_inversion_covers(steps: int, inversion_steps: int) -> None:
    """Raise a clear error unless every editing timestep lies on the inversion grid."""
    if inversion_steps < steps or inversion_steps % steps != 0:
        raise ValueError(
            f"inversion_steps ({inversion_steps}) must be a multiple of steps ({steps}) so that every "
            f"editing timestep is on the inversion grid; try inversion_steps={max(1, inversion_steps // steps) * steps}"
        )
    grid = set(inversion_timesteps(inversion_steps))
    missing = [t for t in editing_timesteps(steps) if t not in grid]
    if missing:  # cannot happen for multiples, kept as a guard for custom schedules
        raise ValueError(f"editing timesteps {missing[:5]} are not on the inversion grid")


def alpha_bar_from_sigma(sigma: torch.Tensor | float) -> torch.Tensor:
    """ComfyUI's discrete sigma is sqrt((1 - abar) / abar); invert it."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return 1.0 / (1.0 + sigma * sigma)
