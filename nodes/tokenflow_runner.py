"""The TokenFlow editing loop inside ComfyUI's sampler (spec section 3).

``TokenFlowGuider.predict_noise`` is called once per DDIM step with the whole clip. It runs the
keyframe pass (source branch, then the edit branches with extended attention) and then, batch
by batch, the propagation passes, and returns the CFG-combined prediction for every frame.
"""
from __future__ import annotations

import logging
import math

import torch

import comfy.model_management
import comfy.samplers
import comfy.utils

from ..tokenflow_ops.inversion import add_noise, ddim_noise
from ..tokenflow_ops.keyframes import batch_ranges
from .attention_patches import PassContext, Phase, StepBank, install_tokenflow_patches
from .edit_plan import EditPlan, EditSettings, make_plan
from .frame_guider import FrameSubsetGuider
from .model_support import check_supported, model_fingerprint
from .products import TokenFlowCorrespondences, TokenFlowInversion
from .validation import (check_batch_size, check_conditioning, check_control_hints, check_correspondences,
                         check_inversion_model)

log = logging.getLogger(__name__)

SOURCE = "tokenflow_source"


def _abar(sigma: float) -> float:
    return 1.0 / (1.0 + sigma * sigma)


class TokenFlowGuider(FrameSubsetGuider):
    """CFG guider whose every model evaluation is one TokenFlow step over the whole clip."""

    def __init__(self, model_patcher, inversion: TokenFlowInversion, plan: EditPlan, batch_size: int,
                 sigmas: torch.Tensor) -> None:
        super().__init__(model_patcher)
        self.inversion = inversion
        self.plan = plan
        self.batch_size = batch_size
        self.step_sigmas = sigmas[:-1].double()
        self.on_the_fly = plan.correspondences is None
        self.skip_unused_source = not self.on_the_fly  # stop source passes after the PnP residuals
        n_batches = len(batch_ranges(inversion.n_frames, batch_size))
        self.progress = comfy.utils.ProgressBar(len(plan.timesteps) * n_batches)
        self.trace: list[tuple] | None = None  # set to [] to log (timestep, kind, where, phase) of PnP injections

    def _step_index(self, timestep: torch.Tensor) -> int:
        return int((self.step_sigmas - float(timestep.flatten()[0])).abs().argmin())

    def _field_provider(self, step: int):
        corr = self.plan.correspondences
        if corr is None:
            return None
        row = corr.timesteps.index(self.plan.timesteps[step])
        return lambda block, frames: corr.fields_at(row, block, frames)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        step = self._step_index(timestep)
        t = self.plan.timesteps[step]
        n = x.shape[0]
        keyframes = self.plan.keyframes[step]
        pairing = self.plan.pairing(step, n)
        pnp_attention, pnp_residual = self.plan.pnp_attention[t], self.plan.pnp_residual[t]
        bank = StepBank(trace=[] if self.trace is not None else None)
        common = dict(bank=bank, pairing=pairing, pnp_attention=pnp_attention, pnp_residual=pnp_residual,
                      field_provider=self._field_provider(step))
        need_source_keyframes = self.on_the_fly or bool(pnp_attention) or bool(pnp_residual)
        need_source_frames = self.on_the_fly or bool(pnp_residual)
        negative = "negative"
        if math.isclose(self.cfg, 1.0) and not model_options.get("disable_cfg1_optimization", False):
            negative = None
        source = None
        if need_source_keyframes:
            sigma = float(self.step_sigmas[step])
            latents = self.inversion.trajectory[self.plan.trajectory_steps[step]]
            source = (latents / _abar(sigma) ** 0.5).to(device=x.device, dtype=x.dtype)
        out = torch.empty_like(x)
        try:
            if source is not None:
                self.calc_on_frames([SOURCE], source, timestep, keyframes, model_options,
                                    PassContext(Phase.SOURCE_KEYFRAMES, frames=keyframes, **common), n, cache=False)
            self.calc_on_frames(["positive", negative], x, timestep, keyframes, model_options,
                                PassContext(Phase.EDIT_KEYFRAMES, frames=keyframes, **common), n, cache=False)
            bank.pnp_qk.clear()  # only the keyframe pass computes (and injects into) self-attention
            for frames in batch_ranges(n, self.batch_size):
                idx = torch.arange(frames.start, frames.stop)
                bank.fields.clear()
                bank.residuals.clear()
                if need_source_frames:
                    self.calc_on_frames([SOURCE], source, timestep, idx, model_options,
                                        PassContext(Phase.SOURCE_FRAMES, frames=idx, **common,
                                                    stop_after_residuals=self.skip_unused_source), n)
                preds = self.calc_on_frames(["positive", negative], x, timestep, idx, model_options,
                                            PassContext(Phase.EDIT_FRAMES, frames=idx, **common), n)
                out[idx.to(x.device)] = self._combine(preds, x, timestep, idx, model_options)
                self.progress.update(1)
        finally:
            if self.trace is not None:
                self.trace.extend((t, *event) for event in bank.trace)
            bank.clear()
        return out

    def _combine(self, preds: list[torch.Tensor], x, timestep, idx, model_options) -> torch.Tensor:
        dev_idx = idx.to(x.device)
        x_b, t_b = x[dev_idx], timestep[dev_idx]
        for fn in model_options.get("sampler_pre_cfg_function", []):
            preds = fn({"conds": None, "conds_out": preds, "cond_scale": self.cfg, "timestep": t_b, "input": x_b,
                        "sigma": t_b, "model": self.inner_model, "model_options": model_options})
        cond_pred, uncond_pred = preds
        return comfy.samplers.cfg_function(self.inner_model, cond_pred, uncond_pred, self.cfg, x_b, t_b, model_options)


