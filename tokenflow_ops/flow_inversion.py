"""Rectified-flow inversion and sampling steps (the DDIM analogue for CONST / flow-matching models).

A flow model predicts a velocity v with x_s = (1 - s) x0 + s eps and v = eps - x0; ComfyUI's
CONST sampling returns ``denoised = x - s v``. Deterministic Euler on DESCENDING sigmas is
plain sampling; Euler on ASCENDING sigmas is its inversion, the analogue of DDIM inversion:
like the official DDIM inversion (which evaluates the noise prediction at the next, noisier
timestep on the current latent), each inversion step evaluates the model at the next sigma.

That explicit step is not the inverse of the sampler's step: sampling goes ``x_next = x + (s_next - s) v(x, s)``
with v at the UNKNOWN latent x when inverting. :func:`solve_flow_inversion_step` solves that implicit equation
``x = x_next + (s - s_next) v(x, s)`` by fixed-point iteration (:func:`.fixed_point.iterate_to_fixed_point`) from
``x_next``; its first iteration is the explicit step, so a cap of 1 is the Euler inversion on that grid.
"""
from __future__ import annotations

from typing import Callable

import torch

from .fixed_point import DEFAULT_MAX_ITERATIONS, DEFAULT_TOLERANCE, StepSolution, iterate_to_fixed_point

TIMESTEP_LABELS = 1000  # editing timesteps are labels 0..999, as on the DDPM grid (schedule.leading_timesteps)


def sigma_at(sigmas: torch.Tensor, timestep: int) -> float:
    """The model's own sigma at editing-grid label ``timestep`` (0..999), read from its sigma table.

    Label t sits at the fraction (t + 1) / 1000 of the schedule: a 1000-entry table (SD3's
    ModelSamplingDiscreteFlow) gives ``sigmas[t]``, Flux's 10000-entry table ``sigmas[10 t + 9]``.
    """
    if not 0 <= timestep < TIMESTEP_LABELS:
        raise ValueError(f"timestep label {timestep} is outside 0..{TIMESTEP_LABELS - 1}")
    index = round((timestep + 1) * len(sigmas) / TIMESTEP_LABELS) - 1
    return float(sigmas[max(index, 0)].double())


def velocity(x: torch.Tensor, denoised: torch.Tensor, sigma: float) -> torch.Tensor:
    """v = (x - denoised) / sigma, from a CONST model's denoised prediction at sigma > 0."""
    return (x - denoised) / sigma


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    """x_{to} = x_{from} + (sigma_to - sigma_from) v; ascending sigmas invert, descending sigmas sample."""
    return x + (sigma_to - sigma_from) * v


def euler_from_denoised(x: torch.Tensor, denoised: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    """The same Euler step written with the model's own denoised prediction at ``sigma_from``:
    denoised + (x - denoised) sigma_to / sigma_from (the DDIM step in ComfyUI's sigma space)."""
    return denoised + (x - denoised) * (sigma_to / sigma_from)


def solve_flow_inversion_step(velocity_at: Callable[[torch.Tensor], torch.Tensor], x_next: torch.Tensor,
                              sigma_next: float, sigma: float, max_iterations: int = DEFAULT_MAX_ITERATIONS,
                              tolerance: float = DEFAULT_TOLERANCE) -> StepSolution:
    """The latent at ``sigma`` that the Euler sampling step (v at ``sigma``) maps to ``x_next`` at ``sigma_next`` <
    ``sigma``; ``velocity_at(x)`` is the model's velocity at ``sigma`` (one model call for all frames of ``x``)."""
    return iterate_to_fixed_point(lambda x: euler_step(x_next, velocity_at(x), sigma_next, sigma), x_next,
                                  max_iterations, tolerance)
