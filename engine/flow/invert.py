"""Flow inversion of every frame for flow-matching (CONST) models (Flux, SD3.x), on the inversion prompt.

Two methods, as on the SD UNets:

- ``ddim``: every frame goes from its clean latent x0 (sigma 0) up the model's own sigma schedule with
  ``inversion_steps`` deterministic Euler steps, each evaluated at the next sigma (the analogue of the official
  DDIM inversion; :class:`~.samplers.FlowInversionSampler`), x_sigma kept at every editing timestep;
- ``fixed_point`` (what ``auto`` means here): the exact inverse of the edit's own Euler sampler on the editing
  grid, each implicit step solved by fixed-point iteration (:class:`~.samplers.FlowFixedPointSampler`), so the
  edit's sampler maps the saved latents back to the source (to the tolerance) with at most ``max_iterations``
  evaluations per editing step.

Guidance: the sampler runs the "positive" conds alone (cfg 1), so Flux-dev's distilled
guidance is what the conditioning carries (FluxGuidance, default 3.5) and no negative is used.
"""
from __future__ import annotations

import logging

import torch

from ...data.products import TokenFlowInversion
from ...tokenflow_ops import schedule
from ...tokenflow_ops.fixed_point import DEFAULT_MAX_ITERATIONS, DEFAULT_TOLERANCE, report_convergence, resolve_method
from ...tokenflow_ops.flow_inversion import sigma_at
from ...tokenflow_ops.schedule import editing_timesteps, inversion_timesteps
from ..checks import (Stage, control_hints, each_prompt, every_step, flow_conditioning, latent_fits, latent_frames,
                      model_identity, no_area, not_joint_edit_model, run_checks, runs_on_frame_subsets,
                      supported_model, usable_conditioning)
from ..families.base import FLOW
from ..families.fingerprints import frames_fingerprint
from ..sampling.inversion_guiders import ChunkGuider, FrameBatchGuider
from .edit import start_latent
from .samplers import FlowEulerSampler, FlowFixedPointSampler, FlowInversionSampler

log = logging.getLogger(__name__)


def check_inversion_settings(steps: int, inversion_steps: int, method: str, max_iterations: int,
                             tolerance: float) -> None:
    """Every refusal of the inversion's own settings, before any model call."""
    schedule.check_inversion_settings(steps, inversion_steps, method, max_iterations, tolerance, flow=True)


@torch.no_grad()
def run_inversion(model, latent: dict, conditioning: list, steps: int, inversion_steps: int,
                  frame_batch: int = 0, method: str = "ddim", max_iterations: int = DEFAULT_MAX_ITERATIONS,
                  tolerance: float = DEFAULT_TOLERANCE) -> TokenFlowInversion:
    """Invert every frame; ``method`` "ddim": ``inversion_steps`` Euler steps, "fixed_point" (or "auto"): the exact
    inverse of the edit's sampler on the grid of ``steps`` (``inversion_steps`` is then not used); x kept at the
    ``steps`` editing levels."""
    def settings(stage: Stage) -> None:
        check_inversion_settings(steps, inversion_steps, method, max_iterations, tolerance)

    stage = run_checks(Stage(model, FLOW, prompts=(("conditioning", conditioning),), latent=latent), (
        supported_model, settings, latent_frames, not_joint_edit_model, runs_on_frame_subsets,
        each_prompt(usable_conditioning, flow_conditioning, control_hints, no_area, every_step), latent_fits,
        model_identity))
    layout, samples = stage.layout, stage.samples
    method = resolve_method(method, flow=True)
    fixed_point = method == "fixed_point"
    if fixed_point:
        inversion_steps = steps
    table = model.get_model_object("model_sampling").sigmas.float().cpu()
    edit_ts, inv_ts = editing_timesteps(steps), inversion_timesteps(inversion_steps)
    levels = [sigma_at(table, t) for t in inv_ts]
    row_of = {t: row for row, t in enumerate(edit_ts)}
    keep = {i: row_of[t] for i, t in enumerate(inv_ts) if t in row_of}
    guider = (ChunkGuider if fixed_point else FrameBatchGuider)(model.clone(), frame_batch)
    guider.inner_set_conds({"positive": conditioning})
    guider.set_cfg(1.0)
    x0 = model.model.process_latent_in(samples.float()).cpu()
    if fixed_point:
        sampler = FlowFixedPointSampler(levels, keep, guider, max_iterations, tolerance)
        log.info("TokenFlow: flow inversion of %d frames by fixed point on the %d editing steps (at most %d "
                 "evaluations per step, tolerance %g; inversion_steps is not used)", samples.shape[0], steps,
                 max_iterations, tolerance)
    else:
        sampler = FlowInversionSampler(levels, keep)
        log.info("TokenFlow: flow inversion of %d frames, %d Euler steps up to sigma %.4f", samples.shape[0],
                 inversion_steps, levels[-1])
    guider.sample(torch.zeros_like(samples), samples.float(), sampler, torch.tensor(levels), seed=0,
                  disable_pbar=True)
    if fixed_point:
        report_convergence(sampler.evaluations, sampler.residuals, inv_ts, max_iterations, tolerance)
    return TokenFlowInversion(
        steps=steps, inversion_steps=inversion_steps, timesteps=edit_ts,
        sigmas=torch.tensor([sigma_at(table, t) for t in edit_ts] + [0.0]),
        trajectory=torch.stack([sampler.saved[row] for row in range(len(edit_ts))]), x0=x0,
        inverted=sampler.final, inverted_timestep=inv_ts[-1],
        conditioning=[[c[0].cpu(), {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in c[1].items()}]
                      for c in conditioning],
        model_fingerprint=stage.fingerprint, frames_fingerprint=frames_fingerprint(model, samples),
        family=layout.family, method=method, max_iterations=max_iterations if fixed_point else 0,
        tolerance=tolerance if fixed_point else 0.0, evaluations=sampler.evaluations if fixed_point else [],
        residuals=sampler.residuals if fixed_point else [],
    )


def inverted_latent_output(model, inversion: TokenFlowInversion) -> dict:
    """The fully inverted latent x_sigma as a ComfyUI LATENT (a flow model's x_sigma needs no rescaling)."""
    return {"samples": model.model.process_latent_out(inversion.inverted)}


@torch.no_grad()
def reconstruct(model, inversion: TokenFlowInversion) -> torch.Tensor:
    """The edit's own sampler (Euler down the inversion's editing levels from the edit's start latent, cfg 1, the
    inversion prompt, no TokenFlow) run back to sigma 0; model-space latents comparable with ``inversion.x0``."""
    levels = inversion.sigmas.double().tolist()
    table = model.get_model_object("model_sampling").sigmas.float().cpu()
    start = start_latent(inversion, levels[0], sigma_at(table, inversion.inverted_timestep))
    guider = FrameBatchGuider(model.clone(), 0)
    guider.inner_set_conds({"positive": inversion.conditioning})
    guider.set_cfg(1.0)
    latent_image = model.model.process_latent_out(start)
    out = guider.sample(torch.zeros_like(latent_image), latent_image, FlowEulerSampler(levels),
                        torch.tensor(levels), seed=0, disable_pbar=True)
    return model.model.process_latent_in(out.cpu())
