"""Plug-and-Play (Tumanyan et al., CVPR 2023): the paper's default image editor."""
from __future__ import annotations

from typing import Any, Mapping

from ...tokenflow_ops.schedule import editing_timesteps
from ..families.injection_presets import RF_SOLVER, SD3_HEURISTIC, STABLE_FLOW
from .base import StepNeeds
from .settings import EditorSetting


class PlugAndPlayEditor:
    name = "pnp"
    description = ("Plug-and-Play feature injection from the source (the paper's default, best structure): source "
                   "self-attention queries/keys for the first pnp_attn_t of the steps and residual-block features "
                   "for the first pnp_f_t (Flux: RF-Solver-Edit's attention values, or Stable Flow's image "
                   "keys/values; SD3.x: image keys/values in a heuristic choice of blocks).")
    inputs = (
        EditorSetting("pnp_attn_t", float, 0.5, minimum=0.0, maximum=1.0, step=0.05, required=True,
                      tooltip="PnP: fraction of the steps with self-attention injection (SD UNets: queries/keys; "
                              "Flux / SD3.x: what pnp_attention_blocks injects). Higher keeps more source layout, "
                              "lower lets the prompt change more. The methods' own: rf_solver "
                              f"{RF_SOLVER.fraction:g}, stable_flow {STABLE_FLOW.fraction:g} (every step)."),
        EditorSetting("pnp_f_t", float, 0.8, minimum=0.0, maximum=1.0, step=0.05, required=True,
                      tooltip="PnP: fraction of the steps with residual-block feature injection. Higher keeps more "
                              "structure. SD UNets only (Flux / SD3.x have no ResBlocks; ignored there)."),
        EditorSetting("pnp_attention_blocks", str, "auto",
                      tooltip="PnP attention injection: a preset or a block list. SD UNets, e.g. 'output:4-11'; "
                              "auto: all decoder transformer blocks but the first (SD1/SD2: output 4-11; SDXL: output "
                              f"1-5). Flux: auto = rf_solver. {RF_SOLVER.summary}. {STABLE_FLOW.summary}. "
                              f"{SD3_HEURISTIC.summary}. A Flux / SD3.x list, e.g. 'single_block:20-37', injects "
                              "what the family's auto injects (Flux: values; SD3.x: keys and values) unless an "
                              "entry ends in ':v' (image values) or ':kv' (image keys and values), e.g. "
                              "'double_block:0-1:kv, single_block:34-37:kv' (scripts/find_vital_layers.py prints "
                              "one). none disables."),
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
        from ..families.block_lists import parse_attention_injection, parse_residual_list

        injection = parse_attention_injection(options["pnp_attention_blocks"], layout)
        attention = frozenset(injection)
        tensors = tuple(sorted((block, what) for block, what in injection.items() if what))
        residual = parse_residual_list(options["pnp_residual_blocks"], unet, layout.default_pnp_residual)
        steps = len(timesteps_full)
        attn_t, f_t = options["pnp_attn_t"], options["pnp_f_t"]
        attn_until = set(timesteps_full[:int(steps * attn_t)]) if attn_t >= 0 else set()
        res_until = set(timesteps_full[:int(steps * f_t)]) if f_t >= 0 else set()
        return {t: StepNeeds(attention if t in attn_until else frozenset(), residual if t in res_until else (),
                             tensors if t in attn_until else ()) for t in timesteps_full}
