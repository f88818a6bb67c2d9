"""The engine's UNet call plan: few, large calls per step, counted at the UNet's entry.

A TokenFlow step is a keyframe pass (source, uncond and cond of every keyframe in one call) and a
propagation pass (the three branches of every frame, as many frames per call as memory allows);
B only decides which keyframes a frame blends. Splitting a pass for memory changes rounding only.
"""
from __future__ import annotations

import pytest
import torch

from comfyui_tokenflow.engine.ddpm import invert as ddpm_invert
from comfyui_tokenflow.engine.plan import call_sizing
from tokenflow_helpers import INVERSION_STEPS, STEPS, conds, edit, extract, invert, random_latent

FRAMES = 40  # the official clip length: 5 batches of B = 8, so 5 keyframes per step


class UNetEntry:
    """Batch size of every forward call of a diffusion model (a pre-hook, removed on exit)."""

    def __init__(self, model) -> None:
        self.unet = model.model.diffusion_model
        self.batches: list[int] = []

    def __enter__(self) -> "UNetEntry":
        self.handle = self.unet.register_forward_pre_hook(lambda module, args: self.batches.append(args[0].shape[0]))
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@pytest.fixture(scope="module")
def clip40(tiny_sd15):
    src, pos, neg = conds(tiny_sd15)
    with UNetEntry(tiny_sd15) as calls:  # frame_batch 0: as many frames per call as memory allows
        inversion = ddpm_invert.run_inversion(tiny_sd15, random_latent(FRAMES, seed=2), src, STEPS,
                                              INVERSION_STEPS, frame_batch=0)
    return src, pos, neg, inversion, calls.batches


def test_inversion_runs_every_frame_in_one_call_per_step(clip40):
    *_, inversion, batches = clip40
    assert batches == [FRAMES] * inversion.inversion_steps


def test_pnp_on_the_fly_is_two_unet_calls_per_step(tiny_sd15, clip40):
    _, pos, neg, inversion, _ = clip40
    keyframes = FRAMES // 8
    with UNetEntry(tiny_sd15) as calls:
        edit(tiny_sd15, pos, neg, inversion, editor="pnp", batch_size=8)
    # per step: [source, uncond, cond] x keyframes, then [source, uncond, cond] x every frame
    assert calls.batches == [3 * keyframes, 3 * FRAMES] * inversion.steps


def test_extracted_correspondences_need_no_source_branch_without_injection(tiny_sd15, clip40):
    _, pos, neg, inversion, _ = clip40
    corr = extract(tiny_sd15, inversion, batch_size=8)
    keyframes = FRAMES // 8
    for editor in ("sdedit", "controlnet"):
        with UNetEntry(tiny_sd15) as calls:
            edit(tiny_sd15, pos, neg, inversion, editor=editor, correspondences=corr, batch_size=8)
        steps = len(calls.batches) // 2
        assert calls.batches == [2 * keyframes, 2 * FRAMES] * steps, editor
    with UNetEntry(tiny_sd15) as calls:
        edit(tiny_sd15, pos, neg, inversion, editor="pnp", correspondences=corr, batch_size=8)
    residual_steps = int(inversion.steps * 0.8)  # pnp_f_t: the source feeds the residual injection, then stops
    expected = [3 * keyframes, FRAMES, 2 * FRAMES] * residual_steps
    expected += [2 * keyframes, 2 * FRAMES] * (inversion.steps - residual_steps)
    assert calls.batches == expected


def test_extraction_is_one_keyframe_call_and_one_frame_call_per_step(tiny_sd15, clip40):
    *_, inversion, _ = clip40
    with UNetEntry(tiny_sd15) as calls:
        extract(tiny_sd15, inversion, batch_size=8)
    assert calls.batches == [FRAMES // 8, FRAMES] * inversion.steps


def _one_step(model, pos, neg, inversion, **settings):
    return edit(model, pos, neg, inversion, steps=1, **settings)  # the t = 1 step alone


@pytest.mark.parametrize("editor", ["pnp", "sdedit"])
def test_a_pass_split_for_memory_equals_the_unsplit_pass(tiny_sd15, monkeypatch, editor):
    src, pos, neg = conds(tiny_sd15)
    inversion = invert(tiny_sd15, random_latent(12, size=16, seed=4), src)
    whole = _one_step(tiny_sd15, pos, neg, inversion, editor=editor, batch_size=4)
    per_frame = call_sizing.call_bytes(tiny_sd15.model, 3, tuple(inversion.latent_shape))
    monkeypatch.setattr(call_sizing, "CPU_BUDGET_BYTES", int(per_frame * 5))  # 5 frames per call: 3 calls of 4
    with UNetEntry(tiny_sd15) as calls:
        split = _one_step(tiny_sd15, pos, neg, inversion, editor=editor, batch_size=4)
    assert calls.batches == [9] + [12] * 3, "expected the keyframe call and three calls of 4 frames"
    # float32: other call batch sizes round differently (GEMM blocking); one step keeps that unamplified.
    # Observed <= 0.03 of this bound (tests/FP_THRESHOLDS.md); a wrong split moves frames by O(1).
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5 * whole.abs().max().item())


