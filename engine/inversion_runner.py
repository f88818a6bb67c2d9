"""DDIM inversion of every frame through ComfyUI's sampling path (the official preprocess.py ``ddim_inversion``)."""
from __future__ import annotations

import logging

import torch

import comfy.model_management
import comfy.samplers
import comfy.utils

from ..tokenflow_ops.inversion import ddim_inversion_step
from ..tokenflow_ops.schedule import alpha_bar_from_sigma, check_inversion_covers, editing_timesteps, inversion_timesteps
from .call_sizing import even_chunks, frames_per_call
from .frame_guider import FrameSubsetGuider, to_host
from .model_support import check_supported, frames_fingerprint, model_fingerprint
from ..data.products import TokenFlowInversion
from .validation import (check_conditioning, check_control_hints, check_frame_size_fits, check_latent_frames,
                         check_no_area, check_not_joint_edit_model)

log = logging.getLogger(__name__)


class FrameBatchGuider(FrameSubsetGuider):
    """Plain (cfg 1) prediction for the "positive" conds: every frame in one call when it fits.

    ``frame_batch`` > 0 caps the frames per call; the device's memory may split further.
    """

    def __init__(self, model_patcher, frame_batch: int) -> None:
        super().__init__(model_patcher)
        self.frame_batch = frame_batch

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


class _Recorder:
    def __init__(self, keep: list[int], timesteps: list[int], total: int) -> None:
        self.keep = {t: i for i, t in enumerate(keep)}
        self.timesteps = timesteps
        self.saved: dict[int, torch.Tensor] = {}
        self.final: torch.Tensor | None = None
        self.progress = comfy.utils.ProgressBar(total)


def _inversion_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, recorder: _Recorder = None,
                       abar_start: float = 1.0, host_sigmas: list[float] | None = None):
    """KSAMPLER function: x starts as the clean latent; sigmas are the ASCENDING inversion levels.

    ``host_sigmas`` are the same levels on the CPU, so no step reads a value back from the device.
    """
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    abar_prev = abar_start
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
            recorder.saved[t] = to_host(x, torch.float32)
        recorder.progress.update(1)
    recorder.final = x.float().cpu()  # blocking: every earlier non-blocking copy has landed too
    return x


@torch.no_grad()
def run_inversion(model, latent: dict, conditioning: list, steps: int, inversion_steps: int,
                  frame_batch: int = 0) -> TokenFlowInversion:
    layout = check_supported(model)
    check_inversion_covers(steps, inversion_steps)
    samples = check_latent_frames(latent, "latent", model.model.latent_format.latent_channels)
    check_not_joint_edit_model(model)
    check_conditioning(conditioning, model, "conditioning")
    check_no_area(conditioning, "conditioning", tuple(samples.shape[-2:]))
    check_frame_size_fits(model, tuple(samples.shape[1:]), "latent")
    check_control_hints(conditioning, samples.shape[0], "conditioning")
    sampling = model.get_model_object("model_sampling")
    model_sigmas = sampling.sigmas.float().cpu()
    edit_ts = editing_timesteps(steps)
    inv_ts = inversion_timesteps(inversion_steps)
    recorder = _Recorder(edit_ts, inv_ts, inversion_steps)
    guider = FrameBatchGuider(model.clone(), frame_batch)
    guider.inner_set_conds({"positive": conditioning})
    guider.set_cfg(1.0)
    sampler = comfy.samplers.KSAMPLER(_inversion_sampler, extra_options={
        "recorder": recorder, "abar_start": float(alpha_bar_from_sigma(model_sigmas[0].double())),
        "host_sigmas": model_sigmas[inv_ts].double().tolist()})
    sigmas = model_sigmas[inv_ts]
    x0 = model.model.process_latent_in(samples.float()).cpu()
    log.info("TokenFlow: inverting %d frames with %d DDIM steps", samples.shape[0], inversion_steps)
    guider.sample(torch.zeros_like(samples), samples.float(), sampler, sigmas, seed=0, disable_pbar=True)
    trajectory = torch.stack([recorder.saved[t] for t in edit_ts])
    return TokenFlowInversion(
        steps=steps, inversion_steps=inversion_steps, timesteps=edit_ts,
        sigmas=torch.cat([model_sigmas[edit_ts], model_sigmas[:1]]),
        trajectory=trajectory, x0=x0, inverted=recorder.final, inverted_timestep=inv_ts[-1],
        conditioning=[[c[0].cpu(), {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in c[1].items()}]
                      for c in conditioning],
        model_fingerprint=model_fingerprint(model), frames_fingerprint=frames_fingerprint(model, samples), family=layout.family,
    )


def inverted_latent_output(model, inversion: TokenFlowInversion) -> dict:
    """The fully inverted latent as a ComfyUI LATENT (sigma space, unscaled), like a KSampler's leftover noise."""
    sigma = inversion_sigma(model, inversion.inverted_timestep)
    abar = float(alpha_bar_from_sigma(sigma))
    return {"samples": model.model.process_latent_out(inversion.inverted / abar ** 0.5)}


def inversion_sigma(model, timestep: int) -> float:
    return float(model.get_model_object("model_sampling").sigmas[timestep].double())
