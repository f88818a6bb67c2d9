"""DDIM timesteps as the official TokenFlow code uses them (diffusers "leading" spacing).

All functions return plain Python lists or tensors; the alpha/sigma values always come
from the caller's own noise schedule (ComfyUI: ``model_sampling.sigmas``), so SD1.x, SD2.x
and SDXL checkpoints with non-default schedules keep working.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TRAIN_TIMESTEPS = 1000
# The largest step count whose leading grid k * (1000 // S) + 1 stays inside the schedule (t = 0..999):
# 999 gives t = 1..999 (the finest grid); 1000 would end at t = 1000, one past the last entry (the
# official diffusers scheduler indexes past its table there too). Only S = 1000 overshoots.
MAX_STEPS = 999
# The step-grid rule, as every message, tooltip, --help and the docs state it (see step_grid_rule).
STEP_GRID_RULE = ("every editing timestep must lie on the inversion grid: 1000 // {inversion} must divide "
                  "1000 // {steps}, and the inversion grid must reach the first editing timestep (for {steps} 50: "
                  "{inversion} 50, 100, 200, 250, 500 or 999; {inversion} 12 with {steps} 4 does not fit)")


# Inversion methods (TokenFlowInvert's ``method``): the official DDIM inversion on the grid of inversion_steps (Euler
# on a flow model's sigmas), the exact inversion on the editing grid (tokenflow_ops.fixed_point), with its cap and
# stopping tolerance, and "auto" (appended: saved workflows keep their values), each family's most faithful one
# (resolve_method).
INVERSION_METHODS = ("ddim", "fixed_point", "auto")
DEFAULT_INVERSION_METHOD = "auto"
DEFAULT_MAX_ITERATIONS = 3
MAX_ITERATIONS_LIMIT = 20
DEFAULT_TOLERANCE = 1e-3
TOLERANCE_LIMIT = 1.0


def step_grid_rule(steps_name: str = "steps", inversion_name: str = "inversion_steps") -> str:
    """The step-grid rule in words, with the inputs named as the reader sees them."""
    return STEP_GRID_RULE.format(steps=steps_name, inversion=inversion_name)


def leading_timesteps(steps: int, train_timesteps: int = TRAIN_TIMESTEPS, offset: int = 1) -> list[int]:
    """Ascending timesteps ``k * (train_timesteps // steps) + offset`` for ``k = 0 .. steps-1``.

    This is diffusers' DDIMScheduler with ``timestep_spacing="leading"`` and ``steps_offset=1``
    (the SD1.x/SD2.x scheduler configs the official TokenFlow code loads).
    """
    if steps < 1 or steps > train_timesteps:
        raise ValueError(f"steps must be in 1..{train_timesteps}, got {steps}")
    ratio = train_timesteps // steps
    last = (steps - 1) * ratio + offset
    if last >= train_timesteps:  # only steps = 1000: t = 1000 is past the schedule's entries 0..999
        raise ValueError(f"{steps} steps would reach timestep {last}, past the {train_timesteps}-entry schedule; "
                         f"use at most {MAX_STEPS} steps")
    return [k * ratio + offset for k in range(steps)]


def editing_timesteps(steps: int) -> list[int]:
    """The editing (denoising) timesteps, largest first: 981, 961, ..., 1 for 50 steps."""
    return list(reversed(leading_timesteps(steps)))


def inversion_timesteps(inversion_steps: int) -> list[int]:
    """The DDIM inversion timesteps, smallest first: 1, 3, ..., 999 for 500 steps."""
    return leading_timesteps(inversion_steps)


def sdedit_keeps_every_step(steps: int, start: float) -> bool:
    """True where the official slice ``timesteps[int(1 - start * steps):]`` keeps every step of a run of several.

    For start * steps < 2 the index ``int(1 - start * steps)`` truncates to 0: the smallest starts, which ask for
    the least noise, would start the edit from full noise (the first editing timestep).
    """
    return steps > 1 and int(1 - start * steps) == 0


def sdedit_timesteps(steps: int, start: float) -> list[int]:
    """The editing timesteps kept by the official SDEdit script.

    It slices ``timesteps[int(1 - start * steps):]``: 44 of 50 steps for ``start=0.9`` (first t = 861). Python's
    slice semantics are kept (``start=1.0`` keeps 49 of 50), except where the slice would keep every step
    (:func:`sdedit_keeps_every_step`): there the edit keeps the last step only, the least noise, which those
    starts ask for (what ``start = 2 / steps`` keeps).
    """
    if not 0.0 < start <= 1.0:
        raise ValueError(f"sdedit_start must be in (0, 1], got {start}")
    full = editing_timesteps(steps)
    if sdedit_keeps_every_step(steps, start):
        return full[-1:]
    return full[int(1 - start * len(full)):]


def check_step_count(value: int, name: str) -> None:
    """Refuse a step count outside 1..MAX_STEPS, naming the input and the largest value that works."""
    if value < 1:
        raise ValueError(f"{name} ({value}) must be at least 1; the official values are steps 50 and "
                         "inversion_steps 500")
    if value > MAX_STEPS:
        last = (value - 1) * (TRAIN_TIMESTEPS // value) + 1
        raise ValueError(
            f"{name} ({value}) is too many: its DDIM grid k * (1000 // {value}) + 1 ends at timestep {last}, past the "
            f"model's {TRAIN_TIMESTEPS}-step noise schedule (t = 0..{TRAIN_TIMESTEPS - 1}; the official scheduler "
            f"fails there too). Use {name} = {MAX_STEPS} or less ({MAX_STEPS} is the finest grid, t = 1..{MAX_STEPS}, "
            "the closest to the paper's 1000 inversion steps)")


def grid_covers(steps: int, inversion_steps: int) -> bool:
    """True iff every editing timestep of ``steps`` lies on the inversion grid of ``inversion_steps``.

    Equivalent to: ``steps == 1``, or ``1000 // inversion_steps`` divides ``1000 // steps`` and the
    inversion grid reaches the largest editing timestep. (Divisibility alone is not enough when the
    inversion count does not divide 1000: 50 / 600 has ratio 1 | 20 but its grid stops at t = 600.)
    """
    return set(leading_timesteps(steps)) <= set(leading_timesteps(inversion_steps))


def _nearest(candidates: list[int], value: int) -> list[int]:
    """The nearest candidate below and above ``value`` (1 only when nothing else fits)."""
    useful = [c for c in candidates if c != 1] or candidates
    below = [c for c in useful if c < value]
    above = [c for c in useful if c > value]
    return sorted({*(below[-1:]), *(above[:1])}) or useful[:1]


def _either(values: list[int]) -> str:
    return " or ".join(str(v) for v in values)


def check_inversion_covers(steps: int, inversion_steps: int, *, steps_name: str = "steps",
                           inversion_name: str = "inversion_steps", fix: str = "") -> None:
    """The one check of the step-grid rule, before any model call.

    The official run_tokenflow_pnp.py loads preprocess.py's saved ``noisy_latents_{t}.pt`` at every
    editing timestep t, so every editing timestep must be an inversion timestep.

    Raises a ValueError naming both inputs (``steps_name``/``inversion_name``: how the caller's user
    sees them, e.g. ``--inversion-steps``) and the nearest values that fit; ``fix`` is appended.
    """
    check_step_count(steps, steps_name)
    check_step_count(inversion_steps, inversion_name)
    if grid_covers(steps, inversion_steps):
        return
    edit_ratio, inv_ratio = TRAIN_TIMESTEPS // steps, TRAIN_TIMESTEPS // inversion_steps
    edit_ts, inv_ts = editing_timesteps(steps), inversion_timesteps(inversion_steps)
    shown = ", ".join(str(t) for t in edit_ts[:3]) + (", ..." if len(edit_ts) > 3 else "")
    good_inversion = _nearest([i for i in range(1, MAX_STEPS + 1) if grid_covers(steps, i)], inversion_steps)
    good_steps = _nearest([s for s in range(1, MAX_STEPS + 1) if grid_covers(s, inversion_steps)], steps)
    raise ValueError(
        f"{steps_name} ({steps}) and {inversion_name} ({inversion_steps}) do not fit together: every editing timestep "
        f"({shown}: one every {edit_ratio}) must be an inversion timestep (1, {1 + inv_ratio}, ... {inv_ts[-1]}: one "
        f"every {inv_ratio}), which holds only when 1000 // {inversion_name} ({inv_ratio}) divides 1000 // "
        f"{steps_name} ({edit_ratio}) and the inversion grid (up to t = {inv_ts[-1]}) reaches the first editing "
        f"timestep (t = {edit_ts[0]}). Set {inversion_name} to {_either(good_inversion)} for {steps_name} = {steps}, "
        f"or {steps_name} to {_either(good_steps)} for {inversion_name} = {inversion_steps} (official: 50 editing "
        f"steps, 500 inversion steps){fix}"
    )


def check_fixed_point_settings(method: str, max_iterations: int, tolerance: float, *, method_name: str = "method",
                               iterations_name: str = "max_iterations", tolerance_name: str = "tolerance") -> None:
    """Refuse an unknown method, an iteration cap or tolerance out of range: one line naming the input and a value."""
    if method not in INVERSION_METHODS:
        raise ValueError(f"{method_name} ({method!r}) must be one of {', '.join(INVERSION_METHODS)}; 'ddim' is the "
                         "official code's inversion, 'fixed_point' the exact inversion on the editing grid, 'auto' "
                         "fixed_point on Flux / SD3.x and ddim on SD UNets")
    if method == "ddim":
        return
    if isinstance(max_iterations, bool) or not isinstance(max_iterations, int) or not (
            1 <= max_iterations <= MAX_ITERATIONS_LIMIT):
        raise ValueError(f"{iterations_name} ({max_iterations}) must be a whole number from 1 to "
                         f"{MAX_ITERATIONS_LIMIT}; use {DEFAULT_MAX_ITERATIONS} (1 is plain DDIM inversion on the "
                         "editing grid)")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not (
            0.0 <= float(tolerance) < TOLERANCE_LIMIT):
        raise ValueError(f"{tolerance_name} ({tolerance}) must be at least 0 and below {TOLERANCE_LIMIT:g} (a relative "
                         f"residual; 0 always runs {iterations_name}); use {DEFAULT_TOLERANCE:g}")


def resolve_method(method: str, flow: bool) -> str:
    """The method "auto" stands for: fixed_point on a flow-matching model (measured more faithful than 500 Euler
    steps there, benchmarks/README.md), ddim on an SD UNet (where it is not on every family); others as they are."""
    if method != "auto":
        return method
    return "fixed_point" if flow else "ddim"


def check_inversion_settings(steps: int, inversion_steps: int, method: str, max_iterations: int, tolerance: float,
                             flow: bool, *, steps_name: str = "steps", inversion_name: str = "inversion_steps",
                             **names: str) -> None:
    """Every refusal of an inversion's own settings, before any model call: the method and its cap and tolerance,
    then the grid the method inverts on (fixed point: the editing grid of ``steps``; ddim: the grid of
    ``inversion_steps``, which must cover it). ``flow``: a flow-matching model (what "auto" resolves to)."""
    check_fixed_point_settings(method, max_iterations, tolerance, **names)
    if resolve_method(method, flow) == "fixed_point":
        check_step_count(steps, steps_name)  # the fixed-point inversion's grid is the editing grid of steps
    else:
        check_inversion_covers(steps, inversion_steps, steps_name=steps_name, inversion_name=inversion_name)


def alpha_bar_from_sigma(sigma: torch.Tensor | float) -> torch.Tensor:
    """ComfyUI's discrete sigma is sqrt((1 - abar) / abar); invert it."""
    import torch  # here only: the step-grid rule above is plain arithmetic, checked by the runner before torch loads

    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return 1.0 / (1.0 + sigma * sigma)
