"""ComfyUI sizes a model's load for the whole latent batch it is handed (``estimate_memory``: every frame, twice
for CFG) and loads the weights partly when that does not fit. TokenFlow hands the whole clip to the sampler but
runs calls of a few frames, split to what fits after loading, so its guiders size the load for the largest call
they cannot split (a ``PREPARE_SAMPLING`` wrapper, as core context windows do): the keyframe pass of an edit or
an extraction, one frame_batch of an inversion."""
from __future__ import annotations

import pytest
import torch

import comfy.patcher_extension
import comfy.sampler_helpers
from comfyui_tokenflow.engine.patches.contract import KEY
from tokenflow_helpers import conds, edit, extract, invert, random_latent

N = 8  # batch_size 4: 2 keyframes per step


@pytest.fixture
def estimated(monkeypatch):
    """The batch sizes ComfyUI's load estimate is asked for, in order."""
    seen: list[int] = []
    estimate = comfy.sampler_helpers.estimate_memory

    def recording(model, noise_shape, conds_):
        seen.append(int(noise_shape[0]))
        return estimate(model, noise_shape, conds_)

    monkeypatch.setattr(comfy.sampler_helpers, "estimate_memory", recording)
    return seen


def test_each_phase_sizes_the_load_for_its_largest_call(tiny_sd15, estimated):
    src, pos, neg = conds(tiny_sd15)
    inversion = invert(tiny_sd15, random_latent(N, seed=3), src)
    assert estimated == [2], "inversion: frame_batch 4 images (the host counts 2 per frame)"
    estimated.clear()
    corr = extract(tiny_sd15, inversion, batch_size=4)
    assert estimated == [1], "extraction: the keyframe pass holds 2 images (the host counts 2 per frame)"
    estimated.clear()
    edit(tiny_sd15, pos, neg, inversion, batch_size=4)  # PnP on the fly, cfg above 1: 2 keyframes x 3 branches
    edit(tiny_sd15, pos, neg, inversion, batch_size=4, correspondences=corr, editor="sdedit")  # no source: x 2
    assert estimated == [3, 2]


def test_the_wrapper_lives_only_in_the_run(tiny_sd15, estimated):
    """Added to the run's own copy of the model options: the patched model keeps no wrapper of the pack's."""
    src, pos, neg = conds(tiny_sd15)
    inversion = invert(tiny_sd15, random_latent(2, seed=3), src)
    edit(tiny_sd15, pos, neg, inversion, batch_size=4)
    assert not comfy.patcher_extension.get_wrappers_with_key(
        comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, KEY, tiny_sd15.model_options, is_model_options=True)
    assert estimated and all(shape <= 2 for shape in estimated)


def _device_total(monkeypatch, total: float) -> None:
    import comfy.model_management

    monkeypatch.setattr(comfy.model_management, "get_total_memory", lambda *args, **kwargs: total)


def test_weights_that_do_not_fit_are_loaded_partly_not_refused(tiny_sd15, monkeypatch):
    """The frame-size check counts one call's activations and ComfyUI's minimum inference memory, not the weights:
    ComfyUI keeps what does not fit off the device (Flux-dev bf16 on a 24 GB card)."""
    import comfy.model_management
    from comfyui_tokenflow.engine.plan.call_sizing import call_bytes, check_frame_size_fits

    shape = (4, 16, 16)
    activations = call_bytes(tiny_sd15.model, 1, shape) + comfy.model_management.minimum_inference_memory()
    _device_total(monkeypatch, activations + tiny_sd15.model_size() / 2)  # the weights do not fit beside them
    check_frame_size_fits(tiny_sd15, shape, "latent")
    _device_total(monkeypatch, activations - 1)
    with pytest.raises(ValueError, match=r"^latent: one model call on a single 128x128 px frame needs about .* "
                                         r"lower the resolution to \d+x\d+ px or less"):
        check_frame_size_fits(tiny_sd15, shape, "latent")


def test_the_advised_size_fits(tiny_sd15, monkeypatch):
    """The size the refusal names passes the same check (the advice leads to a run)."""
    import re

    import comfy.model_management
    from comfyui_tokenflow.engine.plan.call_sizing import call_bytes, check_frame_size_fits

    shape = (4, 96, 64)  # 512x768 px
    _device_total(monkeypatch, call_bytes(tiny_sd15.model, 1, (4, 48, 32))
                  + comfy.model_management.minimum_inference_memory())
    with pytest.raises(ValueError) as refused:
        check_frame_size_fits(tiny_sd15, shape, "latent")
    width, height = map(int, re.search(r"to (\d+)x(\d+) px", str(refused.value)).groups())
    assert width % 64 == 0 and height % 64 == 0 and (width, height) <= (512, 768)
    check_frame_size_fits(tiny_sd15, (4, height // 8, width // 8), "latent")
    with pytest.raises(ValueError):  # the next size up would not have fitted
        check_frame_size_fits(tiny_sd15, (4, round((width + 64) * 1.5 / 64) * 8, (width + 64) // 8), "latent")


def test_the_flow_edit_checks_the_frame_size_too(monkeypatch):
    """Every path runs the check before any model call: the flow edit of a Flux inversion on a device too small."""
    import tiny_dit_models
    from comfyui_tokenflow.nodes import inversion_nodes, sampler_nodes

    model = tiny_dit_models.make_flux_model(seed=0)
    src, pos, neg = (tiny_dit_models.flux_conditioning(seed=s) for s in (1, 2, 3))
    frames = {"samples": torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))}
    inversion, _ = inversion_nodes.TokenFlowInvert.execute(model, frames, src, 2, 4).args
    _device_total(monkeypatch, 1.0)
    calls = []
    hook = model.model.diffusion_model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"^inversion: one model call on a single 64x64 px frame"):
            sampler_nodes.TokenFlowSampler.execute(model, pos, neg, inversion, editor="pnp", cfg=1.0, pnp_attn_t=0.5,
                                                   pnp_f_t=0.8, sdedit_start=0.9, batch_size=2, keyframes="random",
                                                   seed=1)
    finally:
        hook.remove()
    assert not calls
