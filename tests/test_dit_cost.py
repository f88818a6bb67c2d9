"""Cost of a TokenFlow step on Flux / SD3: model calls per step (the keyframe pass and one propagation pass), on the
fly and with extracted correspondences."""
from __future__ import annotations

import pytest
import torch

import tiny_dit_models
from comfyui_tokenflow.engine.correspondence_runner import run_extraction
from comfyui_tokenflow.engine.edit_plan import EditSettings
from comfyui_tokenflow.engine.flow_edit_runner import run_flow_edit
from comfyui_tokenflow.engine.flow_inversion_runner import run_flow_inversion

STEPS = 4


@pytest.mark.parametrize("family, cfg", [("flux", 1.0), ("sd3", 4.0)])
@pytest.mark.parametrize("editor", ["pnp", "sdedit"])
def test_two_model_calls_per_step(family, cfg, editor):
    make = tiny_dit_models.make_flux_model if family == "flux" else tiny_dit_models.make_sd3_model
    cond = tiny_dit_models.flux_conditioning if family == "flux" else tiny_dit_models.sd3_conditioning
    model = make(seed=0)
    frames = {"samples": torch.randn(6, 16, 8, 8, generator=torch.Generator().manual_seed(0))}
    inversion = run_flow_inversion(model, frames, cond(1), STEPS, STEPS)
    batches: list[int] = []
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        run_flow_edit(model, cond(2), cond(3), inversion, EditSettings.of(editor=editor, cfg=cfg, batch_size=3))
    finally:
        handle.remove()
    steps = STEPS if editor == "pnp" else len([t for t in inversion.timesteps][int(1 - 0.9 * STEPS):])
    branches = 2 if cfg == 1.0 else 3  # source + edit (+ negative): at cfg 1 the negative branch is skipped
    assert len(batches) == 2 * steps, batches  # keyframe pass + one propagation pass per step
    assert batches == [branches * 2, branches * 6] * steps  # 2 keyframes, then all 6 frames, every branch batched


@pytest.mark.parametrize("family, cfg", [("flux", 1.0), ("sd3", 4.0)])
@pytest.mark.parametrize("editor", ["pnp", "sdedit"])
def test_extracted_correspondences_drop_the_source_branch(family, cfg, editor):
    """SDEdit extracted: no source branch at all; PnP extracted: the source only in its injection steps' keyframe pass
    (a DiT has no ResBlocks, so the propagation pass never needs the source)."""
    make = tiny_dit_models.make_flux_model if family == "flux" else tiny_dit_models.make_sd3_model
    cond = tiny_dit_models.flux_conditioning if family == "flux" else tiny_dit_models.sd3_conditioning
    model = make(seed=0)
    frames = {"samples": torch.randn(6, 16, 8, 8, generator=torch.Generator().manual_seed(0))}
    inversion = run_flow_inversion(model, frames, cond(1), STEPS, STEPS)
    batches: list[int] = []
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        corr = run_extraction(model, inversion, 3, "random", 1)
        assert batches == [2, 6] * STEPS  # extraction: the source alone, its keyframes then every frame, each step
        batches.clear()
        run_flow_edit(model, cond(2), cond(3), inversion, EditSettings.of(editor=editor, cfg=cfg, batch_size=3),
                      correspondences=corr)
    finally:
        handle.remove()
    edit = 1 if cfg == 1.0 else 2  # edit branches: positive (+ negative)
    if editor == "sdedit":
        steps = len(inversion.timesteps[int(1 - 0.9 * STEPS):])
        assert batches == [edit * 2, edit * 6] * steps  # keyframe pass + propagation pass, no source branch
    else:
        injected = int(STEPS * 0.5)  # pnp_attn_t 0.5: the source's image values/keys in the first half
        assert batches == [(edit + 1) * 2, edit * 6] * injected + [edit * 2, edit * 6] * (STEPS - injected)
