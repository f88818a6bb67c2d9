"""TokenFlow on known inputs: static videos, translation, PnP layers, untouched input model, odd frame counts."""
from __future__ import annotations

import copy

import pytest
import torch

import comfy.sample
import comfy.samplers
from comfyui_tokenflow.engine.families import registry
from comfyui_tokenflow.tokenflow_ops import schedule
from tokenflow_helpers import STEPS, conds, double, edit, extract, float64_copy, invert, random_latent


@pytest.fixture(scope="module")
def prompts(tiny_sd15):
    return conds(tiny_sd15)


@pytest.fixture(scope="module")
def static(tiny_sd15):
    """A 5-frame static clip and its single frame, inverted with a float64 copy of the tiny UNet.

    In float32 the tiny UNet turns the rounding of different call layouts (5 frames x 3 branches in
    one call against 1 x 3) into visible noise; in float64 only the algorithm's differences remain.
    """
    model = float64_copy(tiny_sd15)
    prompts64 = [double(c) for c in conds(model)]
    frame = random_latent(1, seed=5)
    single = invert(model, frame, prompts64[0])
    video = invert(model, {"samples": frame["samples"].repeat(5, 1, 1, 1)}, prompts64[0])
    return model, prompts64, single, video


STATIC_MODES = [
    dict(editor="pnp"), dict(editor="sdedit"), dict(editor="controlnet"),
    dict(editor="pnp", keyframes="fixed"), dict(editor="pnp", blend="paper"), dict(editor="pnp", max_keyframes=2),
    dict(editor="pnp", extracted=True), dict(editor="sdedit", extracted=True),
]


@pytest.mark.parametrize("mode", STATIC_MODES, ids=lambda m: "-".join(f"{k}={v}" for k, v in m.items()))
def test_static_video_equals_single_frame_edit(static, mode):
    model, (_, pos, neg), single, video = static
    mode = dict(mode)
    extracted = mode.pop("extracted", False)
    corr = extract(model, video, batch_size=2) if extracted else None
    corr_single = extract(model, single, batch_size=1) if extracted else None
    frames = edit(model, pos, neg, video, correspondences=corr, **{"batch_size": 2, **mode})
    alone = edit(model, pos, neg, single, correspondences=corr_single, **{**mode, "batch_size": 1})
    scale = alone.abs().max()
    for i in range(frames.shape[0]):
        torch.testing.assert_close(frames[i], alone[0], rtol=0, atol=1e-3 * scale)  # rounding, amplified by the random UNet


