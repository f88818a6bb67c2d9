"""ControlNet as the image editor: the structure comes from hints carried by the conditioning."""
from __future__ import annotations

import logging
from typing import Any, Mapping

from ...tokenflow_ops.schedule import editing_timesteps
from .base import StepNeeds

log = logging.getLogger(__name__)


def has_controlnet(conditioning) -> bool:
    """Whether any [cond, options] entry of a CONDITIONING carries a ControlNet (Apply ControlNet).

    Read here, not through ``engine.checks``: the editors stand below the checks, which read the editors."""
    return any(isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], dict)
               and entry[1].get("control") is not None for entry in conditioning or ())


class ControlNetEditor:
    name = "controlnet"
    description = ("No injection, full steps; the structure comes from ControlNet hints carried by the conditioning "
                   "(Apply ControlNet).")
    inputs = ()

    def timesteps(self, steps: int, options: Mapping[str, Any]) -> list[int]:
        return editing_timesteps(steps)

    def step_needs(self, timesteps_full, options, layout, unet) -> dict[int, StepNeeds]:
        return {t: StepNeeds() for t in timesteps_full}

    def check_conditioning(self, positive, negative) -> None:
        if not has_controlnet(positive) and not has_controlnet(negative):
            # Not refused: TokenFlow without any injection is a legitimate ablation, but rarely what was meant.
            log.warning("TokenFlow: editor 'controlnet' takes its structure from a ControlNet carried by the "
                        "conditioning, but neither positive nor negative has one: the edit runs with no structure "
                        "guidance. Apply a ControlNet to the prompts (Apply ControlNet, one hint per frame) or "
                        "choose editor 'pnp' or 'sdedit'")
