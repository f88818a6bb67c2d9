"""The TokenFlow editing loop inside ComfyUI's sampler (the official run_tokenflow_pnp.py / run_tokenflow_sdedit.py
``batched_denoise_step``).

``TokenFlowGuider.predict_noise`` is called once per DDIM step with the whole clip and runs it
as few, large UNet calls: the keyframe pass (source, uncond and cond branches of every keyframe
in one call) and the propagation pass (the three branches of every frame, as many frames per
call as the device's memory allows; B only decides which keyframes a frame blends). What the
source branch must do at a step comes from the editor's :class:`StepNeeds`.
"""
from __future__ import annotations

import logging
import math

import torch

import comfy.model_management
import comfy.samplers
import comfy.utils

from ..tokenflow_ops.inversion import add_noise, ddim_noise
from ..tokenflow_ops.schedule import alpha_bar_from_sigma
from .attention_patches import PassContext, Phase, StepBank
from .call_sizing import even_chunks, fits, frames_per_call
from .edit_plan import EditPlan, EditSettings, make_plan
from .editors import get_editor
from .frame_guider import FrameSubsetGuider, frame_ids, frames_of
from .patched_model import patched_clone
from ..data.products import TokenFlowCorrespondences, TokenFlowInversion
from .validation import check_correspondences, check_prompt, check_run_on_inversion

log = logging.getLogger(__name__)

SOURCE = "tokenflow_source"


def _abar(sigma: float | torch.Tensor) -> float:
    return float(alpha_bar_from_sigma(sigma))  # the one sigma -> alpha_bar rule, as a Python float


class TokenFlowGuider(FrameSubsetGuider):
    """CFG guider whose every model evaluation is one TokenFlow step over the whole clip."""

    def __init__(self, model_patcher, inversion: TokenFlowInversion, plan: EditPlan, sigmas: torch.Tensor) -> None:
        super().__init__(model_patcher)
        self.inversion = inversion
        self.plan = plan
        self.step_sigmas = sigmas[:-1].double()
        self.skip_unused_source = True  # a source-only call that just feeds the PnP residuals stops after them
        self.progress = comfy.utils.ProgressBar(len(plan.timesteps) * inversion.n_frames)
        self.trace: list[tuple] | None = None  # set to [] to log (timestep, kind, where, phase) of PnP injections

    def _field_provider(self, step: int):
        corr = self.plan.correspondences
        if corr is None:
            return None
        row = corr.timesteps.index(self.plan.timesteps[step])
        return lambda block, frames: corr.fields_at(row, block, frames)

    def source_latents(self, step: int) -> torch.Tensor:
        """The source branch's model input at ``step``: the inverted x_t in ComfyUI's sigma space."""
        return self.inversion.trajectory[self.plan.trajectory_steps[step]] / _abar(self.step_sigmas[step]) ** 0.5

    def _source_shares_calls(self, edit_names: list[str | None]) -> bool:
        """Whether calc_cond_batch batches the source branch with the edit branches: only conds without
        ControlNet (the source has none) or hooks, whose model inputs concatenate (text lengths whose
        padding stays within ComfyUI's limit). Otherwise the source branch gets calls of its own, first."""
        source = self.conds.get(SOURCE) or []
        edits = [c for name in edit_names if name for c in self.conds.get(name) or []]
        if any(c.get("control") is not None or c.get("hooks") is not None for c in source + edits):
            return False
        return all(comfy.samplers.cond_equal_size(s.get("model_conds", {}), e.get("model_conds", {}))
                   for s in source for e in edits)

    def _run_pass(self, phase: Phase, idx: range | torch.Tensor, x, source, edit_names, timestep, model_options,
                  common, n: int, separate_source: bool, stop_source_early: bool = False) -> list[torch.Tensor]:
        """One pass over frames ``idx``: the source branch with the edit branches, or before them."""
        ids = frame_ids(idx)
        cache = phase is Phase.FRAMES  # propagation subsets recur every step; keyframe subsets do not
        if source is None:
            return self.calc_on_frames(edit_names, x, timestep, idx, model_options,
                                       PassContext(phase, frames=ids, **common), n, cache=cache)
        if separate_source:
            self.calc_on_frames([SOURCE], source, timestep, idx, model_options,
                                PassContext(phase, frames=ids, source_index=0, stop_after_residuals=stop_source_early,
                                            **common), n, cache=cache)
            return self.calc_on_frames(edit_names, x, timestep, idx, model_options,
                                       PassContext(phase, frames=ids, **common), n, cache=cache)
        # Listed LAST: short of memory, calc_cond_batch runs a call's conds in parts, last listed first
        # (it reverses the batchable list), so the source branch still runs before the edit branches.
        names = edit_names + [SOURCE]
        ctx = PassContext(phase, frames=ids, source_index=len(edit_names), source_input=frames_of(source, idx),
                          **common)
        return self.calc_on_frames(names, x, timestep, idx, model_options, ctx, n, cache=cache)[:-1]

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        step = self.current_step
        t = self.plan.timesteps[step]
        needs = self.plan.needs[step]
        on_the_fly = self.plan.on_the_fly
        n, latent_shape = x.shape[0], tuple(x.shape[1:])
        keyframes = self.plan.schedule.keyframes[step]
        bank = StepBank(trace=[] if self.trace is not None else None)
        common = dict(bank=bank, pairing=self.plan.schedule.pairing(step, n), pnp_attention=needs.attention_injection,
                      pnp_residual=needs.residual_injection, field_provider=self._field_provider(step),
                      field_blocks=tuple(self.plan.correspondences.fields) if not on_the_fly else (),
                      keyframes=len(keyframes))
        edit_names = ["positive", "negative"]
        if math.isclose(self.cfg, 1.0) and not model_options.get("disable_cfg1_optimization", False):
            edit_names = ["positive", None]
        branches = sum(1 for name in edit_names if name)
        source = None
        if needs.source_in_keyframe_pass(on_the_fly):
            source = self.source_latents(step).to(device=x.device, dtype=x.dtype, non_blocking=True)
        own_calls = source is not None and not self._source_shares_calls(edit_names)
        model = self.inner_model
        out = torch.empty_like(x)
        try:
            # Keyframe pass: it cannot be split by frames (extended attention spans every keyframe).
            with_source = branches + (source is not None)
            keyframes_fit = fits(model, with_source * len(keyframes), latent_shape, x.device)
            self._run_pass(Phase.KEYFRAMES, keyframes, x, source, edit_names, timestep, model_options, common, n,
                           separate_source=own_calls or not keyframes_fit)
            bank.pnp_qk.clear()  # only the keyframe pass computes (and injects into) self-attention
            # Propagation pass: every frame, as many per call as memory allows.
            frame_source = source if needs.source_in_propagation(on_the_fly) else None
            separate = frame_source is not None and (own_calls or needs.source_stops_early(on_the_fly))
            per_call = frames_per_call(model, branches + (frame_source is not None and not separate), latent_shape,
                                       x.device, n)
            stop_early = self.skip_unused_source and needs.source_stops_early(on_the_fly)
            for frames in even_chunks(n, per_call):
                bank.fields.clear()
                bank.residuals.clear()
                preds = self._run_pass(Phase.FRAMES, frames, x, frame_source, edit_names, timestep, model_options,
                                       common, n, separate_source=separate, stop_source_early=stop_early)
                out[frames.start:frames.stop] = self._combine(preds, x, timestep, frames, model_options)
                self.progress.update(len(frames))
        finally:
            if self.trace is not None:
                self.trace.extend((t, *event) for event in bank.trace)
            bank.clear()
        return out

    def _combine(self, preds: list[torch.Tensor], x, timestep, idx, model_options) -> torch.Tensor:
        x_b, t_b = frames_of(x, idx), frames_of(timestep, idx)
        for fn in model_options.get("sampler_pre_cfg_function", []):
            preds = fn({"conds": None, "conds_out": preds, "cond_scale": self.cfg, "timestep": t_b, "input": x_b,
                        "sigma": t_b, "model": self.inner_model, "model_options": model_options})
        cond_pred, uncond_pred = preds
        return comfy.samplers.cfg_function(self.inner_model, cond_pred, uncond_pred, self.cfg, x_b, t_b, model_options)


