"""Extraction of TokenFlow's correspondences on a flow-matching transformer (Flux, SD3.x).

At every editing sigma the inverted source latents x_sigma (a CONST model's input as it is) run
through the DiT-patched clone with the source branch alone, through the same two passes the
source branch takes in an on-the-fly edit (:mod:`.dit_attention`):

- keyframe pass (``Phase.EXTRACT_KEYFRAMES``): ordinary attention; the keyframes' image-token
  values are recorded per declared attention block (``_record_source``), and so are the
  keyframes' image-token outputs;
- propagation pass (``Phase.EXTRACT_FRAMES``), in calls sized by memory: each frame's image-token
  values are matched to its keyframes' (``frame_fields``, chunked) and the block's image-token
  outputs are propagated from the keyframes, as the on-the-fly source branch's are.

So the stored fields are the ones an on-the-fly edit computes, and an edit that reads them
(``run_flow_edit(..., correspondences=...)``) gives the on-the-fly result without the source
branch (SDEdit: none at all; PnP: the keyframe pass of the injection steps only, for the source's
image keys/values). The UNet path extracts from a clean source pass instead (ordinary attention
on every frame, :mod:`.correspondence_runner`), the paper's framing.

The product is the UNet path's :class:`~..data.products.TokenFlowCorrespondences` with the same
fingerprints, so an edit checks it exactly as on a UNet.
"""
from __future__ import annotations

import logging

import torch

import comfy.model_management
import comfy.samplers

from ..data.products import TokenFlowCorrespondences, TokenFlowInversion
from .correspondence_runner import ExtractionGuider, planned_correspondences
from .patched_model import patched_clone
from .model_support import FLOW, ModelLayout, check_supported, model_fingerprint
from .validation import check_frame_size_fits, check_inversion_model, check_not_joint_edit_model

log = logging.getLogger(__name__)


class FlowExtractionSampler(comfy.samplers.Sampler):
    """Evaluates the model on the stored source latents of every step; ``x`` is returned unchanged.

    The pack's own loop, not a KSAMPLER: no noise scaling at either end (a CONST schedule that starts
    at sigma 1 would divide by zero in ``inverse_noise_scaling``).
    """

    def __init__(self, source: torch.Tensor, begin_step) -> None:
        self.source = source  # (steps, n, C, H, W) x_sigma at each editing sigma, CPU
        self.begin_step = begin_step

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        x = latent_image
        s_in = x.new_ones([x.shape[0]])
        for i in range(len(sigmas)):
            comfy.model_management.throw_exception_if_processing_interrupted()
            self.begin_step(i)
            model_wrap(self.source[i].to(device=x.device, dtype=x.dtype, non_blocking=True), sigmas[i] * s_in,
                       **extra_args)
        return x


def check_flow_extraction(model, inversion: TokenFlowInversion) -> tuple[ModelLayout, str]:
    """The flow path's opening of a run on an inversion (before any model call): the layout and the fingerprint."""
    layout = check_supported(model, sampling=FLOW)
    check_not_joint_edit_model(model)
    fingerprint = model_fingerprint(model)
    check_inversion_model(inversion, fingerprint)
    check_frame_size_fits(model, inversion.latent_shape, "inversion")
    return layout, fingerprint


@torch.no_grad()
def run_flow_extraction(model, inversion: TokenFlowInversion, batch_size: int, keyframes: str, seed: int,
                        blend: str = "official", max_keyframes: int = 0) -> TokenFlowCorrespondences:
    """The correspondences of a flow inversion (``run_extraction``'s signature)."""
    layout, fingerprint = check_flow_extraction(model, inversion)
    n = inversion.n_frames
    corr = planned_correspondences(inversion, fingerprint, batch_size, keyframes, seed, blend, max_keyframes)
    guider = ExtractionGuider(patched_clone(model, layout), corr, n)
    guider.inner_set_conds({"positive": inversion.conditioning})
    guider.set_cfg(1.0)
    sigmas = inversion.sigmas[:-1].float()
    sampler = FlowExtractionSampler(inversion.trajectory, guider.begin_step)
    zeros = torch.zeros((n,) + inversion.latent_shape)
    log.info("TokenFlow: extracting correspondences for %d frames over %d steps on a %s model", n, inversion.steps,
             layout.family)
    guider.sample(zeros, zeros, sampler, sigmas, seed=seed, disable_pbar=True)
    guider.store_fields()
    log.info("TokenFlow: correspondences hold %.1f MiB", corr.nbytes() / 2**20)
    return corr
