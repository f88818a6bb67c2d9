"""The DDPM rule's samplers (KSAMPLER functions), in ComfyUI's sigma space.

- :func:`ddim_sampler`: deterministic DDIM (eta 0), the edit's sampler;
- :func:`inversion_sampler`: DDIM inversion on ascending levels (the official ``ddim_inversion``);
- :func:`fixed_point_sampler`: the exact inversion on the editing grid, each implicit step by fixed point;
- :func:`extraction_sampler`: the stored source latents of every step through the model, for extraction.

Every level the loops compute with is a host float: no step reads a value back from the device.
"""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.utils

from ...tokenflow_ops.fixed_point import DEFAULT_MAX_ITERATIONS, DEFAULT_TOLERANCE, StepSolution, solve_inversion_step
from ...tokenflow_ops.inversion import ddim_inversion_step
from ...tokenflow_ops.schedule import alpha_bar_from_sigma
from ..patches.contract import to_device
from ..sampling.host_staging import HostStaging
from ..sampling.inversion_guiders import ChunkGuider


class InversionRecorder:
    """What an inversion sampler keeps: x at the kept timesteps, the final x, and (fixed point) its cost."""

    def __init__(self, keep: list[int], timesteps: list[int], total: int) -> None:
        self.keep = {t: i for i, t in enumerate(keep)}
        self.timesteps = timesteps
        self.saved: dict[int, torch.Tensor] = {}
        self.final: torch.Tensor | None = None
        self.progress = comfy.utils.ProgressBar(total)
        self.evaluations: list[float] = []  # fixed point: model evaluations per frame at each step (mean over chunks)
        self.residuals: list[float | None] = []  # fixed point: largest final residual over the chunks (None: k = 1)
        self.staging = HostStaging()  # the saved steps' way to the host (bounded page-locked memory)


def ddim_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, begin_step=None):
    """Deterministic DDIM (eta 0) in ComfyUI's sigma space; the last sigma is the final level, not 0."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        comfy.model_management.throw_exception_if_processing_interrupted()
        begin_step(i)  # the guider learns the step here, not by reading the sigma back from the device
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = denoised + (x - denoised) * (sigmas[i + 1] / sigmas[i])
    return x


def inversion_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None,
                      recorder: InversionRecorder = None, abar_start: float = 1.0,
                      host_sigmas: list[float] | None = None):
    """KSAMPLER function: x starts as the clean latent; sigmas are the ASCENDING inversion levels.

    ``host_sigmas`` are the same levels on the CPU, so no step reads a value back from the device.
    """
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    abar_prev = abar_start
    try:
        for i, sigma in enumerate(sigmas):
            comfy.model_management.throw_exception_if_processing_interrupted()
            abar = float(alpha_bar_from_sigma(host_sigmas[i]))
            model_input = x / abar ** 0.5  # ComfyUI divides by sqrt(1 + sigma^2): the UNet sees x at timestep u_j
            denoised = model(model_input, sigma * s_in, **extra_args)
            eps = (model_input - denoised) / sigma
            x = ddim_inversion_step(x, eps, abar_prev, abar)
            abar_prev = abar
            t = recorder.timesteps[i]
            if t in recorder.keep:
                recorder.saved[t] = recorder.staging.copy(x, torch.float32)
            recorder.progress.update(1)
        recorder.final = x.float().cpu()  # blocking: every earlier non-blocking copy has landed too
    finally:  # an interrupted run leaves no page-locked ring behind either
        recorder.staging.finish()
    return x


def fixed_point_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None,
                        recorder: InversionRecorder = None, abar_start: float = 1.0,
                        host_sigmas: list[float] | None = None,
                        guider: ChunkGuider = None, max_iterations: int = DEFAULT_MAX_ITERATIONS,
                        tolerance: float = DEFAULT_TOLERANCE):
    """KSAMPLER function: the implicit DDIM inversion step at each ASCENDING editing level, by fixed point.

    Every chunk of frames (``frame_batch`` / device memory) iterates on its own: one UNet call for all of
    its frames per iteration and one scalar residual read per iteration (the stopping rule), never one per
    frame.
    """
    extra_args = extra_args or {}
    chunks = guider.chunks(x)
    guider.n_frames = x.shape[0]
    abar_prev = abar_start
    try:
        for i, sigma in enumerate(sigmas):
            abar = float(alpha_bar_from_sigma(host_sigmas[i]))

            def solve(frames: range, x_chunk: torch.Tensor) -> StepSolution:
                s_in = x.new_ones([len(frames)])

                def eps_at(latent: torch.Tensor) -> torch.Tensor:
                    comfy.model_management.throw_exception_if_processing_interrupted()
                    model_input = latent / abar ** 0.5
                    denoised = model(model_input, sigma * s_in, **extra_args)
                    return (model_input - denoised) / sigma

                return solve_inversion_step(eps_at, x_chunk, abar_prev, abar, max_iterations, tolerance)

            x, evaluations, residual = guider.solve_each_chunk(x, chunks, solve)
            abar_prev = abar
            recorder.evaluations.append(evaluations)
            recorder.residuals.append(residual)
            t = recorder.timesteps[i]
            if t in recorder.keep:
                recorder.saved[t] = recorder.staging.copy(x, torch.float32)
            recorder.progress.update(1)
        recorder.final = x.float().cpu()
    finally:  # an interrupted run leaves no page-locked ring behind either
        guider.chunk = None
        recorder.staging.finish()
    return x


def extraction_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, source=None,
                       host_sigmas: list[float] | None = None, begin_step=None):
    """Evaluates the model on the stored source latents of every step; ``x`` is returned unchanged."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i, sigma in enumerate(sigmas):
        comfy.model_management.throw_exception_if_processing_interrupted()
        begin_step(i)
        abar = float(alpha_bar_from_sigma(host_sigmas[i]))
        model(to_device(source[i], x.device, x.dtype) / abar ** 0.5, sigma * s_in, **extra_args)
    return x
