"""The one registry of family adapters, and the questions the engine asks it about a connected model.

:data:`FAMILIES` holds the UNet families (:mod:`.unet`) and the flow-matching DiT families (:mod:`.dit`),
checked in order, the first that claims a model describing it. Anything no adapter claims is refused
with a message naming the fix.
"""
from __future__ import annotations

from typing import Union

from .base import DDPM, ModelLayout, unsupported_model
from .dit import DIT_FAMILIES, DiTFamily
from .unet import UNET_FAMILIES, UNetFamily

FamilyEntry = Union[UNetFamily, DiTFamily]

FAMILIES: list[FamilyEntry] = [*UNET_FAMILIES, *DIT_FAMILIES]


def sampling_rule(model_patcher) -> str:
    """The sampling rule the claiming family adapter declares for the model (:data:`DDPM` or :data:`FLOW`).

    When no adapter claims the model, or its description fails, :data:`DDPM`: the DDIM path's start-of-run
    check then raises the named refusal before any model call.
    """
    family = next((f for f in FAMILIES if f.claims(model_patcher)), None)
    if family is None:
        return DDPM
    try:
        return family.describe(model_patcher).sampling
    except ValueError:
        return DDPM


def check_supported(model_patcher, sampling: str = DDPM) -> ModelLayout:
    """The layout of the connected model from the first family adapter that claims it, or a clear error.

    ``sampling`` is the sampling rule the caller implements (:data:`DDPM` for the DDIM nodes,
    :data:`FLOW` for the flow path); a model of another rule is refused naming its family.
    """
    family = next((f for f in FAMILIES if f.claims(model_patcher)), None)
    if family is None:
        names = ", ".join(dict.fromkeys(f.name for f in FAMILIES))
        raise unsupported_model(model_patcher, f"no TokenFlow family adapter claims it (supported: {names})")
    layout = family.describe(model_patcher)
    if layout.sampling != sampling:
        name = type(model_patcher.model.diffusion_model).__name__
        raise ValueError(
            f"model: this TokenFlow step needs a Stable Diffusion UNet (SD1.x, SD2.x or SDXL) but the connected "
            f"model is {name}, a {layout.sampling} DiT of family {layout.family!r}. The TokenFlow nodes (DDIM "
            "Inversion, Extract Correspondences, Sampler, Keyframe Joint Edit, Load Inversion) take it through "
            "its flow path; this DDIM-only step does not: connect the model to those nodes, or Load an "
            "SD1.x/SD2.x/SDXL checkpoint with Load Checkpoint." if sampling == DDPM else
            f"model: this path needs a {sampling} model but the connected model ({name}, family "
            f"{layout.family!r}) follows the {layout.sampling} rule; use the TokenFlow DDIM nodes for it")
    return layout
