"""Flow inversion of every frame for flow-matching (CONST) models (Flux, SD3.x): Euler on ascending sigmas.

Every frame goes from its clean latent x0 (sigma 0) up the model's own sigma schedule with
deterministic Euler steps, each evaluated at the next sigma (the analogue of the official DDIM
inversion), on the inversion prompt; x_sigma is kept at every editing timestep
(:class:`~.samplers.FlowInversionSampler`, the pack's own loop).

Guidance: the sampler runs the "positive" conds alone (cfg 1), so Flux-dev's distilled
guidance is what the conditioning carries (FluxGuidance, default 3.5) and no negative is used.
"""
from __future__ import annotations

import logging

import torch

from ...data.products import TokenFlowInversion
from ...tokenflow_ops.flow_inversion import sigma_at
from ...tokenflow_ops.schedule import check_inversion_covers, editing_timesteps, inversion_timesteps
from ..checks import (Stage, control_hints, each_prompt, every_step, flow_conditioning, latent_fits, latent_frames,
                      model_identity, no_area, not_joint_edit_model, run_checks, runs_on_frame_subsets,
                      supported_model, usable_conditioning)
from ..families.base import FLOW
from ..families.fingerprints import frames_fingerprint
from ..sampling.inversion_guiders import FrameBatchGuider
from .samplers import FlowInversionSampler

log = logging.getLogger(__name__)


def check_inversion_settings(steps: int, inversion_steps: int, method: str, family: str) -> None:
    """The refusals of a flow inversion's own settings, before any model call."""
    if method != "ddim":
        raise ValueError(f"method: {method!r} inverts SD UNets (DDIM); a {family} model is inverted by Euler "
                         "steps on its own sigmas: set method to ddim (inversion_steps then sets the Euler steps)")
    check_inversion_covers(steps, inversion_steps)


@torch.no_grad()
def run_inversion(model, latent: dict, conditioning: list, steps: int, inversion_steps: int,
                       frame_batch: int = 0, method: str = "ddim", max_iterations: int = 0,
                       tolerance: float = 0.0) -> TokenFlowInversion:
    """Invert every frame of ``latent`` with ``inversion_steps`` Euler steps; keep x at the ``steps`` editing levels.

    ``method`` must be "ddim" (the step-wise inversion: Euler here); ``max_iterations`` / ``tolerance`` belong to
    the UNets' fixed-point method and are not used."""
    def settings(stage: Stage) -> None:
        check_inversion_settings(steps, inversion_steps, method, stage.layout.family)

    stage = run_checks(Stage(model, FLOW, prompts=(("conditioning", conditioning),), latent=latent), (
        supported_model, settings, latent_frames, not_joint_edit_model, runs_on_frame_subsets,
        each_prompt(usable_conditioning, flow_conditioning, control_hints, no_area, every_step), latent_fits,
        model_identity))
    layout, samples = stage.layout, stage.samples
    table = model.get_model_object("model_sampling").sigmas.float().cpu()
    edit_ts, inv_ts = editing_timesteps(steps), inversion_timesteps(inversion_steps)
    levels = [sigma_at(table, t) for t in inv_ts]
    row_of = {t: row for row, t in enumerate(edit_ts)}
    sampler = FlowInversionSampler(levels, {i: row_of[t] for i, t in enumerate(inv_ts) if t in row_of})
    guider = FrameBatchGuider(model.clone(), frame_batch)
    guider.inner_set_conds({"positive": conditioning})
    guider.set_cfg(1.0)
    x0 = model.model.process_latent_in(samples.float()).cpu()
    log.info("TokenFlow: flow inversion of %d frames, %d Euler steps up to sigma %.4f", samples.shape[0],
             inversion_steps, levels[-1])
    guider.sample(torch.zeros_like(samples), samples.float(), sampler, torch.tensor(levels), seed=0,
                  disable_pbar=True)
    return TokenFlowInversion(
        steps=steps, inversion_steps=inversion_steps, timesteps=edit_ts,
        sigmas=torch.tensor([sigma_at(table, t) for t in edit_ts] + [0.0]),
        trajectory=torch.stack([sampler.saved[row] for row in range(len(edit_ts))]), x0=x0,
        inverted=sampler.final, inverted_timestep=inv_ts[-1],
        conditioning=[[c[0].cpu(), {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in c[1].items()}]
                      for c in conditioning],
        model_fingerprint=stage.fingerprint, frames_fingerprint=frames_fingerprint(model, samples),
        family=layout.family,
    )


def inverted_latent_output(model, inversion: TokenFlowInversion) -> dict:
    """The fully inverted latent x_sigma as a ComfyUI LATENT (a flow model's x_sigma needs no rescaling)."""
    return {"samples": model.model.process_latent_out(inversion.inverted)}
