"""Extraction of TokenFlow's correspondences, the loop both sampling rules share.

At every editing step the inverted source latents run through the patched clone with the source
branch alone: first the step's keyframes (their tokens are recorded per block), then every batch of
frames, whose tokens are matched to their keyframes' tokens (calls sized by memory). Only the compact
integer fields are kept: the patches hand them to the guider's sink, which moves them to the host.
Each rule brings the sampler that feeds the source latents as its model sees them.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import torch

import comfy.utils

from ...data.products import TokenFlowCorrespondences, TokenFlowInversion
from ...tokenflow_ops.correspondence import field_dtype
from ..families.base import ModelLayout
from ..patches.contract import PassContext, Phase, StepBank
from ..patches.install import patched_clone
from ..plan.call_sizing import even_chunks, frames_per_call
from ..plan.edit_plan import planned_correspondences
from .frame_guider import FrameSubsetGuider, frame_ids
from .host_staging import HostStaging

log = logging.getLogger(__name__)


class ExtractionGuider(FrameSubsetGuider):
    def __init__(self, model_patcher, corr: TokenFlowCorrespondences, n_frames: int) -> None:
        super().__init__(model_patcher)
        self.corr = corr
        self.n_frames = n_frames
        self.progress = comfy.utils.ProgressBar(len(corr.timesteps) * n_frames)
        self._pending: list[tuple[int, Any, torch.Tensor, torch.Tensor]] = []  # fields still on their way to the host
        self._staging = HostStaging()

    def _sink(self, step: int, block, frames: torch.Tensor, fields: torch.Tensor) -> None:
        tokens = fields.shape[-1]
        self._pending.append((step, block, frames, self._staging.copy(fields, field_dtype(tokens))))

    def store_fields(self) -> None:
        """Move the collected fields into the product (after sampling, once every copy has landed)."""
        self._staging.finish()
        for step, block, frames, fields in self._pending:
            store = self.corr.fields.get(block)
            if store is None:
                store = torch.empty((len(self.corr.timesteps), self.n_frames, 2, fields.shape[-1]), dtype=fields.dtype)
                self.corr.fields[block] = store
            store[step, frames] = fields
        self._pending.clear()

    def drop_fields(self) -> None:
        """Forget the collected fields (the run stopped): the copies land and the staging ring is released."""
        self._staging.finish()
        self._pending.clear()

    def largest_call_images(self, n_frames: int) -> int:
        """The keyframe pass of the source branch: every keyframe in one call."""
        return max((len(k) for k in self.corr.keyframes), default=1)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        step = self.current_step
        n = x.shape[0]
        keyframes = self.corr.keyframes[step]
        bank = StepBank()
        common = dict(bank=bank, pairing=self.corr.schedule.pairing(step, n), field_sink=functools.partial(self._sink, step),
                      source_index=0, keyframes=len(keyframes))
        try:
            self.calc_on_frames(["positive"], x, timestep, keyframes, model_options,
                                PassContext(Phase.EXTRACT_KEYFRAMES, frames=keyframes, **common), n, cache=False)
            per_call = frames_per_call(self.inner_model, 1, tuple(x.shape[1:]), x.device, n)
            for frames in even_chunks(n, per_call):
                bank.fields.clear()
                self.calc_on_frames(["positive"], x, timestep, frames, model_options,
                                    PassContext(Phase.EXTRACT_FRAMES, frames=frame_ids(frames), **common), n)
                self.progress.update(len(frames))
        finally:
            bank.clear()
        return x


@torch.no_grad()
def extract(model, inversion: TokenFlowInversion, layout: ModelLayout, fingerprint: str, batch_size: int,
            keyframes: str, seed: int, blend: str, max_keyframes: int,
            make_sampler: Callable[[ExtractionGuider, torch.Tensor], Any], what: str = "") -> TokenFlowCorrespondences:
    """The correspondences of ``inversion`` (its inputs already checked): the keyframe plan drawn, the source
    run through the patched clone by the rule's sampler (``make_sampler(guider, sigmas)``), the fields stored.
    ``what`` ends the log line (e.g. " on a flux model")."""
    n = inversion.n_frames
    corr = planned_correspondences(inversion, fingerprint, batch_size, keyframes, seed, blend, max_keyframes)
    sigmas = inversion.sigmas[:-1].float()
    guider = ExtractionGuider(patched_clone(model, layout), corr, n)
    guider.inner_set_conds({"positive": inversion.conditioning})
    guider.set_cfg(1.0)
    sampler = make_sampler(guider, sigmas)
    zeros = torch.zeros((n,) + inversion.latent_shape)
    log.info("TokenFlow: extracting correspondences for %d frames over %d steps%s", n, inversion.steps, what)
    try:
        guider.sample(zeros, zeros, sampler, sigmas, seed=seed, disable_pbar=True)
    except BaseException:
        guider.drop_fields()  # an interrupted run leaves no page-locked ring behind
        raise
    guider.store_fields()
    log.info("TokenFlow: correspondences hold %.1f MiB", corr.nbytes() / 2**20)
    return corr
