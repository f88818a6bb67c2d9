"""SDEdit (Meng et al., ICLR 2022): start from the partly noised source, no injection."""
from __future__ import annotations

from typing import Any, Mapping

from ...tokenflow_ops.schedule import sdedit_timesteps
from .base import StepNeeds
from .settings import EditorSetting


class SDEditEditor:
    name = "sdedit"
    description = "Start from the partly noised source (sdedit_start), no injection."
    inputs = (
        EditorSetting("sdedit_start", float, 0.9, minimum=0.01, maximum=1.0, step=0.01, required=True,
                      tooltip="SDEdit: how much noise to start from (0.9 keeps 44 of 50 steps). Higher edits more, "
                              "keeps less."),
    )

    def timesteps(self, steps: int, options: Mapping[str, Any]) -> list[int]:
        return sdedit_timesteps(steps, options["sdedit_start"])

    def check_conditioning(self, positive, negative) -> None:
        return None

    def step_needs(self, timesteps_full, options, layout, unet) -> dict[int, StepNeeds]:
        return {t: StepNeeds() for t in timesteps_full}
