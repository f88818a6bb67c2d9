"""The DDIM update formulas of inversion and of the edit's start latent.

As the official TokenFlow code writes them: preprocess.py ``ddim_inversion`` (eps at the target
timestep), run_tokenflow_pnp.py ``get_ddim_eps`` (the "DDIM noise") and diffusers' ``add_noise``.

Latents here are in the diffusers/DDPM parameterisation ``x_t = sqrt(abar_t) x0 + sqrt(1-abar_t) eps``
(the space the official code stores its trajectory in). ComfyUI's samplers work in the
"sigma space" ``x / sqrt(abar)``; the engine divides by / multiplies with ``sqrt(abar)`` at its edges.
"""
from __future__ import annotations

import torch


def ddim_inversion_step(x: torch.Tensor, eps: torch.Tensor, abar_prev: float, abar_next: float) -> torch.Tensor:
    """One inversion step: x at ``abar_prev`` -> x at ``abar_next`` with eps evaluated at the TARGET step."""
    x0 = (x - (1.0 - abar_prev) ** 0.5 * eps) / abar_prev ** 0.5
    return abar_next ** 0.5 * x0 + (1.0 - abar_next) ** 0.5 * eps


def ddim_noise(x_inverted: torch.Tensor, x0: torch.Tensor, abar_inverted: float) -> torch.Tensor:
    """The "DDIM noise" recovered from a fully inverted latent: (x_T - sqrt(abar_T) x0) / sqrt(1 - abar_T)."""
    return (x_inverted - abar_inverted ** 0.5 * x0) / (1.0 - abar_inverted) ** 0.5


def add_noise(x0: torch.Tensor, noise: torch.Tensor, abar: float) -> torch.Tensor:
    """sqrt(abar) x0 + sqrt(1 - abar) noise (diffusers' ``scheduler.add_noise``)."""
    return abar ** 0.5 * x0 + (1.0 - abar) ** 0.5 * noise
