"""Inversion of every frame through ComfyUI's sampling path.

Two methods: ``ddim``, the official preprocess.py ``ddim_inversion`` on its own fine grid
(``inversion_steps``), and ``fixed_point``, the exact inversion on the editing grid (each implicit DDIM
step solved by fixed-point iteration, ``tokenflow_ops.fixed_point``), whose saved x_t are what the
editing sampler maps back to the source.
"""
from __future__ import annotations

import logging

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.samplers
import comfy.utils

from ..tokenflow_ops.fixed_point import (DEFAULT_MAX_ITERATIONS, DEFAULT_TOLERANCE, check_fixed_point_settings,
                                         solve_inversion_step)
from ..tokenflow_ops.inversion import ddim_inversion_step
from ..tokenflow_ops.schedule import (alpha_bar_from_sigma, check_inversion_covers, check_step_count, editing_timesteps,
                                      inversion_timesteps)
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


class ChunkGuider(FrameBatchGuider):
    """FrameBatchGuider that can also evaluate ONE chunk of frames: the sampler passes only that chunk's latents.

    ``chunk`` (set by the fixed-point sampler before each call) says which frames of the clip the input holds,
    so per-frame conds (ControlNet hints, per-frame prompts) follow them.
    """

    def __init__(self, model_patcher, frame_batch: int) -> None:
        super().__init__(model_patcher, frame_batch)
        self.chunk: range | None = None
        self.n_frames = 0

    def chunks(self, x: torch.Tensor) -> list[range]:
        n = x.shape[0]
        per_call = frames_per_call(self.inner_model, 1, tuple(x.shape[1:]), x.device, n, cap=self.frame_batch)
        return even_chunks(n, per_call)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        if self.chunk is None or x.shape[0] == self.n_frames:
            return super().predict_noise(x, timestep, model_options, seed)
        comfy.model_management.throw_exception_if_processing_interrupted()
        options = comfy.model_patcher.create_model_options_clone(model_options)
        options.pop("context_handler", None)
        conds = self.conds_for("positive", self.chunk, self.n_frames, True, {})
        (out,) = comfy.samplers.calc_cond_batch(self.inner_model, [conds], x, timestep, options)
        return out


class _Recorder:
    def __init__(self, keep: list[int], timesteps: list[int], total: int) -> None:
        self.keep = {t: i for i, t in enumerate(keep)}
        self.timesteps = timesteps
        self.saved: dict[int, torch.Tensor] = {}
        self.final: torch.Tensor | None = None
        self.progress = comfy.utils.ProgressBar(total)
        self.evaluations: list[float] = []  # fixed point: model evaluations per frame at each step (mean over chunks)
        self.residuals: list[float | None] = []  # fixed point: largest final residual over the chunks (None: k = 1)


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


def _fixed_point_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, recorder: _Recorder = None,
                         abar_start: float = 1.0, host_sigmas: list[float] | None = None,
                         guider: ChunkGuider = None, max_iterations: int = DEFAULT_MAX_ITERATIONS,
                         tolerance: float = DEFAULT_TOLERANCE):
    """KSAMPLER function: the implicit DDIM inversion step at each ASCENDING editing level, by fixed point.

    Every chunk of frames (``frame_batch`` / device memory) iterates on its own: one UNet call for all of
    its frames per iteration and one scalar residual read per iteration (the stopping rule), never one per
    frame.
    """
    extra_args = extra_args or {}
    chunks = guider.chunks(x)
    guider.n_frames = x.shape[0]
    abar_prev = abar_start
    try:
        for i, sigma in enumerate(sigmas):
            abar = float(alpha_bar_from_sigma(host_sigmas[i]))
            out = torch.empty_like(x)
            evaluations, residuals = 0, []
            for frames in chunks:
                guider.chunk = frames
                s_in = x.new_ones([len(frames)])

                def eps_at(latent: torch.Tensor) -> torch.Tensor:
                    comfy.model_management.throw_exception_if_processing_interrupted()
                    model_input = latent / abar ** 0.5
                    denoised = model(model_input, sigma * s_in, **extra_args)
                    return (model_input - denoised) / sigma

                solved = solve_inversion_step(eps_at, x[frames.start:frames.stop], abar_prev, abar, max_iterations,
                                              tolerance)
                out[frames.start:frames.stop] = solved.x
                evaluations += solved.evaluations * len(frames)
                if solved.residuals:
                    residuals.append(solved.residual)
            x = out
            abar_prev = abar
            recorder.evaluations.append(evaluations / x.shape[0])
            recorder.residuals.append(max(residuals) if residuals else None)
            t = recorder.timesteps[i]
            if t in recorder.keep:
                recorder.saved[t] = to_host(x, torch.float32)
            recorder.progress.update(1)
    finally:
        guider.chunk = None
    recorder.final = x.float().cpu()
    return x


def check_inversion_settings(steps: int, inversion_steps: int, method: str, max_iterations: int,
                             tolerance: float) -> None:
    """Every refusal of the inversion's own settings, before any model call."""
    check_fixed_point_settings(method, max_iterations, tolerance)
    if method == "fixed_point":
        check_step_count(steps, "steps")  # the fixed-point inversion's grid is the editing grid of steps
    else:
        check_inversion_covers(steps, inversion_steps)


