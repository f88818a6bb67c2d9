"""The flow rule's samplers, in the pack's own loops (``comfy.samplers.Sampler``), for flow-matching (CONST) models.

No noise scaling at either end: KSAMPLER.sample scales the input by (1 - sigma_0) and ends with
``inverse_noise_scaling``, a division by (1 - sigma_last), which is infinite on a schedule that ends (or
starts) at sigma = 1, and a start latent that already is x_sigma (an inverted latent) is used as it is.

- :class:`FlowEulerSampler`: ``x <- denoised + (x - denoised) * s_next / s`` on descending sigmas (the last
  may be 0: the step then returns ``denoised``), the edit's sampler; :func:`sample_flow` plain sampling with it;
- :class:`FlowInversionSampler`: Euler on ascending sigmas from the clean latent, each step evaluated at the
  next sigma (the analogue of the official DDIM inversion), x kept at the editing levels;
- :class:`FlowFixedPointSampler`: the exact inverse of :class:`FlowEulerSampler` on the editing levels, each
  implicit step solved by fixed point, every chunk of frames on its own;
- :class:`FlowExtractionSampler`: the stored source latents of every step through the model, for extraction.
"""
from __future__ import annotations

from typing import Callable

import torch

import comfy.model_management
import comfy.samplers
import comfy.utils

from ...tokenflow_ops.fixed_point import StepSolution
from ...tokenflow_ops.flow_inversion import euler_from_denoised, euler_step, solve_flow_inversion_step, velocity
from ..patches.contract import to_device
from ..sampling.host_staging import HostStaging
from ..sampling.inversion_guiders import ChunkGuider


class FlowEulerSampler(comfy.samplers.Sampler):
    """Euler from ``latent_image`` (model space, already x_sigma_0) down ``sigmas``; ``begin_step(i)`` before each call."""

    def __init__(self, levels: list[float], begin_step: Callable[[int], None] | None = None) -> None:
        self.levels = levels  # the same sigmas as host floats: the step never reads a value back from the device
        self.begin_step = begin_step

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        x = latent_image
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(self.levels) - 1):
            comfy.model_management.throw_exception_if_processing_interrupted()
            if self.begin_step is not None:
                self.begin_step(i)
            denoised = model_wrap(x, sigmas[i] * s_in, **extra_args)
            if callback is not None:
                callback(i, denoised, x, len(self.levels) - 1)
            x = euler_from_denoised(x, denoised, self.levels[i], self.levels[i + 1])
        return x


@torch.no_grad()
def sample_flow(model, positive: list, start: torch.Tensor, levels: list[float], negative: list | None = None,
                cfg: float = 1.0) -> torch.Tensor:
    """Plain deterministic sampling (no TokenFlow) from a model-space x at ``levels[0]``; model-space result."""
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative if negative is not None else positive)
    guider.set_cfg(cfg)
    latent_image = model.model.process_latent_out(start)
    out = guider.sample(torch.zeros_like(latent_image), latent_image, FlowEulerSampler(levels),
                        torch.tensor(levels), seed=0, disable_pbar=True)
    return model.model.process_latent_in(out)


class FlowInversionSampler(comfy.samplers.Sampler):
    """Euler on ascending sigmas from the clean latent; records x at the kept levels (no noise scaling)."""

    def __init__(self, levels: list[float], keep: dict[int, int]) -> None:
        self.levels = levels  # ascending sigmas of the inversion steps (host floats: no device reads)
        self.keep = keep  # step index -> row of the saved trajectory
        self.saved: dict[int, torch.Tensor] = {}
        self.final: torch.Tensor | None = None
        self.staging = HostStaging()  # the saved levels' way to the host (bounded page-locked memory)
        self.progress = comfy.utils.ProgressBar(len(levels))

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        x = latent_image  # model space (CFGGuider.inner_sample applied process_latent_in)
        s_in = x.new_ones([x.shape[0]])
        previous = 0.0
        try:
            for i, sigma in enumerate(self.levels):
                comfy.model_management.throw_exception_if_processing_interrupted()
                denoised = model_wrap(x, sigmas[i] * s_in, **extra_args)
                x = euler_step(x, velocity(x, denoised, sigma), previous, sigma)
                previous = sigma
                if i in self.keep:
                    self.saved[self.keep[i]] = self.staging.copy(x, torch.float32)
                self.progress.update(1)
            self.final = x.float().cpu()  # blocking: every earlier non-blocking copy has landed too
        finally:  # an interrupted run leaves no page-locked ring behind either
            self.staging.finish()
        return x


class FlowFixedPointSampler(FlowInversionSampler):
    """From the clean latent up the ascending editing ``levels``: at each, the latent the edit's Euler step maps to
    the previous one, by fixed point (``max_iterations``, ``tolerance``: :mod:`...tokenflow_ops.fixed_point`).

    Every chunk of frames (``frame_batch`` / device memory) iterates on its own: one model call for all of its
    frames per iteration and one scalar residual read per iteration from the second on.
    """

    def __init__(self, levels: list[float], keep: dict[int, int], guider: ChunkGuider, max_iterations: int,
                 tolerance: float) -> None:
        super().__init__(levels, keep)
        self.guider = guider
        self.max_iterations = max_iterations
        self.tolerance = tolerance
        self.evaluations: list[float] = []  # model evaluations per frame at each step (levels ascending)
        self.residuals: list[float | None] = []  # largest final residual over the chunks (None: one evaluation)

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        x = latent_image
        chunks = self.guider.chunks(x)
        self.guider.n_frames = x.shape[0]
        previous = 0.0
        try:
            for i, sigma in enumerate(self.levels):
                def solve(frames: range, x_chunk: torch.Tensor) -> StepSolution:
                    s_in = x.new_ones([len(frames)])

                    def velocity_at(latent: torch.Tensor) -> torch.Tensor:
                        comfy.model_management.throw_exception_if_processing_interrupted()
                        return velocity(latent, model_wrap(latent, sigmas[i] * s_in, **extra_args), sigma)

                    return solve_flow_inversion_step(velocity_at, x_chunk, previous, sigma, self.max_iterations,
                                                     self.tolerance)

                x, evaluations, residual = self.guider.solve_each_chunk(x, chunks, solve)
                self.evaluations.append(evaluations)
                self.residuals.append(residual)
                previous = sigma
                if i in self.keep:
                    self.saved[self.keep[i]] = self.staging.copy(x, torch.float32)
                self.progress.update(1)
            self.final = x.float().cpu()
        finally:  # an interrupted run leaves no page-locked ring behind either
            self.guider.chunk = None
            self.staging.finish()
        return x


class FlowExtractionSampler(comfy.samplers.Sampler):
    """Evaluates the model on the stored source latents of every step; ``x`` is returned unchanged.

    The pack's own loop, not a KSAMPLER: no noise scaling at either end (a CONST schedule that starts
    at sigma 1 would divide by zero in ``inverse_noise_scaling``).
    """

    def __init__(self, source: torch.Tensor, begin_step) -> None:
        self.source = source  # (steps, n, C, H, W) x_sigma at each editing sigma, CPU
        self.begin_step = begin_step

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        x = latent_image
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(sigmas)):
            comfy.model_management.throw_exception_if_processing_interrupted()
            self.begin_step(i)
            model_wrap(to_device(self.source[i], x.device, x.dtype), sigmas[i] * s_in,
                       **extra_args)
        return x
