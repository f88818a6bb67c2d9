"""Which timesteps, keyframes and injections one TokenFlow edit uses (resolved before any heavy work)."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..tokenflow_ops.keyframes import KeyframeSchedule, keyframe_plan, spread_keyframe_groups
from ..tokenflow_ops.schedule import check_inversion_covers, editing_timesteps
from .edit_settings import EditSettings
from .editors import StepNeeds, editor_options, get_editor
from .model_support import ModelLayout
from .validation import check_blend, check_correspondences_cover, clamp_batch_size
from ..data.products import TokenFlowCorrespondences, TokenFlowInversion

__all__ = ["EditPlan", "EditSettings", "make_plan"]

log = logging.getLogger(__name__)


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



def keyframe_schedule(n_frames: int, steps: int, batch_size: int, max_keyframes: int, seed: int, mode: str,
                      blend: str) -> KeyframeSchedule:
    """The keyframe plan of a run that draws its own (an edit without correspondences, an extraction)."""
    group = spread_keyframe_groups(n_frames, clamp_batch_size(batch_size, n_frames), max_keyframes)
    keyframes = keyframe_plan(n_frames, group, steps, seed, mode)
    log.info("TokenFlow: keyframe plan: groups of %d frames, %d keyframes per step, %s keyframes, seed %d, blend %s",
             group, keyframes.shape[1], mode, seed, blend)
    return KeyframeSchedule(keyframes, group, blend)


def make_plan(settings: EditSettings, inversion: TokenFlowInversion, layout: ModelLayout, unet: torch.nn.Module,
              correspondences: TokenFlowCorrespondences | None) -> EditPlan:
    editor = get_editor(settings.editor)
    check_blend(settings.blend)
    steps = settings.steps or inversion.steps
    check_inversion_covers(steps, inversion.steps, inversion_name="the inversion's steps",
                           fix="; sampler steps 0 uses the inversion's count (another count means inverting again)")
    full = editing_timesteps(steps)
    options = editor_options(editor, settings.editor_options)
    timesteps = editor.timesteps(steps, options)
    n = inversion.n_frames
    if correspondences is not None:
        check_correspondences_cover(correspondences, timesteps)
        rows = [correspondences.timesteps.index(t) for t in timesteps]
        schedule = KeyframeSchedule(correspondences.keyframes[rows], correspondences.group_size, correspondences.blend)
        log.info("TokenFlow: keyframe plan from the correspondences: groups of %d frames, %d keyframes per step, "
                 "blend %s (the sampler's batch_size, keyframes, seed, blend and max_keyframes are not used)",
                 schedule.group_size, schedule.keyframes.shape[1], schedule.blend)
    else:
        schedule = keyframe_schedule(n, len(timesteps), settings.batch_size, settings.max_keyframes, settings.seed,
                                     settings.keyframes, settings.blend)
    needs = editor.step_needs(full, options, layout, unet)
    return EditPlan(
        timesteps=timesteps,
        trajectory_steps=[inversion.step_of(t) for t in timesteps],
        schedule=schedule,
        needs=[needs[t] for t in timesteps],
        correspondences=correspondences,
    )
