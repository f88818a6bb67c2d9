"""The guiders of an inversion: a plain (cfg 1) prediction of the inversion prompt on every frame.

:class:`FrameBatchGuider` evaluates the whole clip per step, every frame in one call when it fits;
:class:`ChunkGuider` can also evaluate one chunk of frames at a time, for inversions whose every chunk
iterates on its own (the fixed-point inversions of both sampling rules).
"""
from __future__ import annotations

from typing import Callable

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.samplers

from ...tokenflow_ops.fixed_point import StepSolution
from ..plan.call_sizing import even_chunks, frames_per_call
from .frame_guider import FrameSubsetGuider


class FrameBatchGuider(FrameSubsetGuider):
    """Plain (cfg 1) prediction for the "positive" conds: every frame in one call when it fits.

    ``frame_batch`` > 0 caps the frames per call; the device's memory may split further.
    """

    def __init__(self, model_patcher, frame_batch: int) -> None:
        super().__init__(model_patcher)
        self.frame_batch = frame_batch

    def largest_call_images(self, n_frames: int) -> int:
        """Calls split down to one frame: the user's ``frame_batch`` frames, or one (more when memory allows)."""
        return min(n_frames, self.frame_batch) if self.frame_batch > 0 else 1

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        n = x.shape[0]
        per_call = frames_per_call(self.inner_model, 1, tuple(x.shape[1:]), x.device, n, cap=self.frame_batch)
        if per_call >= n:
            (out,) = self.calc_on_frames(["positive"], x, timestep, range(n), model_options, None, n)
            return out
        out = torch.empty_like(x)
        for frames in even_chunks(n, per_call):
            (out[frames.start:frames.stop],) = self.calc_on_frames(["positive"], x, timestep, frames, model_options,
                                                                   None, n)
        return out


class ChunkGuider(FrameBatchGuider):
    """FrameBatchGuider that can also evaluate ONE chunk of frames: the sampler passes only that chunk's latents.

    ``chunk`` (set by the sampler before each call) says which frames of the clip the input holds,
    so per-frame conds (ControlNet hints, per-frame prompts) follow them.
    """

    def __init__(self, model_patcher, frame_batch: int) -> None:
        super().__init__(model_patcher, frame_batch)
        self.chunk: range | None = None
        self.n_frames = 0

    def chunks(self, x: torch.Tensor) -> list[range]:
        n = x.shape[0]
        per_call = frames_per_call(self.inner_model, 1, tuple(x.shape[1:]), x.device, n, cap=self.frame_batch)
        return even_chunks(n, per_call)

    def solve_each_chunk(self, x: torch.Tensor, chunks: list[range],
                         solve: Callable[[range, torch.Tensor], StepSolution]) -> tuple[torch.Tensor, float, float | None]:
        """One implicit step for every chunk on its own: ``solve(frames, x_chunk)`` with ``chunk`` set to those frames.

        Returns the solved latents, the evaluations per frame and the largest final residual over the chunks (None
        when no chunk took two evaluations)."""
        out = torch.empty_like(x)
        evaluations, residuals = 0, []
        for frames in chunks:
            self.chunk = frames
            solved = solve(frames, x[frames.start:frames.stop])
            out[frames.start:frames.stop] = solved.x
            evaluations += solved.evaluations * len(frames)
            if solved.residuals:
                residuals.append(solved.residual)
        return out, evaluations / x.shape[0], (max(residuals) if residuals else None)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        if self.chunk is None or x.shape[0] == self.n_frames:
            return super().predict_noise(x, timestep, model_options, seed)
        comfy.model_management.throw_exception_if_processing_interrupted()
        options = comfy.model_patcher.create_model_options_clone(model_options)
        options.pop("context_handler", None)
        conds = self.conds_for("positive", self.chunk, self.n_frames, True, {})
        (out,) = comfy.samplers.calc_cond_batch(self.inner_model, [conds], x, timestep, options)
        return out