def test_inversion_does_not_depend_on_frame_batch(tiny_sd15):
    src, _, _ = conds(tiny_sd15)
    latent = random_latent(7, size=16, seed=6)
    whole = ddpm_invert.run_inversion(tiny_sd15, latent, src, 1, 2, frame_batch=0)
    with UNetEntry(tiny_sd15) as calls:
        capped = ddpm_invert.run_inversion(tiny_sd15, latent, src, 1, 2, frame_batch=3)
    assert calls.batches == [3, 2, 2] * 2
    # float32 rounding of other call batch sizes over 2 inversion steps (observed <= 0.111 of the bound, FP_THRESHOLDS.md)
    torch.testing.assert_close(capped.trajectory, whole.trajectory, rtol=1e-5, atol=1e-5 * whole.trajectory.abs().max().item())
    torch.testing.assert_close(capped.inverted, whole.inverted, rtol=1e-5, atol=1e-5 * whole.inverted.abs().max().item())


def test_calls_are_sized_from_the_budget_not_the_clip(tiny_sd15):
    shape = (4, 64, 64)
    per_frame = call_sizing.call_bytes(tiny_sd15.model, 3, shape)
    fit = call_sizing.frames_per_call(tiny_sd15.model, 3, shape, torch.device("cpu"), 100000)
    assert fit == int(call_sizing.CPU_BUDGET_BYTES // per_frame) or fit == int(call_sizing.CPU_BUDGET_BYTES // per_frame) - 1
    assert call_sizing.frames_per_call(tiny_sd15.model, 3, (4, 8, 8), torch.device("cpu"), 100000, cap=7) == 7
    assert call_sizing.frames_per_call(tiny_sd15.model, 3, (4, 8, 8), torch.device("cpu"), 5) == 5
    assert [len(r) for r in call_sizing.even_chunks(40, 30)] == [20, 20]
    assert [len(r) for r in call_sizing.even_chunks(5, 2)] == [2, 2, 1]
    assert [len(r) for r in call_sizing.even_chunks(7, 3)] == [3, 2, 2]


@pytest.mark.parametrize("editor", ["pnp", "sdedit"])
def test_comfyui_splitting_a_call_by_conds_still_runs_the_source_branch_first(tiny_sd15, monkeypatch, editor):
    """Short of memory, ComfyUI's calc_cond_batch runs a call's conds one by one, the LAST listed first.

    The source branch must still run before the edit branches of the same frames (they read its tokens
    and PnP features), whatever the split; the result is then that of the unsplit step.
    """
    import comfy.model_management

    src, pos, neg = conds(tiny_sd15)
    inversion = invert(tiny_sd15, random_latent(4, seed=4), src)
    whole = _one_step(tiny_sd15, pos, neg, inversion, editor=editor, batch_size=4)
    one_image = tiny_sd15.model.memory_required([1, *inversion.latent_shape])
    # calc_cond_batch runs a batch if memory_required * 1.5 < free: one cond of one frame fits, two do not.
    monkeypatch.setattr(comfy.model_management, "get_free_memory", lambda *a, **k: one_image * 1.6)
    with UNetEntry(tiny_sd15) as calls:
        split = _one_step(tiny_sd15, pos, neg, inversion, editor=editor, batch_size=4)
    assert max(calls.batches) == 1 and len(calls.batches) == 1 + 2 + 4 * 3, calls.batches
    # float32: other call batch sizes round differently (as in the frame-split test above); a source branch
    # run after its edit branches fails the run or moves frames by O(1).
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-5 * whole.abs().max().item())


def test_a_source_prompt_comfyui_cannot_batch_with_the_edit_prompt_gets_its_own_calls_first(tiny_sd15):
    """A 5 x 77-token edit prompt does not concatenate with the 77-token inversion prompt (calc_cond_batch
    pads text only up to 4x): the source branch then runs in calls of its own, before the edit branches."""
    import tiny_models

    src, _, neg = conds(tiny_sd15)
    long_positive = tiny_models.make_conditioning(tiny_sd15, seed=12, n_tokens=5 * 77)
    inversion = invert(tiny_sd15, random_latent(4, seed=4), src)
    with UNetEntry(tiny_sd15) as calls:
        out = _one_step(tiny_sd15, long_positive, neg, inversion, editor="pnp", batch_size=4)
    # Keyframe pass: source (1 keyframe), then the two edit prompts apart; propagation pass: the same for 4 frames.
    assert calls.batches == [1, 1, 1, 4, 4, 4], calls.batches
    assert torch.isfinite(out).all()
