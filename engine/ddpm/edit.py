"""The TokenFlow edit on a DDPM UNet (SD1.x, SD2.x, SDXL): the shared editing step, the DDIM rule.

What the rule adds to :class:`~..sampling.edit_guider.TokenFlowGuider`: the source branch's input at a step
is the inverted x_t in ComfyUI's sigma space; the edit starts from x0 re-noised with the inversion's final
noise at the first editing timestep (the official code's start); the steps are deterministic DDIM.
"""
from __future__ import annotations

import logging

import torch

import comfy.samplers

from ...data.products import TokenFlowCorrespondences, TokenFlowInversion
from ...tokenflow_ops.inversion import add_noise, ddim_noise
from ...tokenflow_ops.schedule import alpha_bar_from_sigma
from ..checks import (RUN_ON_INVERSION, Stage, control_hints, correspondences_match, each_prompt, editor_conditioning,
                      no_area, run_checks, usable_conditioning)
from ..families.base import DDPM
from ..patches.install import patched_clone
from ..plan.edit_plan import make_plan
from ..plan.memory_plan import check_edit_fits
from ..plan.settings import EditSettings
from ..sampling.edit_guider import TokenFlowGuider
from .samplers import ddim_sampler

log = logging.getLogger(__name__)

# The edit's refusals in the order they must keep: the run on an inversion (the model's guidance included), each
# prompt, the editor's, the correspondences.
EDIT_CHECKS = (*RUN_ON_INVERSION, each_prompt(usable_conditioning, no_area, control_hints), editor_conditioning,
               correspondences_match)


def _abar(sigma: float | torch.Tensor) -> float:
    return float(alpha_bar_from_sigma(sigma))  # the one sigma -> alpha_bar rule, as a Python float


class DDPMTokenFlowGuider(TokenFlowGuider):
    """The TokenFlow guider with the DDPM rule's source input."""

    def source_latents(self, step: int) -> torch.Tensor:
        """The inverted x_t in ComfyUI's sigma space."""
        return self.inversion.trajectory[self.plan.trajectory_steps[step]] / _abar(self.step_sigmas[step]) ** 0.5


def start_latent(inversion: TokenFlowInversion, sigmas_all: torch.Tensor, first_timestep: int) -> torch.Tensor:
    """DDPM-space start: sqrt(abar_t0) x0 + sqrt(1-abar_t0) eps_T, eps_T from the fully inverted latent."""
    abar_inv = _abar(float(sigmas_all[inversion.inverted_timestep].double()))
    abar_0 = _abar(float(sigmas_all[first_timestep].double()))
    noise = ddim_noise(inversion.inverted, inversion.x0, abar_inv)
    return add_noise(inversion.x0, noise, abar_0)


def prepare_edit(model, positive, negative, inversion: TokenFlowInversion, settings: EditSettings,
                 correspondences: TokenFlowCorrespondences | None):
    """Validate everything and build the guider, sigmas and start latent before any heavy work."""
    stage = run_checks(Stage(model, DDPM, prompts=(("positive", positive), ("negative", negative)), inversion=inversion,
                             correspondences=correspondences, editor=settings.editor), EDIT_CHECKS)
    layout = stage.layout
    sigmas_all = model.get_model_object("model_sampling").sigmas.float().cpu()
    plan = make_plan(settings, inversion, layout, model.model.diffusion_model, correspondences)
    check_edit_fits(model, layout, plan, inversion.latent_shape, positive, negative, inversion.conditioning)
    sigmas = torch.cat([sigmas_all[plan.timesteps], sigmas_all[:1]])
    guider = DDPMTokenFlowGuider(patched_clone(model, layout), inversion, plan, sigmas)
    guider.set_cfg(settings.cfg)
    start = start_latent(inversion, sigmas_all, plan.timesteps[0])
    return guider, sigmas, start


@torch.no_grad()
def run_edit(model, positive, negative, inversion: TokenFlowInversion, settings: EditSettings,
             correspondences: TokenFlowCorrespondences | None = None, callback=None, trace: list | None = None) -> dict:
    """Run the edit; ``trace`` (a list) receives (timestep, kind, where, phase) for every PnP injection."""
    guider, sigmas, start = prepare_edit(model, positive, negative, inversion, settings, correspondences)
    start_model_space = start / _abar(float(sigmas[0].double())) ** 0.5
    latent_image = model.model.process_latent_out(start_model_space)
    sampler = comfy.samplers.KSAMPLER(ddim_sampler, extra_options={"begin_step": guider.begin_step})
    log.info("TokenFlow: editing %d frames, %s editor, %d steps", inversion.n_frames, settings.editor, len(sigmas) - 1)
    samples = guider.edit(positive, negative, latent_image, sampler, sigmas, callback, settings.seed, trace)
    final_abar = _abar(float(sigmas[-1].double()))
    return {"samples": samples.cpu() * final_abar ** 0.5}
