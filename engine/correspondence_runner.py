"""Extraction of TokenFlow's correspondences from a clean source pass (the paper's framing).

At every editing step the inverted source latents run through the UNet with ordinary
self-attention: first the step's keyframes (their ``norm1`` tokens are recorded per block),
then every batch of frames, whose tokens are matched to their keyframes' tokens. Only the
compact integer fields are kept.
"""
from __future__ import annotations

import functools
import logging
from typing import Any

import torch

import comfy.model_management
import comfy.samplers
import comfy.utils

from ..tokenflow_ops.correspondence import field_dtype
from ..tokenflow_ops.schedule import alpha_bar_from_sigma
from .attention_patches import PassContext, Phase, StepBank
from .call_sizing import even_chunks, frames_per_call
from .frame_guider import FrameSubsetGuider, frame_ids, to_host
from .edit_plan import keyframe_schedule
from .patched_model import patched_clone
from ..data.products import TokenFlowCorrespondences, TokenFlowInversion, inversion_fingerprint
from .validation import check_run_on_inversion

log = logging.getLogger(__name__)


class ExtractionGuider(FrameSubsetGuider):
    def __init__(self, model_patcher, corr: TokenFlowCorrespondences, n_frames: int) -> None:
        super().__init__(model_patcher)
        self.corr = corr
        self.n_frames = n_frames
        self.progress = comfy.utils.ProgressBar(len(corr.timesteps) * n_frames)
        self._pending: list[tuple[int, Any, torch.Tensor, torch.Tensor]] = []  # fields still on their way to the host

    def _sink(self, step: int, block, frames: torch.Tensor, fields: torch.Tensor) -> None:
        tokens = fields.shape[-1]
        self._pending.append((step, block, frames, to_host(fields, field_dtype(tokens))))

    def store_fields(self) -> None:
        """Move the collected fields into the product (after sampling, when every copy has landed)."""
        for step, block, frames, fields in self._pending:
            store = self.corr.fields.get(block)
            if store is None:
                store = torch.empty((len(self.corr.timesteps), self.n_frames, 2, fields.shape[-1]), dtype=fields.dtype)
                self.corr.fields[block] = store
            store[step, frames] = fields
        self._pending.clear()

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


def _extraction_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, source=None,
                        host_sigmas: list[float] | None = None, begin_step=None):
    """Evaluates the model on the stored source latents of every step; ``x`` is returned unchanged."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i, sigma in enumerate(sigmas):
        comfy.model_management.throw_exception_if_processing_interrupted()
        begin_step(i)
        abar = float(alpha_bar_from_sigma(host_sigmas[i]))
        model(source[i].to(device=x.device, dtype=x.dtype, non_blocking=True) / abar ** 0.5, sigma * s_in, **extra_args)
    return x


def planned_correspondences(inversion: TokenFlowInversion, model_fingerprint: str, batch_size: int, keyframes: str,
                            seed: int, blend: str, max_keyframes: int) -> TokenFlowCorrespondences:
    """The product an extraction fills: its keyframe plan made, no fields yet (every sampling path)."""
    schedule = keyframe_schedule(inversion.n_frames, inversion.steps, batch_size, max_keyframes, seed, keyframes, blend)
    return TokenFlowCorrespondences(
        timesteps=list(inversion.timesteps), keyframes=schedule.keyframes, group_size=schedule.group_size,
        blend=schedule.blend, inversion_fingerprint=inversion_fingerprint(inversion),
        model_fingerprint=model_fingerprint)


@torch.no_grad()
def run_ddpm_extraction(model, inversion: TokenFlowInversion, batch_size: int, keyframes: str, seed: int,
                        blend: str = "official", max_keyframes: int = 0) -> TokenFlowCorrespondences:
    layout, fingerprint = check_run_on_inversion(model, inversion)
    n = inversion.n_frames
    corr = planned_correspondences(inversion, fingerprint, batch_size, keyframes, seed, blend, max_keyframes)
    sigmas = inversion.sigmas[:-1].float()
    guider = ExtractionGuider(patched_clone(model, layout), corr, n)
    guider.inner_set_conds({"positive": inversion.conditioning})
    guider.set_cfg(1.0)
    sampler = comfy.samplers.KSAMPLER(_extraction_sampler, extra_options={
        "source": inversion.trajectory, "host_sigmas": sigmas.double().tolist(), "begin_step": guider.begin_step})
    zeros = torch.zeros((n,) + inversion.latent_shape)
    log.info("TokenFlow: extracting correspondences for %d frames over %d steps", n, inversion.steps)
    guider.sample(zeros, zeros, sampler, sigmas, seed=seed, disable_pbar=True)
    guider.store_fields()
    log.info("TokenFlow: correspondences hold %.1f MiB", corr.nbytes() / 2**20)
    return corr