def _ddim_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, begin_step=None):
    """Deterministic DDIM (eta 0) in ComfyUI's sigma space; the last sigma is the final level, not 0."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        comfy.model_management.throw_exception_if_processing_interrupted()
        begin_step(i)  # the guider learns the step here, not by reading the sigma back from the device
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


def prepare_edit(model, positive, negative, inversion: TokenFlowInversion, settings: EditSettings,
                 correspondences: TokenFlowCorrespondences | None):
    """Validate everything and build the guider, sigmas and start latent before any heavy work."""
    layout, fingerprint = check_run_on_inversion(model, inversion)
    for name, conditioning in (("positive", positive), ("negative", negative)):
        check_prompt(conditioning, model, name, inversion.latent_shape[-2:], inversion.n_frames)
    get_editor(settings.editor).check_conditioning(positive, negative)
    if correspondences is not None:
        check_correspondences(correspondences, inversion, fingerprint)
    sigmas_all = model.get_model_object("model_sampling").sigmas.float().cpu()
    plan = make_plan(settings, inversion, layout, model.model.diffusion_model, correspondences)
    sigmas = torch.cat([sigmas_all[plan.timesteps], sigmas_all[:1]])
    guider = TokenFlowGuider(patched_clone(model, layout), inversion, plan, sigmas)
    guider.set_cfg(settings.cfg)
    start = start_latent(inversion, sigmas_all, plan.timesteps[0])
    return guider, sigmas, start


@torch.no_grad()
def run_edit(model, positive, negative, inversion: TokenFlowInversion, settings: EditSettings,
             correspondences: TokenFlowCorrespondences | None = None, callback=None, trace: list | None = None) -> dict:
    """Run the edit; ``trace`` (a list) receives (timestep, kind, where, phase) for every PnP injection."""
    guider, sigmas, start = prepare_edit(model, positive, negative, inversion, settings, correspondences)
    guider.trace = trace
    guider.inner_set_conds({"positive": positive, "negative": negative, SOURCE: inversion.conditioning})
    start_model_space = start / _abar(float(sigmas[0].double())) ** 0.5
    latent_image = model.model.process_latent_out(start_model_space)
    sampler = comfy.samplers.KSAMPLER(_ddim_sampler, extra_options={"begin_step": guider.begin_step})
    log.info("TokenFlow: editing %d frames, %s editor, %d steps", inversion.n_frames, settings.editor, len(sigmas) - 1)
    samples = guider.sample(torch.zeros_like(latent_image), latent_image, sampler, sigmas, callback=callback,
                            seed=settings.seed, disable_pbar=True)
    final_abar = _abar(float(sigmas[-1].double()))
    return {"samples": samples.cpu() * final_abar ** 0.5}
