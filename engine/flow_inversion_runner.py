"""Flow inversion of every frame for flow-matching (CONST) models: Euler on ascending sigmas, in the pack's loop.

The TokenFlow inversion for Flux / SD3.x: every frame goes from its clean latent x0 (sigma 0) up
the model's own sigma schedule with deterministic Euler steps, each evaluated at the next sigma
(the analogue of the official DDIM inversion), on the inversion prompt. x_sigma is kept at every
editing timestep. The loop is the pack's own :class:`FlowInversionSampler`, not a KSAMPLER:
KSAMPLER.sample scales the input by (1 - sigma_0) and ends with ``inverse_noise_scaling``, a
division by (1 - sigma_last), which is infinite on a schedule that ends at sigma = 1.

Guidance: the sampler runs the "positive" conds alone (cfg 1), so Flux-dev's distilled
guidance is what the conditioning carries (FluxGuidance, default 3.5) and no negative is used.
"""
from __future__ import annotations

import logging

import torch

import comfy.model_management
import comfy.samplers
import comfy.utils

from ..tokenflow_ops.flow_inversion import euler_step, sigma_at, velocity
from ..tokenflow_ops.schedule import check_inversion_covers, editing_timesteps, inversion_timesteps
from ..data.products import TokenFlowInversion
from .frame_guider import to_host
from .inversion_runner import FrameBatchGuider
from .model_support import FLOW, check_supported, frames_fingerprint, model_fingerprint
from .validation import (check_conditioning, check_control_hints, check_frame_size_fits, check_latent_frames,
                         check_no_area, check_not_joint_edit_model)

log = logging.getLogger(__name__)


class FlowInversionSampler(comfy.samplers.Sampler):
    """Euler on ascending sigmas from the clean latent; records x at the kept levels (no noise scaling)."""

    def __init__(self, levels: list[float], keep: dict[int, int]) -> None:
        self.levels = levels  # ascending sigmas of the inversion steps (host floats: no device reads)
        self.keep = keep  # step index -> row of the saved trajectory
        self.saved: dict[int, torch.Tensor] = {}
        self.final: torch.Tensor | None = None
        self.progress = comfy.utils.ProgressBar(len(levels))

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        x = latent_image  # model space (CFGGuider.inner_sample applied process_latent_in)
        s_in = x.new_ones([x.shape[0]])
        previous = 0.0
        for i, sigma in enumerate(self.levels):
            comfy.model_management.throw_exception_if_processing_interrupted()
            denoised = model_wrap(x, sigmas[i] * s_in, **extra_args)
            x = euler_step(x, velocity(x, denoised, sigma), previous, sigma)
            previous = sigma
            if i in self.keep:
                self.saved[self.keep[i]] = to_host(x, torch.float32)
            self.progress.update(1)
        self.final = x.float().cpu()  # blocking: every earlier non-blocking copy has landed too
        return x


def check_flow_conditioning(conditioning: list, model, name: str) -> None:
    """Refuse conditioning whose token width is not the model's text width (e.g. SD text embeddings into Flux)."""
    dm = model.model.diffusion_model
    width = getattr(getattr(dm, "params", None), "context_in_dim", None)
    embed = getattr(dm, "context_embedder", None)
    if width is None and isinstance(embed, torch.nn.Linear):
        width = embed.in_features
    for cond, extra in conditioning:
        if isinstance(extra, dict) and extra.get("reference_latents") is not None:
            raise ValueError(f"{name}: it carries reference latents (Flux Kontext / ReferenceLatent), whose tokens "
                             "TokenFlow cannot tell from the frame's image tokens; remove the ReferenceLatent node")
        if width is not None and cond.shape[-1] != width:
            raise ValueError(f"{name}: its text embeddings are {cond.shape[-1]} wide but this model reads {width}-wide "
                             "ones; encode the prompt with the text encoders of this model (DualCLIPLoader / the "
                             "checkpoint's CLIP) in CLIPTextEncode")


@torch.no_grad()
def run_flow_inversion(model, latent: dict, conditioning: list, steps: int, inversion_steps: int,
                       frame_batch: int = 0, method: str = "ddim", max_iterations: int = 0,
                       tolerance: float = 0.0) -> TokenFlowInversion:
    """Invert every frame of ``latent`` with ``inversion_steps`` Euler steps; keep x at the ``steps`` editing levels.

    ``method`` must be "ddim" (the step-wise inversion: Euler here); ``max_iterations`` / ``tolerance`` belong to
    the UNets' fixed-point method and are not used."""
    layout = check_supported(model, sampling=FLOW)
    if method != "ddim":
        raise ValueError(f"method: {method!r} inverts SD UNets (DDIM); a {layout.family} model is inverted by Euler "
                         "steps on its own sigmas: set method to ddim (inversion_steps then sets the Euler steps)")
    check_inversion_covers(steps, inversion_steps)
    samples = check_latent_frames(latent, "latent", model.model.latent_format.latent_channels)
    check_not_joint_edit_model(model)
    check_conditioning(conditioning, model, "conditioning")
    check_flow_conditioning(conditioning, model, "conditioning")
    check_control_hints(conditioning, samples.shape[0], "conditioning")
    check_no_area(conditioning, "conditioning", tuple(samples.shape[-2:]))
    check_frame_size_fits(model, tuple(samples.shape[1:]), "latent")
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
        model_fingerprint=model_fingerprint(model), frames_fingerprint=frames_fingerprint(model, samples),
        family=layout.family,
    )


def inverted_latent_output(model, inversion: TokenFlowInversion) -> dict:
    """The fully inverted latent x_sigma as a ComfyUI LATENT (a flow model's x_sigma needs no rescaling)."""
    return {"samples": model.model.process_latent_out(inversion.inverted)}
