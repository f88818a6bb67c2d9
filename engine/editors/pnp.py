"""Plug-and-Play (Tumanyan et al., CVPR 2023): the paper's default image editor."""
from __future__ import annotations

from typing import Any, Mapping

from ...tokenflow_ops.schedule import editing_timesteps
from .base import StepNeeds
from .settings import EditorSetting


class PlugAndPlayEditor:
    name = "pnp"
    description = ("Plug-and-Play feature injection from the source (the paper's default, best structure): source "
                   "self-attention queries/keys for the first pnp_attn_t of the steps and residual-block features "
                   "for the first pnp_f_t (Flux: RF-Solver-Edit's attention values; SD3.x: Stable Flow's image "
                   "keys/values).")
    inputs = (
        EditorSetting("pnp_attn_t", float, 0.5, minimum=0.0, maximum=1.0, step=0.05, required=True,
                      tooltip="PnP: fraction of the steps with self-attention injection (SD UNets: queries/keys; "
                              "Flux: values; SD3.x: image keys/values). Higher keeps more source layout, lower lets "
                              "the prompt change more."),
        EditorSetting("pnp_f_t", float, 0.8, minimum=0.0, maximum=1.0, step=0.05, required=True,
                      tooltip="PnP: fraction of the steps with residual-block feature injection. Higher keeps more "
                              "structure. SD UNets only (Flux / SD3.x have no ResBlocks; ignored there)."),
        EditorSetting("pnp_attention_blocks", str, "auto",
                      tooltip="PnP attention injection blocks. SD UNets, e.g. 'output:4-11'; auto: all decoder "
                              "transformer blocks but the first (SD1/SD2: output 4-11; SDXL: output 1-5). Flux, e.g. "
                              "'single_block:20-37' (auto: RF-Solver-Edit's single blocks 20-37 of 38); SD3.x, e.g. "
                              "'double_block:9-17' (auto: the second quarter of the joint blocks). none disables."),
        EditorSetting("pnp_residual_blocks", str, "auto",
                      tooltip="PnP residual-feature injection ResBlocks, e.g. 'output_blocks.4.0' (auto: the "
                              "decoder's second level, second block, for every UNet family). none disables. Keep auto "
                              "on Flux / SD3.x (no ResBlocks)."),
    )

    def timesteps(self, steps: int, options: Mapping[str, Any]) -> list[int]:
        return editing_timesteps(steps)

    def check_conditioning(self, positive, negative) -> None:
        return None

    def step_needs(self, timesteps_full, options, layout, unet) -> dict[int, StepNeeds]:
        # Imported here: the declarations above stay importable without ComfyUI (scripts/tokenflow_edit.py).
        from ..families.block_lists import parse_block_list, parse_residual_list

        attention = frozenset(parse_block_list(options["pnp_attention_blocks"], layout, layout.default_pnp_attention))
        residual = parse_residual_list(options["pnp_residual_blocks"], unet, layout.default_pnp_residual)
        steps = len(timesteps_full)
        attn_t, f_t = options["pnp_attn_t"], options["pnp_f_t"]
        attn_until = set(timesteps_full[:int(steps * attn_t)]) if attn_t >= 0 else set()
        res_until = set(timesteps_full[:int(steps * f_t)]) if f_t >= 0 else set()
        return {t: StepNeeds(attention if t in attn_until else frozenset(), residual if t in res_until else ())
                for t in timesteps_full}
