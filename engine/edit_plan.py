"""Which timesteps, keyframes and injections one TokenFlow edit uses (resolved before any heavy work)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..tokenflow_ops.keyframes import BLEND_MODES, KeyframeSchedule, keyframe_plan, spread_keyframe_groups
from ..tokenflow_ops.schedule import check_inversion_covers, editing_timesteps
from .editors import EDITORS, StepNeeds, editor_options, get_editor
from .editors.settings import setting_name
from .model_support import ModelLayout
from ..data.products import TokenFlowCorrespondences, TokenFlowInversion

__all__ = ["EditPlan", "EditSettings", "make_plan"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EditSettings:
    """The sampler's own settings (the one home of their defaults: the sampler node's widgets read them) and
    the values of the inputs editors declare.

    ``editor_options`` holds values of inputs the editors declare (``pnp_attn_t``, ``sdedit_start``, a
    plug-in's ...); the chosen editor is handed only its own, its declared defaults filling the gaps.
    """

    editor: str = "pnp"
    cfg: float = 7.5
    batch_size: int = 8
    keyframes: str = "random"
    seed: int = 1
    blend: str = "official"
    max_keyframes: int = 0
    steps: int = 0  # 0: the inversion's step count
    editor_options: dict = field(default_factory=dict)

    @classmethod
    def of(cls, **values) -> "EditSettings":
        """Settings from flat values: the sampler's own fields, every other name an editor option."""
        own = {name: values.pop(name) for name in list(values) if name in cls.__dataclass_fields__}
        options = {**own.pop("editor_options", {}), **values}
        known = {setting_name(d) for editor in EDITORS.values() for d in getattr(editor, "inputs", ())}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"no registered editor declares {unknown}; the editors' inputs are {sorted(known)}")
        return cls(**own, editor_options=options)


@dataclass
class EditPlan:
    timesteps: list[int]  # the timesteps this edit visits, largest first
    trajectory_steps: list[int]  # row of the inversion trajectory for each
    schedule: KeyframeSchedule  # keyframes of each visited step (len(timesteps), n_keyframes) and blending
    needs: list[StepNeeds]  # what the editor asks of each visited step
    correspondences: TokenFlowCorrespondences | None

    @property
    def on_the_fly(self) -> bool:
        return self.correspondences is None



def make_plan(settings: EditSettings, inversion: TokenFlowInversion, layout: ModelLayout, unet: torch.nn.Module,
              correspondences: TokenFlowCorrespondences | None) -> EditPlan:
    editor = get_editor(settings.editor)
    if settings.blend not in BLEND_MODES:
        raise ValueError(f"blend must be one of {BLEND_MODES}, got {settings.blend!r}")
    steps = settings.steps or inversion.steps
    check_inversion_covers(steps, inversion.steps, inversion_name="the inversion's steps",
                           fix="; sampler steps 0 uses the inversion's count (another count means inverting again)")
    full = editing_timesteps(steps)
    options = editor_options(editor, settings.editor_options)
    timesteps = editor.timesteps(steps, options)
    n = inversion.n_frames
    if correspondences is not None:
        absent = [t for t in timesteps if t not in correspondences.timesteps]
        if absent:
            raise ValueError(f"correspondences: extracted for {len(correspondences.timesteps)} steps, which do not "
                             f"cover timestep {absent[0]}; extract them with the same steps as this edit")
        rows = [correspondences.timesteps.index(t) for t in timesteps]
        keyframes, group, blend = correspondences.keyframes[rows], correspondences.group_size, correspondences.blend
        log.info("TokenFlow: keyframe plan from the correspondences: groups of %d frames, %d keyframes per step, "
                 "blend %s (the sampler's batch_size, keyframes, seed, blend and max_keyframes are not used)",
                 group, keyframes.shape[1], blend)
    else:
        group = spread_keyframe_groups(n, settings.batch_size, settings.max_keyframes)
        keyframes = keyframe_plan(n, group, len(timesteps), settings.seed, settings.keyframes)
        blend = settings.blend
        log.info("TokenFlow: keyframe plan: groups of %d frames, %d keyframes per step, %s keyframes, seed %d, "
                 "blend %s", group, keyframes.shape[1], settings.keyframes, settings.seed, blend)
    needs = editor.step_needs(full, options, layout, unet)
    return EditPlan(
        timesteps=timesteps,
        trajectory_steps=[inversion.step_of(t) for t in timesteps],
        schedule=KeyframeSchedule(keyframes, group, blend),
        needs=[needs[t] for t in timesteps],
        correspondences=correspondences,
    )