def _ddim_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """Deterministic DDIM (eta 0) in ComfyUI's sigma space; the last sigma is the final level, not 0."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        comfy.model_management.throw_exception_if_processing_interrupted()
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = denoised + (x - denoised) * (sigmas[i + 1] / sigmas[i])
    return x


def start_latent(inversion: TokenFlowInversion, sigmas_all: torch.Tensor, first_timestep: int) -> torch.Tensor:
    """DDPM-space start: sqrt(abar_t0) x0 + sqrt(1-abar_t0) eps_T, eps_T from the fully inverted latent."""
    abar_inv = _abar(float(sigmas_all[inversion.inverted_timestep].double()))
    abar_0 = _abar(float(sigmas_all[first_timestep].double()))
    noise = ddim_noise(inversion.inverted, inversion.x0, abar_inv)
    return add_noise(inversion.x0, noise, abar_0)


def prepare_edit(model, inversion: TokenFlowInversion, settings: EditSettings,
                 correspondences: TokenFlowCorrespondences | None):
    """Validate everything and build the guider, sigmas and start latent before any heavy work."""
    layout = check_supported(model)
    fingerprint = model_fingerprint(model)
    check_inversion_model(inversion, fingerprint)
    check_batch_size(settings.batch_size, inversion.n_frames)
    if correspondences is not None:
        check_correspondences(correspondences, inversion, fingerprint)
    sigmas_all = model.get_model_object("model_sampling").sigmas.float().cpu()
    plan = make_plan(settings, inversion, layout, model.model.diffusion_model, correspondences)
    sigmas = torch.cat([sigmas_all[plan.timesteps], sigmas_all[:1]])
    patched = model.clone()
    install_tokenflow_patches(patched, layout)
    guider = TokenFlowGuider(patched, inversion, plan, settings.batch_size, sigmas)
    guider.set_cfg(settings.cfg)
    start = start_latent(inversion, sigmas_all, plan.timesteps[0])
    return guider, sigmas, start


@torch.no_grad()
def run_edit(model, positive, negative, inversion: TokenFlowInversion, settings: EditSettings,
             correspondences: TokenFlowCorrespondences | None = None, callback=None, trace: list | None = None) -> dict:
    """Run the edit; ``trace`` (a list) receives (timestep, kind, where, phase) for every PnP injection."""
    guider, sigmas, start = prepare_edit(model, inversion, settings, correspondences)
    for name, conditioning in (("positive", positive), ("negative", negative)):
        check_conditioning(conditioning, model, name)
        check_control_hints(conditioning, inversion.n_frames, name)
    guider.trace = trace
    guider.inner_set_conds({"positive": positive, "negative": negative, SOURCE: inversion.conditioning})
    start_model_space = start / _abar(float(sigmas[0].double())) ** 0.5
    latent_image = model.model.process_latent_out(start_model_space)
    sampler = comfy.samplers.KSAMPLER(_ddim_sampler)
    log.info("TokenFlow: editing %d frames, %s editor, %d steps", inversion.n_frames, settings.editor, len(sigmas) - 1)
    samples = guider.sample(torch.zeros_like(latent_image), latent_image, sampler, sigmas, callback=callback,
                            seed=settings.seed, disable_pbar=True)
    final_abar = _abar(float(sigmas[-1].double()))
    return {"samples": samples.cpu() * final_abar ** 0.5}
