"""SDEdit (Meng et al., ICLR 2022): start from the partly noised source, no injection."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ...tokenflow_ops.schedule import sdedit_timesteps
from .base import StepNeeds

if TYPE_CHECKING:  # pragma: no cover
    from ..edit_plan import EditSettings


class SDEditEditor:
    name = "sdedit"
    description = "SDEdit: start from the partly noised source (sdedit_start), no injection."

    def timesteps(self, steps: int, settings: "EditSettings") -> list[int]:
        return sdedit_timesteps(steps, settings.sdedit_start)

    def check_conditioning(self, positive, negative) -> None:
        return None

    def step_needs(self, timesteps_full, settings, layout, unet) -> dict[int, StepNeeds]:
        return {t: StepNeeds() for t in timesteps_full}
