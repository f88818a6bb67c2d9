"""The model's CFG hooks on one frame subset of a TokenFlow step, called as the host's ``sampling_function`` and
``cfg_function`` call them (comfy/samplers.py; the same arguments on every tested host, scripts/hosts.sh).

A plain sampler hands its hooks the whole batch's processed conds; a TokenFlow step combines its predictions per
frame subset, so every hook gets that subset's own conds (``FrameSubsetGuider.conds_for``):

- ``sampler_pre_cfg_function`` (FreSca, TCFG, ...): ``conds`` is ``[cond, uncond]``, ``uncond`` None when cfg 1
  skips the negative branch, as the host's;
- ``sampler_cfg_function``: through the host's own ``cfg_function``, given ``cond`` / ``uncond``;
- ``sampler_post_cfg_function`` (SkipLayerGuidance, PerturbedAttentionGuidance, ...): a function that calls the
  model again (its perturbed pass) gets options carrying a TokenFlow pass of its own, so that pass is a TokenFlow
  prediction of the perturbed model too: its keyframes attend to each other and are recorded in a bank of the
  function's own (:func:`guidance_banks`), its frames are propagated from them, along the step's fields.

``sampler_calc_cond_batch_function`` (SkipLayerGuidanceDiTSimple) runs the edit branches' calls themselves
(``FrameSubsetGuider.calc_on_frames``).
"""
from __future__ import annotations

import torch

import comfy.samplers

from ..patches.contract import StepBank

PRE_CFG, POST_CFG = "sampler_pre_cfg_function", "sampler_post_cfg_function"


def guidance_banks(model_options: dict, bank: StepBank) -> list[StepBank]:
    """One bank per post-CFG function, for the keyframe outputs of its own model calls; the step's source
    features (PnP queries / keys, residuals) and fields are the step's, shared (its bank clears them)."""
    return [StepBank(pnp_qk=bank.pnp_qk, fields=bank.fields, residuals=bank.residuals)
            for _ in model_options.get(POST_CFG, [])]


def apply_cfg(model, preds: list[torch.Tensor], cond: list | None, uncond: list | None, cond_scale: float,
              x: torch.Tensor, timestep: torch.Tensor, model_options: dict, post_options: list[dict]) -> torch.Tensor:
    """CFG of one frame subset: ``preds`` [cond, uncond] predictions, ``cond`` / ``uncond`` the subset's processed
    conds, ``post_options`` the options each post-CFG function is given (its pass)."""
    conds = [cond, uncond]
    for fn in model_options.get(PRE_CFG, []):
        preds = fn({"conds": conds, "conds_out": preds, "cond_scale": cond_scale, "timestep": timestep,
                    "input": x, "sigma": timestep, "model": model, "model_options": model_options})
    cond_pred, uncond_pred = preds[0], preds[1]
    # The host's cfg_function without the post-CFG functions, which run below, each with its own pass.
    plain = {**model_options, POST_CFG: []}
    result = comfy.samplers.cfg_function(model, cond_pred, uncond_pred, cond_scale, x, timestep, model_options=plain,
                                         cond=cond, uncond=uncond)
    for fn, options in zip(model_options.get(POST_CFG, []), post_options):
        result = fn({"denoised": result, "cond": cond, "uncond": uncond, "cond_scale": cond_scale, "model": model,
                     "uncond_denoised": uncond_pred, "cond_denoised": cond_pred, "sigma": timestep,
                     "model_options": options, "input": x})
    return result
