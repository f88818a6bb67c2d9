"""Extraction of TokenFlow's correspondences on a DDPM UNet: the inverted x_t of every editing step, in ComfyUI's
sigma space, through the shared extraction loop (:mod:`..sampling.extraction_guider`)."""
from __future__ import annotations

import comfy.samplers

from ...data.products import TokenFlowCorrespondences, TokenFlowInversion
from ..checks import RUN_ON_INVERSION, Stage, run_checks
from ..families.base import DDPM
from ..sampling.extraction_guider import extract
from .samplers import extraction_sampler


def run_extraction(model, inversion: TokenFlowInversion, batch_size: int, keyframes: str, seed: int,
                   blend: str = "official", max_keyframes: int = 0) -> TokenFlowCorrespondences:
    """The correspondences of a DDPM inversion (``sampling_paths.run_extraction``'s signature)."""
    stage = run_checks(Stage(model, DDPM, inversion=inversion), RUN_ON_INVERSION)

    def sampler(guider, sigmas):
        return comfy.samplers.KSAMPLER(extraction_sampler, extra_options={
            "source": inversion.trajectory, "host_sigmas": sigmas.double().tolist(), "begin_step": guider.begin_step})

    return extract(model, inversion, stage.layout, stage.fingerprint, batch_size, keyframes, seed, blend,
                   max_keyframes, sampler)
