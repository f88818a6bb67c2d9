"""Which inversion and edit implement the sampling rule a model's family adapter declares.

The nodes and the headless runner ask :func:`path_for` instead of calling a runner directly, so
one TokenFlow DDIM Inversion / TokenFlow Sampler node serves every family: DDPM UNets go through
DDIM (``inversion_runner`` / ``tokenflow_runner``), flow-matching DiTs (Flux, SD3.x) through
flow inversion and the DiT attention patch (``flow_inversion_runner`` / ``flow_edit_runner``).
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


def _paths() -> dict[str, SamplingPath]:
    from . import flow_edit_runner, flow_inversion_runner, inversion_runner, tokenflow_runner

    return {
        DDPM: SamplingPath(DDPM, inversion_runner.run_inversion, tokenflow_runner.run_edit,
                           inversion_runner.inverted_latent_output),
        FLOW: SamplingPath(FLOW, flow_inversion_runner.run_flow_inversion, flow_edit_runner.run_flow_edit,
                           flow_inversion_runner.inverted_latent_output),
    }


def path_for(model_patcher) -> SamplingPath:
    """The path of the sampling rule the claiming family adapter declares for the model.

    When no adapter claims the model, or its description fails, the DDIM path is returned: its
    start-of-run check raises the same named refusal before any model call.
    """
    from . import model_support

    family = next((f for f in model_support.FAMILIES if f.claims(model_patcher)), None)
    paths = _paths()
    if family is None:
        return paths[DDPM]
    try:
        sampling = family.describe(model_patcher).sampling
    except ValueError:
        return paths[DDPM]
    return paths.get(sampling, paths[DDPM])
