"""SDEdit (Meng et al., ICLR 2022): start from the partly noised source, no injection."""
from __future__ import annotations

import logging
from typing import Any, Mapping

from ...tokenflow_ops.schedule import sdedit_keeps_every_step, sdedit_timesteps
from .base import StepNeeds
from .settings import EditorSetting

log = logging.getLogger(__name__)


class SDEditEditor:
    name = "sdedit"
    description = "Start from the partly noised source (sdedit_start), no injection."
    inputs = (
        EditorSetting("sdedit_start", float, 0.9, minimum=0.01, maximum=1.0, step=0.01, required=True,
                      tooltip="SDEdit: how much noise to start from (0.9 keeps 44 of 50 steps). Higher edits more, "
                              "keeps less. Below 2 / steps only the last step is kept."),
    )

    def timesteps(self, steps: int, options: Mapping[str, Any]) -> list[int]:
        start = options["sdedit_start"]
        timesteps = sdedit_timesteps(steps, start)
        if sdedit_keeps_every_step(steps, start):
            log.warning("TokenFlow: sdedit_start %g with %d steps is below 2 / steps: the official slice would keep "
                        "every step and start the edit from full noise; using sdedit_start %.4g (2 / steps) instead: "
                        "the last step only, from timestep %d", start, steps, 2 / steps, timesteps[0])
        return timesteps

    def check_conditioning(self, positive, negative) -> None:
        return None

    def step_needs(self, timesteps_full, options, layout, unet) -> dict[int, StepNeeds]:
        return {t: StepNeeds() for t in timesteps_full}
