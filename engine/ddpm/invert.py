"""Inversion of every frame of a DDPM UNet's video through ComfyUI's sampling path.

Two methods: ``ddim``, the official preprocess.py ``ddim_inversion`` on its own fine grid
(``inversion_steps``), and ``fixed_point``, the exact inversion on the editing grid (each implicit DDIM
step solved by fixed-point iteration, ``tokenflow_ops.fixed_point``), whose saved x_t are what the
editing sampler maps back to the source.
"""
from __future__ import annotations

import logging

import torch

import comfy.samplers

from ...data.products import TokenFlowInversion
from ...tokenflow_ops import schedule
from ...tokenflow_ops.fixed_point import DEFAULT_MAX_ITERATIONS, DEFAULT_TOLERANCE, report_convergence, resolve_method
from ...tokenflow_ops.schedule import alpha_bar_from_sigma, editing_timesteps, inversion_timesteps
from ..checks import (Stage, control_hints, each_prompt, every_step, latent_fits, latent_frames, model_identity,
                      no_area, not_joint_edit_model, run_checks, runs_on_frame_subsets, supported_model,
                      usable_conditioning)
from ..families.base import DDPM
from ..families.fingerprints import frames_fingerprint
from ..sampling.inversion_guiders import ChunkGuider, FrameBatchGuider
from .edit import start_latent
from .samplers import InversionRecorder, ddim_sampler, fixed_point_sampler, inversion_sampler

log = logging.getLogger(__name__)


def check_inversion_settings(steps: int, inversion_steps: int, method: str, max_iterations: int,
                             tolerance: float) -> None:
    """Every refusal of the inversion's own settings, before any model call."""
    schedule.check_inversion_settings(steps, inversion_steps, method, max_iterations, tolerance, flow=False)


@torch.no_grad()
def run_inversion(model, latent: dict, conditioning: list, steps: int, inversion_steps: int,
                  frame_batch: int = 0, method: str = "ddim", max_iterations: int = DEFAULT_MAX_ITERATIONS,
                  tolerance: float = DEFAULT_TOLERANCE) -> TokenFlowInversion:
    """Invert every frame; ``method`` "ddim" (or "auto") on the grid of ``inversion_steps``, "fixed_point" on that of
    ``steps`` (``inversion_steps`` is then not used)."""
    def settings(stage: Stage) -> None:
        check_inversion_settings(steps, inversion_steps, method, max_iterations, tolerance)

    stage = run_checks(Stage(model, DDPM, prompts=(("conditioning", conditioning),), latent=latent), (
        supported_model, settings, latent_frames, not_joint_edit_model, runs_on_frame_subsets,
        each_prompt(usable_conditioning, no_area, every_step), latent_fits, each_prompt(control_hints), model_identity))
    layout, samples = stage.layout, stage.samples
    sampling = model.get_model_object("model_sampling")
    model_sigmas = sampling.sigmas.float().cpu()
    method = resolve_method(method, flow=False)
    fixed_point = method == "fixed_point"
    if fixed_point:
        inversion_steps = steps
    edit_ts = editing_timesteps(steps)
    inv_ts = inversion_timesteps(inversion_steps)
    recorder = InversionRecorder(edit_ts, inv_ts, inversion_steps)
    guider = (ChunkGuider if fixed_point else FrameBatchGuider)(model.clone(), frame_batch)
    guider.inner_set_conds({"positive": conditioning})
    guider.set_cfg(1.0)
    options = {"recorder": recorder, "abar_start": float(alpha_bar_from_sigma(model_sigmas[0].double())),
               "host_sigmas": model_sigmas[inv_ts].double().tolist()}
    if fixed_point:
        options.update(guider=guider, max_iterations=max_iterations, tolerance=tolerance)
    sampler = comfy.samplers.KSAMPLER(fixed_point_sampler if fixed_point else inversion_sampler,
                                      extra_options=options)
    sigmas = model_sigmas[inv_ts]
    x0 = model.model.process_latent_in(samples.float()).cpu()
    if fixed_point:
        log.info("TokenFlow: inverting %d frames by fixed point on the %d editing steps (at most %d evaluations "
                 "per step, tolerance %g; inversion_steps is not used)", samples.shape[0], steps, max_iterations,
                 tolerance)
    else:
        log.info("TokenFlow: inverting %d frames with %d DDIM steps", samples.shape[0], inversion_steps)
    guider.sample(torch.zeros_like(samples), samples.float(), sampler, sigmas, seed=0, disable_pbar=True)
    trajectory = torch.stack([recorder.saved[t] for t in edit_ts])
    if fixed_point:  # the residuals run with the steps, t ascending
        report_convergence(recorder.evaluations, recorder.residuals, inv_ts, max_iterations, tolerance)
    return TokenFlowInversion(
        steps=steps, inversion_steps=inversion_steps, timesteps=edit_ts,
        sigmas=torch.cat([model_sigmas[edit_ts], model_sigmas[:1]]),
        trajectory=trajectory, x0=x0, inverted=recorder.final, inverted_timestep=inv_ts[-1],
        conditioning=[[c[0].cpu(), {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in c[1].items()}]
                      for c in conditioning],
        model_fingerprint=stage.fingerprint, frames_fingerprint=frames_fingerprint(model, samples), family=layout.family,
        method=method, max_iterations=max_iterations if fixed_point else 0, tolerance=tolerance if fixed_point else 0.0,
        evaluations=recorder.evaluations, residuals=recorder.residuals,
    )


def inverted_latent_output(model, inversion: TokenFlowInversion) -> dict:
    """The fully inverted latent as a ComfyUI LATENT (sigma space, unscaled), like a KSampler's leftover noise."""
    sigma = inversion_sigma(model, inversion.inverted_timestep)
    abar = float(alpha_bar_from_sigma(sigma))
    return {"samples": model.model.process_latent_out(inversion.inverted / abar ** 0.5)}


def inversion_sigma(model, timestep: int) -> float:
    return float(model.get_model_object("model_sampling").sigmas[timestep].double())


@torch.no_grad()
def reconstruct(model, inversion: TokenFlowInversion, frame_batch: int = 0) -> torch.Tensor:
    """The editing sampler run back from the inversion (deterministic DDIM, cfg 1, the inversion prompt) to x0.

    Starts where an edit starts (:func:`.edit.start_latent` at the first editing timestep) and walks the
    inversion's ``steps`` editing timesteps; returns scaled DDPM-space latents comparable with ``inversion.x0``.
    """
    sigmas_all = model.get_model_object("model_sampling").sigmas.float().cpu()
    sigmas = torch.cat([sigmas_all[inversion.timesteps], sigmas_all[:1]])
    start = start_latent(inversion, sigmas_all, inversion.timesteps[0])
    abar_first = float(alpha_bar_from_sigma(sigmas[0].double()))
    guider = FrameBatchGuider(model.clone(), frame_batch)
    guider.inner_set_conds({"positive": inversion.conditioning})
    guider.set_cfg(1.0)
    latent_image = model.model.process_latent_out(start / abar_first ** 0.5)
    sampler = comfy.samplers.KSAMPLER(ddim_sampler, extra_options={"begin_step": lambda step: None})
    out = guider.sample(torch.zeros_like(latent_image), latent_image, sampler, sigmas, seed=0, disable_pbar=True)
    final_abar = float(alpha_bar_from_sigma(sigmas[-1].double()))
    return model.model.process_latent_in(out.cpu()) * final_abar ** 0.5
