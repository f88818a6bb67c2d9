"""Shared set-up for the TokenFlow integration tests and the benchmarks: tiny clips and one-call runs of each stage."""
from __future__ import annotations

import tiny_models
from tiny_models import double, float64_copy, random_latent  # noqa: F401  (re-exported for the tests)
from comfyui_tokenflow.engine import sampling_paths
from comfyui_tokenflow.engine.ddpm import edit as ddpm_edit, invert as ddpm_invert
from comfyui_tokenflow.engine.plan.settings import EditSettings

STEPS, INVERSION_STEPS = 5, 10  # editing timesteps 801..1 on the inversion grid 1, 101, ..., 901


def conds(model, seeds=(11, 12, 13)):
    return [tiny_models.make_conditioning(model, seed=s) for s in seeds]


def invert(model, latent, cond, steps=STEPS, inversion_steps=INVERSION_STEPS):
    return ddpm_invert.run_inversion(model, latent, cond, steps, inversion_steps, frame_batch=4)


def edit(model, pos, neg, inversion, correspondences=None, trace=None, **settings):
    """One edit; ``settings`` are the sampler's own (``EditSettings``) and any editor's inputs (``pnp_attn_t``...)."""
    settings.setdefault("batch_size", 2)
    return ddpm_edit.run_edit(model, pos, neg, inversion, EditSettings.of(**settings), correspondences,
                              trace=trace)["samples"]


def extract(model, inversion, batch_size=2, keyframes="random", seed=1, **kwargs):
    return sampling_paths.run_extraction(model, inversion, batch_size, keyframes, seed, **kwargs)