def _report_convergence(recorder: _Recorder, timesteps: list[int], max_iterations: int, tolerance: float) -> None:
    """Log the cost; warn when steps ended at the cap above the tolerance (a coarse grid converges slowly)."""
    log.info("TokenFlow: fixed-point inversion: %.2f evaluations per frame and step on average",
             sum(recorder.evaluations) / len(recorder.evaluations))
    open_steps = [(r, t) for r, t in zip(recorder.residuals, timesteps) if r is not None and r > tolerance]
    if open_steps and max_iterations > 1:
        worst, at = max(open_steps)
        log.warning("TokenFlow: fixed-point inversion: %d of %d steps stopped at max_iterations (%d) above the "
                    "tolerance %g (largest residual %.3g at t = %d); raise max_iterations, use more steps (a finer "
                    "grid converges faster) or method ddim", len(open_steps), len(timesteps), max_iterations,
                    tolerance, worst, at)


@torch.no_grad()
def run_inversion(model, latent: dict, conditioning: list, steps: int, inversion_steps: int,
                  frame_batch: int = 0, method: str = "ddim", max_iterations: int = DEFAULT_MAX_ITERATIONS,
                  tolerance: float = DEFAULT_TOLERANCE) -> TokenFlowInversion:
    """Invert every frame; ``method`` "ddim" on the grid of ``inversion_steps``, "fixed_point" on that of ``steps``
    (``inversion_steps`` is then not used)."""
    layout = check_supported(model)
    check_inversion_settings(steps, inversion_steps, method, max_iterations, tolerance)
    samples = check_latent_frames(latent, "latent", model.model.latent_format.latent_channels)
    check_not_joint_edit_model(model)
    check_conditioning(conditioning, model, "conditioning")
    check_no_area(conditioning, "conditioning", tuple(samples.shape[-2:]))
    check_frame_size_fits(model, tuple(samples.shape[1:]), "latent")
    check_control_hints(conditioning, samples.shape[0], "conditioning")
    sampling = model.get_model_object("model_sampling")
    model_sigmas = sampling.sigmas.float().cpu()
    fixed_point = method == "fixed_point"
    if fixed_point:
        inversion_steps = steps
    edit_ts = editing_timesteps(steps)
    inv_ts = inversion_timesteps(inversion_steps)
    recorder = _Recorder(edit_ts, inv_ts, inversion_steps)
    guider = (ChunkGuider if fixed_point else FrameBatchGuider)(model.clone(), frame_batch)
    guider.inner_set_conds({"positive": conditioning})
    guider.set_cfg(1.0)
    options = {"recorder": recorder, "abar_start": float(alpha_bar_from_sigma(model_sigmas[0].double())),
               "host_sigmas": model_sigmas[inv_ts].double().tolist()}
    if fixed_point:
        options.update(guider=guider, max_iterations=max_iterations, tolerance=tolerance)
    sampler = comfy.samplers.KSAMPLER(_fixed_point_sampler if fixed_point else _inversion_sampler,
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
    if fixed_point:
        _report_convergence(recorder, inv_ts, max_iterations, tolerance)  # ascending, as the steps ran
    return TokenFlowInversion(
        steps=steps, inversion_steps=inversion_steps, timesteps=edit_ts,
        sigmas=torch.cat([model_sigmas[edit_ts], model_sigmas[:1]]),
        trajectory=trajectory, x0=x0, inverted=recorder.final, inverted_timestep=inv_ts[-1],
        conditioning=[[c[0].cpu(), {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in c[1].items()}]
                      for c in conditioning],
        model_fingerprint=model_fingerprint(model), frames_fingerprint=frames_fingerprint(model, samples), family=layout.family,
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

    Starts where an edit starts (``tokenflow_runner.start_latent`` at the first editing timestep) and walks the
    inversion's ``steps`` editing timesteps; returns scaled DDPM-space latents comparable with ``inversion.x0``.
    """
    from .tokenflow_runner import _ddim_sampler, start_latent  # the edit's own sampler and start

    sigmas_all = model.get_model_object("model_sampling").sigmas.float().cpu()
    sigmas = torch.cat([sigmas_all[inversion.timesteps], sigmas_all[:1]])
    start = start_latent(inversion, sigmas_all, inversion.timesteps[0])
    abar_first = float(alpha_bar_from_sigma(sigmas[0].double()))
    guider = FrameBatchGuider(model.clone(), frame_batch)
    guider.inner_set_conds({"positive": inversion.conditioning})
    guider.set_cfg(1.0)
    latent_image = model.model.process_latent_out(start / abar_first ** 0.5)
    sampler = comfy.samplers.KSAMPLER(_ddim_sampler, extra_options={"begin_step": lambda step: None})
    out = guider.sample(torch.zeros_like(latent_image), latent_image, sampler, sigmas, seed=0, disable_pbar=True)
    final_abar = float(alpha_bar_from_sigma(sigmas[-1].double()))
    return model.model.process_latent_in(out.cpu()) * final_abar ** 0.5