def _translated_video(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    texture = torch.randn(1, 4, size, size + n, generator=g)
    texture = torch.nn.functional.avg_pool2d(texture, 3, 1, 1) * 3  # some spatial coherence, like real latents
    return torch.cat([texture[..., i:i + size] for i in range(n)])


def test_extracted_correspondences_recover_translation(tiny_sd15, prompts):
    """Frame i is the texture shifted by i latent pixels: token (y, x) of frame i matches (y, x + i - k) in keyframe k."""
    n, size, margin = 6, 16, 3
    inversion = invert(tiny_sd15, {"samples": _translated_video(n, size)}, prompts[0])
    corr = extract(tiny_sd15, inversion, batch_size=3)
    step = len(corr.timesteps) - 1  # the cleanest source pass
    pairing = corr.schedule.pairing(step, n)
    fine = [b for b, f in corr.fields.items() if f.shape[-1] == size * size]
    assert {b[0] for b in fine} == {"input", "output"}, "expected encoder and decoder blocks at latent resolution"
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    for block in fine:
        hits = total = 0
        mode_ok = 0
        for i in range(n):
            k = int(corr.keyframes[step, int(pairing.slots[i, 0])])
            expected_x = xs + (i - k)
            inside = (xs >= margin) & (xs < size - margin) & (ys >= margin) & (ys < size - margin)
            inside &= (expected_x >= margin) & (expected_x < size - margin)
            got = corr.fields[block][step, i, 0].long().view(size, size)
            hits += int(((got == ys * size + expected_x) & inside).sum())
            total += int(inside.sum())
            shifts = (got % size - xs)[inside & (got // size == ys)]
            mode_ok += int(shifts.numel() > 0 and int(shifts.mode().values) == i - k)
        assert mode_ok == n, f"{block}: the dominant displacement is not the translation for every frame"
        if block[0] == "input":  # encoder features at full resolution are matched almost exactly
            assert hits / total > 0.95, f"{block}: translation recovered for {hits}/{total} interior tokens"


def test_pnp_injects_at_the_spec_layers_and_steps_only(tiny_sd15, prompts):
    src, pos, neg = prompts
    inversion = invert(tiny_sd15, random_latent(3), src)
    trace: list = []
    edit(tiny_sd15, pos, neg, inversion, editor="pnp", trace=trace)
    full = schedule.editing_timesteps(STEPS)
    decoder_blocks = {("output", i, 0) for i in range(4, 12)}
    attention = {(x[0], x[2]) for x in trace if x[1] == "attention"}
    assert attention == {(t, b) for t in full[:int(STEPS * 0.5)] for b in decoder_blocks}
    assert {x[3] for x in trace if x[1] == "attention"} == {"edit_keyframes"}
    residual = {(x[0], x[2], x[3]) for x in trace if x[1] == "residual"}
    assert residual == {(t, "output_blocks.4.0", phase) for t in full[:int(STEPS * 0.8)]
                        for phase in ("edit_keyframes", "edit_frames")}
    for editor in ("sdedit", "controlnet"):
        trace = []
        edit(tiny_sd15, pos, neg, inversion, editor=editor, trace=trace)
        assert trace == []


def test_default_pnp_layers_follow_the_model_layout(tiny_sd15, tiny_sdxl):
    sd = registry.check_supported(tiny_sd15)
    assert sd.default_pnp_attention == tuple(("output", i, 0) for i in range(4, 12))
    assert sd.default_pnp_residual == ("output_blocks.4.0",)
    assert len(sd.transformer_blocks) == 16
    xl = registry.check_supported(tiny_sdxl)
    assert len(xl.transformer_blocks) == 70 and xl.family == "sdxl"
    assert {b[1] for b in xl.default_pnp_attention} == {1, 2, 3, 4, 5}
    assert xl.default_pnp_residual == ("output_blocks.4.0",)


def _plain_sample(model, pos, neg, latent):
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(3))
    return comfy.sample.sample(model, noise, 3, 5.0, "euler", "normal", pos, neg, latent, denoise=1.0, seed=3)


def test_input_model_is_untouched(tiny_sd15, prompts):
    model = tiny_sd15.clone()
    src, pos, neg = prompts
    latent = random_latent(3)
    before = _plain_sample(model, pos, neg, latent["samples"])
    options, patches = copy.deepcopy(model.model_options), dict(model.patches)
    wrappers, objects = copy.deepcopy(model.wrappers), dict(model.object_patches)
    inversion = invert(model, latent, src)
    corr = extract(model, inversion)
    edit(model, pos, neg, inversion, editor="pnp")
    edit(model, pos, neg, inversion, editor="sdedit", correspondences=corr)
    assert model.model_options == options and model.patches == patches
    assert model.wrappers == wrappers and model.object_patches == objects
    for module in model.model.diffusion_model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks
    assert torch.equal(_plain_sample(model, pos, neg, latent["samples"]), before)


@pytest.mark.parametrize("n,batch_size", [(1, 1), (2, 1), (2, 2), (3, 2), (7, 3)])
def test_frame_counts_that_are_not_a_multiple_of_the_batch(tiny_sd15, prompts, n, batch_size):
    src, pos, neg = prompts
    inversion = invert(tiny_sd15, random_latent(n, seed=n), src)
    for corr in (None, extract(tiny_sd15, inversion, batch_size=batch_size)):
        out = edit(tiny_sd15, pos, neg, inversion, correspondences=corr, batch_size=batch_size)
        assert out.shape == (n, 4, 8, 8) and torch.isfinite(out).all()


def test_extracted_pnp_stops_the_source_pass_early_without_changing_the_result(tiny_sd15, prompts, monkeypatch):
    from comfyui_tokenflow.engine.sampling import edit_guider

    src, pos, neg = prompts
    inversion = invert(tiny_sd15, random_latent(5, seed=9), src)
    corr = extract(tiny_sd15, inversion)
    unet = tiny_sd15.model.diffusion_model
    calls = []
    handle = unet.out.register_forward_hook(lambda *a: calls.append(1))  # the UNet's last layer
    try:
        fast = edit(tiny_sd15, pos, neg, inversion, correspondences=corr)
        fast_calls = len(calls)
        calls.clear()
        original = edit_guider.TokenFlowGuider.__init__

        def full_source(self, *args, **kwargs):
            original(self, *args, **kwargs)
            self.skip_unused_source = False

        monkeypatch.setattr(edit_guider.TokenFlowGuider, "__init__", full_source)
        full = edit(tiny_sd15, pos, neg, inversion, correspondences=corr)
    finally:
        handle.remove()
    assert torch.equal(fast, full)
    assert fast_calls < len(calls)  # source passes with residual injection never reached the last layer
