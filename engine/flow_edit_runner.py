"""The TokenFlow edit on a flow-matching transformer (Flux, SD3.x): the same guider, the flow sampling rule.

Everything the UNet edit does per step (keyframe pass, propagation pass, the editor's StepNeeds,
call sizing) is :class:`~.tokenflow_runner.TokenFlowGuider`'s; what differs is declared by the
family's layout and the flow rule:

- the model's attention is patched by :func:`~.dit_attention.install_dit_patches` (image tokens
  only, see there);
- the source branch's input at a step is the inverted x_sigma itself (CONST models see x_sigma);
- the start latent re-noises x0 with the inversion's final noise at the first editing sigma,
  x_s0 = (1 - s0) x0 + s0 eps, eps = (x_inv - (1 - s_inv) x0) / s_inv (the DDPM path's rule,
  restated; with inversion_steps == steps it is the inverted latent);
- the steps are deterministic Euler (:class:`~.flow_sampling.FlowEulerSampler`) down to sigma 0;
- extracted correspondences (:mod:`.dit_extraction`) replace the source branch's nearest-neighbour
  search: SDEdit then runs no source branch, PnP only in the keyframe pass of its injection steps.

cfg: at cfg 1 ComfyUI skips the negative branch, so a step has two branches (source, edit) and
the negative input is unused; Flux-dev is guidance-distilled (guidance comes from FluxGuidance
in the conditioning), so cfg 1 is its setting. SD3.x uses cfg > 1 with a negative prompt.
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch

from ..data.products import TokenFlowCorrespondences, TokenFlowInversion
from ..tokenflow_ops.flow_inversion import sigma_at
from .patched_model import patched_clone
from .edit_plan import EditSettings, make_plan
from .editors import get_editor
from .flow_inversion_runner import check_flow_conditioning
from .flow_sampling import FlowEulerSampler
from .model_support import FLOW, check_supported, model_fingerprint
from .tokenflow_runner import SOURCE, TokenFlowGuider
from .validation import (check_conditioning, check_control_hints, check_correspondences, check_inversion_model,
                         check_no_area, check_not_joint_edit_model, clamp_batch_size)

log = logging.getLogger(__name__)


class FlowTokenFlowGuider(TokenFlowGuider):
    """The TokenFlow guider with the flow rule's source input (x_sigma as it is)."""

    def source_latents(self, step: int) -> torch.Tensor:
        return self.inversion.trajectory[self.plan.trajectory_steps[step]]


def flow_start_latent(inversion: TokenFlowInversion, sigma_0: float, sigma_inv: float) -> torch.Tensor:
    x0 = inversion.x0.double()
    eps = (inversion.inverted.double() - (1.0 - sigma_inv) * x0) / sigma_inv
    return ((1.0 - sigma_0) * x0 + sigma_0 * eps).float()


def _example_blocks(layout) -> str:
    kinds = dict.fromkeys(b[0] for b in layout.transformer_blocks)
    return ", ".join(f"'{kind}:0'" for kind in kinds)


def prepare_flow_edit(model, positive, negative, inversion: TokenFlowInversion, settings: EditSettings,
                      correspondences: TokenFlowCorrespondences | None = None):
    """Validate everything (before any model call) and build the guider, sigmas and start latent."""
    layout = check_supported(model, sampling=FLOW)
    check_not_joint_edit_model(model)
    fingerprint = model_fingerprint(model)
    check_inversion_model(inversion, fingerprint)
    if correspondences is not None:  # another model's, video's or step count's: refused by their fingerprints
        if not isinstance(correspondences, TokenFlowCorrespondences):
            raise ValueError("correspondences: expected the output of TokenFlow Extract Correspondences (or Load "
                             f"Correspondences), got {type(correspondences).__name__}; connect that node's output")
        check_correspondences(correspondences, inversion, fingerprint)
    for name, conditioning in (("positive", positive), ("negative", negative)):
        check_conditioning(conditioning, model, name)
        check_flow_conditioning(conditioning, model, name)
        check_no_area(conditioning, name, inversion.latent_shape[-2:])
        check_control_hints(conditioning, inversion.n_frames, name)
    get_editor(settings.editor).check_conditioning(positive, negative)
    residual_blocks = str(settings.editor_options.get("pnp_residual_blocks", "auto"))
    if residual_blocks.strip().lower() not in ("", "auto", "none"):
        raise ValueError(f"pnp_residual_blocks: a {layout.family} model is a transformer without ResBlocks; set it "
                         "to auto (PnP on it injects attention features, chosen by pnp_attention_blocks, e.g. "
                         f"{_example_blocks(layout)})")
    settings = replace(settings, batch_size=clamp_batch_size(settings.batch_size, inversion.n_frames))
    plan = make_plan(settings, inversion, layout, model.model.diffusion_model, correspondences)
    by_timestep = dict(zip(inversion.timesteps, inversion.sigmas.double().tolist()))
    levels = [by_timestep[t] for t in plan.timesteps] + [0.0]
    sigmas = torch.tensor(levels)
    guider = FlowTokenFlowGuider(patched_clone(model, layout), inversion, plan, sigmas)
    guider.set_cfg(settings.cfg)
    table = model.get_model_object("model_sampling").sigmas.float().cpu()
    start = flow_start_latent(inversion, levels[0], sigma_at(table, inversion.inverted_timestep))
    return guider, levels, start


@torch.no_grad()
def run_flow_edit(model, positive, negative, inversion: TokenFlowInversion, settings: EditSettings,
                  correspondences: TokenFlowCorrespondences | None = None, callback=None, trace: list | None = None) -> dict:
    """Run the TokenFlow edit on a Flux / SD3.x model; returns a LATENT (``run_edit``'s signature)."""
    guider, levels, start = prepare_flow_edit(model, positive, negative, inversion, settings, correspondences)
    guider.trace = trace
    guider.inner_set_conds({"positive": positive, "negative": negative, SOURCE: inversion.conditioning})
    latent_image = model.model.process_latent_out(start)
    sampler = FlowEulerSampler(levels, begin_step=guider.begin_step)
    log.info("TokenFlow: editing %d frames on a %s model, %s editor, %d steps", inversion.n_frames,
             inversion.family, settings.editor, len(levels) - 1)
    samples = guider.sample(torch.zeros_like(latent_image), latent_image, sampler, torch.tensor(levels),
                            callback=callback, seed=settings.seed, disable_pbar=True)
    return {"samples": samples.cpu()}
