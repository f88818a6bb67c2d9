"""Exact DDIM inversion on the editing grid: each implicit step solved by fixed-point iteration (pure torch).

The deterministic DDIM sampler maps ``x_t`` to ``x_prev = sqrt(abar_prev) pred_x0(x_t, eps(x_t)) +
sqrt(1 - abar_prev) eps(x_t)``. Its exact inverse is the IMPLICIT equation (eps at the unknown x_t)

    x_t = sqrt(abar_t) * (x_prev - sqrt(1 - abar_prev) eps(x_t)) / sqrt(abar_prev) + sqrt(1 - abar_t) eps(x_t)

solved by the fixed-point iteration ``x^{k+1} = g(x^k)``, g the right-hand side (plain Picard; an
Anderson variant of depth 1 is here too, measured no better on the tiny models at 2-5 evaluations), from
``x^0 = x_prev`` (fixed-point inversion, AIDI, ReNoise). One iteration from that start is the official DDIM
inversion step (eps at the TARGET timestep, evaluated at x_prev): k = 1 is plain DDIM inversion.

Residual after iteration k >= 2: ``|x^k - x^{k-1}| / |x^k|`` (2-norms over the whole chunk), which is
``|F(x^{k-1})| / |x^k|`` for ``F(x) = x - g(x)``. The first iteration has no residual (its change is
the step itself, not an error). The iteration stops at the first residual <= ``tolerance`` or after
``max_iterations`` evaluations.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from .inversion import ddim_inversion_step
# The settings and their one check live with the other step-count rules (scripts load schedule.py on its own).
from .schedule import (DEFAULT_INVERSION_METHOD, DEFAULT_MAX_ITERATIONS, DEFAULT_TOLERANCE,  # noqa: F401
                       INVERSION_METHODS as METHODS, MAX_ITERATIONS_LIMIT, TOLERANCE_LIMIT, check_fixed_point_settings,
                       resolve_method)

log = logging.getLogger(__name__)


@dataclass
class StepSolution:
    """One solved implicit step: the latent, how many evaluations it took and the residual after each (k >= 2)."""

    x: torch.Tensor
    evaluations: int
    residuals: list[float] = field(default_factory=list)

    @property
    def residual(self) -> float:
        """The last residual (NaN when only one evaluation ran: no residual is defined)."""
        return self.residuals[-1] if self.residuals else float("nan")


def _accumulator(tensor: torch.Tensor) -> torch.dtype:
    """float64 for the sums, except on Apple's MPS, which has no float64."""
    return torch.float32 if tensor.device.type == "mps" else torch.float64


def relative_residual(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``|new - old| / |new|`` over the whole tensor, as a 0-d tensor on the device (no host read)."""
    acc = _accumulator(new)
    diff = torch.linalg.vector_norm((new - old).to(acc))
    return diff / torch.linalg.vector_norm(new.to(acc)).clamp_min(1e-30)


def anderson_mix(g: torch.Tensor, g_old: torch.Tensor, f: torch.Tensor, f_old: torch.Tensor) -> torch.Tensor:
    """Anderson acceleration, depth 1: ``g - gamma (g - g_old)``, gamma minimising ``|f - gamma (f - f_old)|``.

    ``g``/``g_old`` are the last two images g(x) of the iteration, ``f``/``f_old`` their residuals g(x) - x.
    gamma is one scalar per chunk, kept on the device (no host read).
    """
    acc = _accumulator(f)
    df = (f - f_old).to(acc)
    gamma = (df * f.to(acc)).sum() / (df * df).sum().clamp_min(1e-30)
    return g - gamma.to(g.dtype) * (g - g_old)


def solve_inversion_step(eps_at: Callable[[torch.Tensor], torch.Tensor], x_prev: torch.Tensor, abar_prev: float,
                         abar: float, max_iterations: int = DEFAULT_MAX_ITERATIONS,
                         tolerance: float = DEFAULT_TOLERANCE, anderson: bool = False) -> StepSolution:
    """Solve one implicit DDIM inversion step ``x_prev`` (at ``abar_prev``) -> x_t (at ``abar``).

    ``eps_at(x)`` is the model's eps at the TARGET timestep for the latent ``x`` (one model call for all
    frames of ``x``). One host read (the residual, a scalar) per iteration from the second on.
    ``anderson``: from the second iteration on, Anderson acceleration with one previous iterate
    (:func:`anderson_mix`); False (the engine's choice) is the plain Picard iteration. The first iteration
    is the same either way.
    """
    return iterate_to_fixed_point(lambda x: ddim_inversion_step(x_prev, eps_at(x), abar_prev, abar), x_prev,
                                  max_iterations, tolerance, anderson)


def iterate_to_fixed_point(g: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor,
                           max_iterations: int = DEFAULT_MAX_ITERATIONS, tolerance: float = DEFAULT_TOLERANCE,
                           anderson: bool = False) -> StepSolution:
    """``x^{k+1} = g(x^k)`` from ``x^0 = start``, under the stopping rule above (any implicit step's solver).

    ``g`` makes one model call per application; the residual is read from the second iteration on.
    """
    x = start
    residuals: list[float] = []
    evaluations = 0
    g_old = f_old = None
    for k in range(max_iterations):
        new = g_x = g(x)
        evaluations += 1
        if anderson:
            f = g_x - x
            if f_old is not None:
                new = anderson_mix(g_x, g_old, f, f_old)
            g_old, f_old = g_x, f
        if k > 0:
            residuals.append(float(relative_residual(new, x)))  # the one scalar read of this iteration
        x = new
        if k > 0 and residuals[-1] <= tolerance:
            break
    return StepSolution(x, evaluations, residuals)


def convergence_warning(residuals: list[float | None], timesteps: list[int], max_iterations: int,
                        tolerance: float) -> str | None:
    """The warning for steps that ended at the cap above the tolerance (``residuals`` and ``timesteps`` in the order
    the steps ran), or None when every step converged or the cap was 1 (no residual)."""
    open_steps = [(r, t) for r, t in zip(residuals, timesteps) if r is not None and r > tolerance]
    if not open_steps or max_iterations <= 1:
        return None
    worst, at = max(open_steps)
    return (f"{len(open_steps)} of {len(timesteps)} steps stopped at max_iterations ({max_iterations}) above the "
            f"tolerance {tolerance:g} (largest residual {worst:.3g} at t = {at}); raise max_iterations, use more steps "
            "(a finer grid converges faster) or method ddim")


def report_convergence(evaluations: list[float], residuals: list[float | None], timesteps: list[int],
                       max_iterations: int, tolerance: float) -> None:
    """Log the cost; warn when steps ended at the cap above the tolerance (a coarse grid converges slowly)."""
    log.info("TokenFlow: fixed-point inversion: %.2f evaluations per frame and step on average",
             sum(evaluations) / len(evaluations))
    warning = convergence_warning(residuals, timesteps, max_iterations, tolerance)
    if warning:
        log.warning("TokenFlow: fixed-point inversion: %s", warning)
