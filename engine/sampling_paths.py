"""Which inversion, extraction and edit implement the sampling rule a model's family adapter declares.

The nodes and the headless runner ask :func:`path_for` instead of calling a rule's functions directly, so
one TokenFlow DDIM Inversion / Extract Correspondences / TokenFlow Sampler node serves every family: DDPM
UNets go through DDIM (``ddpm/``), flow-matching DiTs (Flux, SD3.x) through flow inversion and the DiT
attention patch (``flow/``). The choice follows the layout's declared ``sampling``; no family is named here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .ddpm import edit as ddpm_edit, extract as ddpm_extract, invert as ddpm_invert
from .families.base import DDPM, FLOW
from .families.registry import sampling_rule
from .flow import edit as flow_edit, extract as flow_extract, invert as flow_invert


@dataclass(frozen=True)
class SamplingPath:
    sampling: str  # the rule (families.base.DDPM / FLOW), for check_supported(model, sampling=...)
    invert: Callable  # (model, latent, conditioning, steps, inversion_steps, frame_batch, ...) -> TokenFlowInversion
    edit: Callable  # (model, positive, negative, inversion, settings, correspondences, callback) -> LATENT
    inverted_latent: Callable  # (model, inversion) -> LATENT
    extract: Callable  # (model, inversion, batch_size, keyframes, seed, blend, max_keyframes) -> correspondences


def paths() -> dict[str, SamplingPath]:
    """Each rule's path, its functions read when asked (a function replaced on its module is the one used)."""
    return {
        DDPM: SamplingPath(DDPM, ddpm_invert.run_inversion, ddpm_edit.run_edit, ddpm_invert.inverted_latent_output,
                           ddpm_extract.run_extraction),
        FLOW: SamplingPath(FLOW, flow_invert.run_inversion, flow_edit.run_edit,
                           flow_invert.inverted_latent_output, flow_extract.run_extraction),
    }


def path_for(model_patcher) -> SamplingPath:
    """The path of the sampling rule the claiming family adapter declares for the model
    (:func:`.families.registry.sampling_rule`: the DDIM path when none claims it)."""
    table = paths()
    return table.get(sampling_rule(model_patcher), table[DDPM])


def run_extraction(model, inversion, batch_size: int, keyframes: str, seed: int, blend: str = "official",
                   max_keyframes: int = 0):
    """The correspondence extraction of the model's sampling rule, as TokenFlow Extract Correspondences runs it."""
    return path_for(model).extract(model, inversion, batch_size, keyframes, seed, blend, max_keyframes)
