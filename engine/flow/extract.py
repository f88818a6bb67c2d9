"""Extraction of TokenFlow's correspondences on a flow-matching transformer (Flux, SD3.x).

At every editing sigma the inverted source latents x_sigma (a CONST model's input as it is) run through
the DiT-patched clone with the source branch alone, through the same two passes the source branch takes
in an on-the-fly edit (:mod:`..patches.dit`), in the shared extraction loop
(:mod:`..sampling.extraction_guider`):

- keyframe pass (``Phase.EXTRACT_KEYFRAMES``): ordinary attention; the keyframes' image-token
  values are recorded per declared attention block, and so are the keyframes' image-token outputs;
- propagation pass (``Phase.EXTRACT_FRAMES``), in calls sized by memory: each frame's image-token
  values are matched to its keyframes' (``frame_fields``, chunked) and the block's image-token
  outputs are propagated from the keyframes, as the on-the-fly source branch's are.

So the stored fields are the ones an on-the-fly edit computes, and an edit that reads them
(``run_edit(..., correspondences=...)``) gives the on-the-fly result without the source
branch (SDEdit: none at all; PnP: the keyframe pass of the injection steps only, for the source's
image keys/values). The DDPM rule extracts from a clean source pass instead (ordinary attention
on every frame, :mod:`..ddpm.extract`), the paper's framing.

The product is the one both rules make (:class:`~...data.products.TokenFlowCorrespondences`) with the same
fingerprints, so an edit checks it exactly as on a UNet.
"""
from __future__ import annotations

from ...data.products import TokenFlowCorrespondences, TokenFlowInversion
from ..checks import RUN_ON_INVERSION, Stage, run_checks
from ..families.base import FLOW
from ..sampling.extraction_guider import extract
from .samplers import FlowExtractionSampler


def run_extraction(model, inversion: TokenFlowInversion, batch_size: int, keyframes: str, seed: int,
                        blend: str = "official", max_keyframes: int = 0) -> TokenFlowCorrespondences:
    """The correspondences of a flow inversion (``sampling_paths.run_extraction``'s signature)."""
    stage = run_checks(Stage(model, FLOW, inversion=inversion), RUN_ON_INVERSION)
    return extract(model, inversion, stage.layout, stage.fingerprint, batch_size, keyframes, seed, blend,
                   max_keyframes, lambda guider, sigmas: FlowExtractionSampler(inversion.trajectory, guider.begin_step),
                   f" on a {stage.layout.family} model")
