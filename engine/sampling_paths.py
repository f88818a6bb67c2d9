"""Which inversion and edit implement the sampling rule a model's family adapter declares.

The nodes and the headless runner ask :func:`path_for` instead of calling a runner directly, so
one TokenFlow DDIM Inversion / Extract Correspondences / TokenFlow Sampler node serves every
family: DDPM UNets go through DDIM (``inversion_runner`` / ``correspondence_runner`` /
``tokenflow_runner``), flow-matching DiTs (Flux, SD3.x) through flow inversion and the DiT
attention patch (``flow_inversion_runner`` / ``dit_extraction`` / ``flow_edit_runner``).
The choice follows the layout's declared ``sampling``; no family is named here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .families.base import DDPM, FLOW


@dataclass(frozen=True)
class SamplingPath:
    sampling: str  # the rule (families.base.DDPM / FLOW), for check_supported(model, sampling=...)
    invert: Callable  # (model, latent, conditioning, steps, inversion_steps, frame_batch) -> TokenFlowInversion
    edit: Callable  # (model, positive, negative, inversion, settings, correspondences, callback) -> LATENT
    inverted_latent: Callable  # (model, inversion) -> LATENT
    extract: Callable  # (model, inversion, batch_size, keyframes, seed, blend, max_keyframes) -> correspondences


def _paths() -> dict[str, SamplingPath]:
    from . import (correspondence_runner, dit_extraction, flow_edit_runner, flow_inversion_runner, inversion_runner,
                   tokenflow_runner)

    return {
        DDPM: SamplingPath(DDPM, inversion_runner.run_inversion, tokenflow_runner.run_edit,
                           inversion_runner.inverted_latent_output, correspondence_runner.run_ddpm_extraction),
        FLOW: SamplingPath(FLOW, flow_inversion_runner.run_flow_inversion, flow_edit_runner.run_flow_edit,
                           flow_inversion_runner.inverted_latent_output, dit_extraction.run_flow_extraction),
    }


def path_for(model_patcher) -> SamplingPath:
    """The path of the sampling rule the claiming family adapter declares for the model
    (:func:`.model_support.sampling_rule`: the DDIM path when none claims it)."""
    from .model_support import sampling_rule

    paths = _paths()
    return paths.get(sampling_rule(model_patcher), paths[DDPM])


def run_extraction(model, inversion, batch_size: int, keyframes: str, seed: int, blend: str = "official",
                   max_keyframes: int = 0):
    """The correspondence extraction of the model's sampling rule (DDPM UNets: ``correspondence_runner``; flow
    DiTs: ``dit_extraction``), as TokenFlow Extract Correspondences runs it."""
    return path_for(model).extract(model, inversion, batch_size, keyframes, seed, blend, max_keyframes)
