"""The ControlNet editor on Flux with core's Flux ControlNet (ControlNetFlux), unchanged: per-frame hints reach
their frames in every pass (the source branch then runs in calls of its own)."""
from __future__ import annotations

import torch

import nodes as comfy_nodes
import tiny_dit_models
from comfyui_tokenflow.engine.plan.settings import EditSettings
from comfyui_tokenflow.engine.flow.edit import run_edit as run_flow_edit
from comfyui_tokenflow.engine.flow.invert import run_inversion as run_flow_inversion


def test_flux_controlnet_hints_reach_their_frames():
    model, controlnet = tiny_dit_models.make_flux_model(seed=0), tiny_dit_models.make_flux_controlnet()
    src, pos, neg = (tiny_dit_models.flux_conditioning(seed=s) for s in (1, 2, 3))
    frames = {"samples": torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(0))}
    inversion = run_flow_inversion(model, frames, src, 4, 8)
    hints = torch.rand(3, 64, 64, 3, generator=torch.Generator().manual_seed(3))
    other = hints.clone()
    other[0] = 1.0 - other[0]

    def edit(conditioning):
        return run_flow_edit(model, *conditioning, inversion, EditSettings.of(editor="controlnet", cfg=1.0,
                                                                           batch_size=2))["samples"]

    apply = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet
    base = edit(apply(pos, neg, controlnet, hints, 1.0, 0.0, 1.0))
    moved = edit(apply(pos, neg, controlnet, other, 1.0, 0.0, 1.0))
    plain = edit((pos, neg))
    assert torch.isfinite(base).all() and (base - plain).abs().max() > 1e-2 * plain.abs().max()
    own = (moved[0] - base[0]).abs().max()
    rest = (moved[1:] - base[1:]).abs().max()
    assert own > 5 * rest, (float(own), float(rest))  # frame 0's hint shapes frame 0 (others only through keyframes)
