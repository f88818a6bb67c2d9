"""The TokenFlow edit on a flow-matching transformer (Flux, SD3.x): the shared editing step, the flow rule.

Everything the edit does per step (keyframe pass, propagation pass, the editor's StepNeeds,
call sizing) is :class:`~..sampling.edit_guider.TokenFlowGuider`'s; what differs is declared by the
family's layout and the flow rule:

- the model's attention is patched for image tokens (:mod:`..patches.dit`);
- the source branch's input at a step is the inverted x_sigma itself (CONST models see x_sigma);
- the start latent re-noises x0 with the inversion's final noise at the first editing sigma,
  x_s0 = (1 - s0) x0 + s0 eps, eps = (x_inv - (1 - s_inv) x0) / s_inv (the DDPM rule's start,
  restated; with inversion_steps == steps it is the inverted latent);
- the steps are deterministic Euler (:class:`~.samplers.FlowEulerSampler`) down to sigma 0;
- extracted correspondences (:mod:`.extract`) replace the source branch's nearest-neighbour
  search: SDEdit then runs no source branch, PnP only in the keyframe pass of its injection steps.

cfg: at cfg 1 ComfyUI skips the negative branch, so a step has two branches (source, edit) and
the negative input is unused; Flux-dev is guidance-distilled (guidance comes from FluxGuidance
in the conditioning), so cfg 1 is its setting. SD3.x uses cfg > 1 with a negative prompt.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch

from ...data.products import TokenFlowCorrespondences, TokenFlowInversion
from ...tokenflow_ops.flow_inversion import sigma_at
from ..checks import (Stage, attention_patches, control_hints, correspondences_match, correspondences_product,
                      each_prompt, editor_conditioning, flow_conditioning, guidance, inversion_fits, inversion_model,
                      inversion_prompt, no_area, not_joint_edit_model, run_checks, runs_on_frame_subsets,
                      supported_model, usable_conditioning)
from ..families.base import FLOW
from ..patches.install import patched_clone
from ..plan.edit_plan import clamp_batch_size, make_plan
from ..plan.memory_plan import check_edit_fits
from ..plan.settings import EditSettings
from ..sampling.edit_guider import TokenFlowGuider
from .samplers import FlowEulerSampler

log = logging.getLogger(__name__)


def _example_blocks(layout) -> str:
    kinds = dict.fromkeys(b[0] for b in layout.transformer_blocks)
    return ", ".join(f"'{kind}:0'" for kind in kinds)


def no_residual_blocks(stage: Stage) -> None:
    """A transformer has no ResBlocks: PnP's residual blocks must stay auto."""
    residual_blocks = str((stage.editor_options or {}).get("pnp_residual_blocks", "auto"))
    if residual_blocks.strip().lower() not in ("", "auto", "none"):
        raise ValueError(f"pnp_residual_blocks: a {stage.layout.family} model is a transformer without ResBlocks; set "
                         "it to auto (PnP on it injects attention features, chosen by pnp_attention_blocks, e.g. "
                         f"{_example_blocks(stage.layout)})")


# The flow edit's refusals in the order they must keep.
EDIT_CHECKS = (supported_model, not_joint_edit_model, runs_on_frame_subsets, guidance, attention_patches,
               inversion_model, inversion_fits, inversion_prompt,
               correspondences_product, correspondences_match,
               each_prompt(usable_conditioning, flow_conditioning, no_area, control_hints), editor_conditioning,
               no_residual_blocks)


class FlowTokenFlowGuider(TokenFlowGuider):
    """The TokenFlow guider with the flow rule's source input."""

    def source_latents(self, step: int) -> torch.Tensor:
        """The inverted x_sigma as it is."""
        return self.inversion.trajectory[self.plan.trajectory_steps[step]]


def start_latent(inversion: TokenFlowInversion, sigma_0: float, sigma_inv: float) -> torch.Tensor:
    x0 = inversion.x0.double()
    eps = (inversion.inverted.double() - (1.0 - sigma_inv) * x0) / sigma_inv
    return ((1.0 - sigma_0) * x0 + sigma_0 * eps).float()


def prepare_edit(model, positive, negative, inversion: TokenFlowInversion, settings: EditSettings,
                      correspondences: TokenFlowCorrespondences | None = None):
    """Validate everything (before any model call) and build the guider, sigmas and start latent."""
    stage = run_checks(Stage(model, FLOW, prompts=(("positive", positive), ("negative", negative)), inversion=inversion,
                             correspondences=correspondences, editor=settings.editor,
                             editor_options=settings.editor_options), EDIT_CHECKS)
    layout = stage.layout
    settings = replace(settings, batch_size=clamp_batch_size(settings.batch_size, inversion.n_frames))
    plan = make_plan(settings, inversion, layout, model.model.diffusion_model, correspondences)
    check_edit_fits(model, layout, plan, inversion.latent_shape, positive, negative, inversion.conditioning)
    by_timestep = dict(zip(inversion.timesteps, inversion.sigmas.double().tolist()))
    levels = [by_timestep[t] for t in plan.timesteps] + [0.0]
    sigmas = torch.tensor(levels)
    guider = FlowTokenFlowGuider(patched_clone(model, layout), inversion, plan, sigmas)
    guider.set_cfg(settings.cfg)
    table = model.get_model_object("model_sampling").sigmas.float().cpu()
    start = start_latent(inversion, levels[0], sigma_at(table, inversion.inverted_timestep))
    return guider, levels, start


@torch.no_grad()
def run_edit(model, positive, negative, inversion: TokenFlowInversion, settings: EditSettings,
                  correspondences: TokenFlowCorrespondences | None = None, callback=None,
                  trace: list | None = None) -> dict:
    """Run the TokenFlow edit on a Flux / SD3.x model; returns a LATENT (the DDPM rule's ``run_edit``'s signature)."""
    guider, levels, start = prepare_edit(model, positive, negative, inversion, settings, correspondences)
    latent_image = model.model.process_latent_out(start)
    sampler = FlowEulerSampler(levels, begin_step=guider.begin_step)
    log.info("TokenFlow: editing %d frames on a %s model, %s editor, %d steps", inversion.n_frames,
             inversion.family, settings.editor, len(levels) - 1)
    samples = guider.edit(positive, negative, latent_image, sampler, torch.tensor(levels), callback, settings.seed,
                          trace)
    return {"samples": samples.cpu()}
