"""Which timesteps, keyframes and injections a TokenFlow run uses, resolved before any heavy work.

The keyframe plan of a run that draws one (an edit without correspondences, an extraction) is
:func:`keyframe_schedule`; an edit's whole plan is :func:`make_plan`; the product an extraction fills is
:func:`planned_correspondences`. The plan's own refusals (blend mode, correspondences covering the
edit's steps) and the batch-size clamp live here with it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ...data.products import TokenFlowCorrespondences, TokenFlowInversion, inversion_fingerprint
from ...tokenflow_ops.keyframes import BLEND_MODES, KeyframeSchedule, keyframe_plan, spread_keyframe_groups
from ...tokenflow_ops.schedule import check_inversion_covers, editing_timesteps
from ..editors import StepNeeds, editor_options, get_editor
from ..families.base import ModelLayout
from .settings import EditSettings

__all__ = ["EditPlan", "check_blend", "check_correspondences_cover", "clamp_batch_size", "keyframe_schedule",
           "make_plan", "planned_correspondences"]

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


def clamp_batch_size(batch_size: int, n_frames: int) -> int:
    """A batch_size larger than the clip means one batch: clamp it and say so."""
    if batch_size > n_frames:
        log.warning("TokenFlow: batch_size %d is larger than the clip (%d frames); using %d (one batch, one keyframe "
                    "per step)", batch_size, n_frames, n_frames)
        return n_frames
    return batch_size


def check_blend(blend: str) -> None:
    if blend not in BLEND_MODES:
        raise ValueError(f"blend must be one of {BLEND_MODES}, got {blend!r}")


def check_correspondences_cover(corr: TokenFlowCorrespondences, timesteps: list[int]) -> None:
    """The correspondences hold every timestep the edit visits."""
    absent = [t for t in timesteps if t not in corr.timesteps]
    if absent:
        raise ValueError(f"correspondences: extracted for {len(corr.timesteps)} steps, which do not cover timestep "
                         f"{absent[0]}; extract them with the same steps as this edit")


def keyframe_schedule(n_frames: int, steps: int, batch_size: int, max_keyframes: int, seed: int, mode: str,
                      blend: str) -> KeyframeSchedule:
    """The keyframe plan of a run that draws its own (an edit without correspondences, an extraction)."""
    group = spread_keyframe_groups(n_frames, clamp_batch_size(batch_size, n_frames), max_keyframes)
    keyframes = keyframe_plan(n_frames, group, steps, seed, mode)
    log.info("TokenFlow: keyframe plan: groups of %d frames, %d keyframes per step, %s keyframes, seed %d, blend %s",
             group, keyframes.shape[1], mode, seed, blend)
    return KeyframeSchedule(keyframes, group, blend)


def planned_correspondences(inversion: TokenFlowInversion, model_fingerprint: str, batch_size: int, keyframes: str,
                            seed: int, blend: str, max_keyframes: int) -> TokenFlowCorrespondences:
    """The product an extraction fills: its keyframe plan made, no fields yet (every sampling rule)."""
    schedule = keyframe_schedule(inversion.n_frames, inversion.steps, batch_size, max_keyframes, seed, keyframes, blend)
    return TokenFlowCorrespondences(
        timesteps=list(inversion.timesteps), keyframes=schedule.keyframes, group_size=schedule.group_size,
        blend=schedule.blend, inversion_fingerprint=inversion_fingerprint(inversion),
        model_fingerprint=model_fingerprint)


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
