"""Which timesteps, keyframes and PnP layers one TokenFlow edit uses (resolved before any heavy work)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tokenflow_ops.keyframes import BLEND_MODES, FramePairing, keyframe_plan, pairing_for_step, spread_keyframe_groups
from ..tokenflow_ops.schedule import check_inversion_covers, editing_timesteps, sdedit_timesteps
from .model_support import BlockKey, ModelLayout, parse_block_list, parse_residual_list
from .products import TokenFlowCorrespondences, TokenFlowInversion

EDITORS = ("pnp", "sdedit", "controlnet")


@dataclass(frozen=True)
class EditSettings:
    editor: str = "pnp"
    cfg: float = 7.5
    pnp_attn_t: float = 0.5
    pnp_f_t: float = 0.8
    sdedit_start: float = 0.9
    batch_size: int = 8
    keyframes: str = "random"
    seed: int = 1
    blend: str = "official"
    max_keyframes: int = 0
    steps: int = 0  # 0: the inversion's step count
    pnp_attention_blocks: str = "auto"
    pnp_residual_blocks: str = "auto"


@dataclass
class EditPlan:
    timesteps: list[int]  # the timesteps this edit visits, largest first
    trajectory_steps: list[int]  # row of the inversion trajectory for each
    keyframes: torch.Tensor  # (len(timesteps), n_keyframes)
    group_size: int
    blend: str
    pnp_attention: dict[int, frozenset]  # timestep -> blocks with q/k injection
    pnp_residual: dict[int, tuple[str, ...]]  # timestep -> ResBlocks with feature injection
    correspondences: TokenFlowCorrespondences | None

    def pairing(self, step: int, n_frames: int) -> FramePairing:
        return pairing_for_step(self.keyframes[step], n_frames, self.group_size, self.blend)


def make_plan(settings: EditSettings, inversion: TokenFlowInversion, layout: ModelLayout, unet: torch.nn.Module,
              correspondences: TokenFlowCorrespondences | None) -> EditPlan:
    if settings.editor not in EDITORS:
        raise ValueError(f"editor must be one of {EDITORS}, got {settings.editor!r}")
    if settings.blend not in BLEND_MODES:
        raise ValueError(f"blend must be one of {BLEND_MODES}, got {settings.blend!r}")
    steps = settings.steps or inversion.steps
    check_inversion_covers(steps, inversion.steps, inversion_name="the inversion's steps",
                           fix="; sampler steps 0 uses the inversion's count (another count means inverting again)")
    full = editing_timesteps(steps)
    timesteps = sdedit_timesteps(steps, settings.sdedit_start) if settings.editor == "sdedit" else full
    n = inversion.n_frames
    if correspondences is not None:
        absent = [t for t in timesteps if t not in correspondences.timesteps]
        if absent:
            raise ValueError(f"correspondences: extracted for {len(correspondences.timesteps)} steps, which do not "
                             f"cover timestep {absent[0]}; extract them with the same steps as this edit")
        rows = [correspondences.timesteps.index(t) for t in timesteps]
        keyframes, group, blend = correspondences.keyframes[rows], correspondences.group_size, correspondences.blend
    else:
        group = spread_keyframe_groups(n, settings.batch_size, settings.max_keyframes)
        keyframes = keyframe_plan(n, group, len(timesteps), settings.seed, settings.keyframes)
        blend = settings.blend
    attention_blocks: tuple[BlockKey, ...] = ()
    residual_blocks: tuple[str, ...] = ()
    if settings.editor == "pnp":
        attention_blocks = parse_block_list(settings.pnp_attention_blocks, layout, layout.default_pnp_attention)
        residual_blocks = parse_residual_list(settings.pnp_residual_blocks, unet, layout.default_pnp_residual)
    attn_until = set(full[:int(steps * settings.pnp_attn_t)]) if settings.pnp_attn_t >= 0 else set()
    res_until = set(full[:int(steps * settings.pnp_f_t)]) if settings.pnp_f_t >= 0 else set()
    return EditPlan(
        timesteps=timesteps,
        trajectory_steps=[inversion.step_of(t) for t in timesteps],
        keyframes=keyframes, group_size=group, blend=blend,
        pnp_attention={t: frozenset(attention_blocks) if t in attn_until else frozenset() for t in timesteps},
        pnp_residual={t: residual_blocks if t in res_until else () for t in timesteps},
        correspondences=correspondences,
    )
