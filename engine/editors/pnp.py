"""Plug-and-Play (Tumanyan et al., CVPR 2023): the paper's default image editor."""
from __future__ import annotations

from typing import TYPE_CHECKING

from ...tokenflow_ops.schedule import editing_timesteps
from ..model_support import parse_block_list, parse_residual_list
from .base import StepNeeds

if TYPE_CHECKING:  # pragma: no cover
    from ..edit_plan import EditSettings


class PlugAndPlayEditor:
    name = "pnp"
    description = ("Plug-and-Play feature injection from the source (the paper's default, best structure): source "
                   "self-attention queries/keys for the first pnp_attn_t of the steps and residual-block features "
                   "for the first pnp_f_t.")

    def timesteps(self, steps: int, settings: "EditSettings") -> list[int]:
        return editing_timesteps(steps)

    def check_conditioning(self, positive, negative) -> None:
        return None

    def step_needs(self, timesteps_full, settings, layout, unet) -> dict[int, StepNeeds]:
        attention = frozenset(parse_block_list(settings.pnp_attention_blocks, layout, layout.default_pnp_attention))
        residual = parse_residual_list(settings.pnp_residual_blocks, unet, layout.default_pnp_residual)
        steps = len(timesteps_full)
        attn_until = set(timesteps_full[:int(steps * settings.pnp_attn_t)]) if settings.pnp_attn_t >= 0 else set()
        res_until = set(timesteps_full[:int(steps * settings.pnp_f_t)]) if settings.pnp_f_t >= 0 else set()
        return {t: StepNeeds(attention if t in attn_until else frozenset(), residual if t in res_until else ())
                for t in timesteps_full}
