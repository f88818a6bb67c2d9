"""Deterministic Euler sampling for flow-matching (CONST) models, in the pack's own loop.

:class:`FlowEulerSampler` runs ``x <- denoised + (x - denoised) * s_next / s`` on descending sigmas
(the last may be 0: the step then returns ``denoised``), with no noise scaling at either end, so a
start latent that already is x_sigma (an inverted latent) is used as it is.
"""
from __future__ import annotations

from typing import Callable

import torch

import comfy.model_management
import comfy.samplers

from ..tokenflow_ops.flow_inversion import euler_from_denoised


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
