"""Extraction of TokenFlow's correspondences from a clean source pass (the paper's framing).

At every editing step the inverted source latents run through the UNet with ordinary
self-attention: first the step's keyframes (their ``norm1`` tokens are recorded per block),
then every batch of frames, whose tokens are matched to their keyframes' tokens. Only the
compact integer fields are kept.
"""
from __future__ import annotations

import functools
import logging

import torch

import comfy.model_management
import comfy.samplers
import comfy.utils

from ..tokenflow_ops.correspondence import field_dtype
from ..tokenflow_ops.keyframes import keyframe_plan, spread_keyframe_groups
from .attention_patches import PassContext, Phase, StepBank, install_tokenflow_patches
from .call_sizing import even_chunks, frames_per_call
from .frame_guider import FrameSubsetGuider
from .model_support import check_supported, model_fingerprint
from .products import TokenFlowCorrespondences, TokenFlowInversion, inversion_fingerprint
from .validation import check_batch_size, check_inversion_model

log = logging.getLogger(__name__)


class ExtractionGuider(FrameSubsetGuider):
    def __init__(self, model_patcher, corr: TokenFlowCorrespondences, n_frames: int, sigmas: torch.Tensor) -> None:
        super().__init__(model_patcher)
        self.corr = corr
        self.n_frames = n_frames
        self.step_sigmas = sigmas.double()
        self.progress = comfy.utils.ProgressBar(len(corr.timesteps) * n_frames)

    def _sink(self, step: int, block, frames: torch.Tensor, fields: torch.Tensor) -> None:
        store = self.corr.fields.get(block)
        if store is None:
            tokens = fields.shape[-1]
            store = torch.empty((len(self.corr.timesteps), self.n_frames, 2, tokens), dtype=field_dtype(tokens))
            self.corr.fields[block] = store
        store[step, frames] = fields.to(device="cpu", dtype=store.dtype)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        step = int((self.step_sigmas - float(timestep.flatten()[0])).abs().argmin())
        n = x.shape[0]
        keyframes = self.corr.keyframes[step]
        bank = StepBank()
        common = dict(bank=bank, pairing=self.corr.pairing(step, n), field_sink=functools.partial(self._sink, step),
                      source_index=0, keyframes=len(keyframes))
        try:
            self.calc_on_frames(["positive"], x, timestep, keyframes, model_options,
                                PassContext(Phase.EXTRACT_KEYFRAMES, frames=keyframes, **common), n, cache=False)
            per_call = frames_per_call(self.inner_model, 1, tuple(x.shape[1:]), x.device, n)
            for frames in even_chunks(n, per_call):
                idx = torch.arange(frames.start, frames.stop)
                bank.fields.clear()
                self.calc_on_frames(["positive"], x, timestep, idx, model_options,
                                    PassContext(Phase.EXTRACT_FRAMES, frames=idx, **common), n)
                self.progress.update(len(idx))
        finally:
            bank.clear()
        return x


def _extraction_sampler(model, x, sigmas, extra_args=None, callback=None, disable=None, source=None):
    """Evaluates the model on the stored source latents of every step; ``x`` is returned unchanged."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i, sigma in enumerate(sigmas):
        comfy.model_management.throw_exception_if_processing_interrupted()
        abar = 1.0 / (1.0 + float(sigma.double()) ** 2)
        model(source[i].to(device=x.device, dtype=x.dtype) / abar ** 0.5, sigma * s_in, **extra_args)
    return x


@torch.no_grad()
def run_extraction(model, inversion: TokenFlowInversion, batch_size: int, keyframes: str, seed: int,
                   blend: str = "official", max_keyframes: int = 0) -> TokenFlowCorrespondences:
    layout = check_supported(model)
    fingerprint = model_fingerprint(model)
    check_inversion_model(inversion, fingerprint)
    n = inversion.n_frames
    check_batch_size(batch_size, n)
    group = spread_keyframe_groups(n, batch_size, max_keyframes)
    corr = TokenFlowCorrespondences(
        timesteps=list(inversion.timesteps), keyframes=keyframe_plan(n, group, inversion.steps, seed, keyframes),
        group_size=group, blend=blend, inversion_fingerprint=inversion_fingerprint(inversion),
        model_fingerprint=fingerprint)
    sigmas = inversion.sigmas[:-1].float()
    patched = model.clone()
    install_tokenflow_patches(patched, layout)
    guider = ExtractionGuider(patched, corr, n, sigmas)
    guider.inner_set_conds({"positive": inversion.conditioning})
    guider.set_cfg(1.0)
    sampler = comfy.samplers.KSAMPLER(_extraction_sampler, extra_options={"source": inversion.trajectory})
    zeros = torch.zeros((n,) + inversion.latent_shape)
    log.info("TokenFlow: extracting correspondences for %d frames over %d steps", n, inversion.steps)
    guider.sample(zeros, zeros, sampler, sigmas, seed=seed, disable_pbar=True)
    log.info("TokenFlow: correspondences hold %.1f MiB", corr.nbytes() / 2**20)
    return corr
