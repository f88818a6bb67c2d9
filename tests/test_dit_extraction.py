"""Extracted correspondences on tiny real Flux and SD3 models: the on-the-fly edit without its source branch.

float64 copies of the tiny models (the nearest-neighbour search must not be decided by rounding).
"""
from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

import tiny_dit_models
from comfyui_tokenflow.engine.sampling_paths import run_extraction
from comfyui_tokenflow.engine.plan.settings import EditSettings
from comfyui_tokenflow.engine.flow.edit import run_edit as run_flow_edit
from comfyui_tokenflow.engine.flow.invert import run_inversion as run_flow_inversion

STEPS, INVERSION_STEPS, FRAMES, BATCH = 4, 8, 5, 2
# float64 edits that differ only by the batch layout of their model calls (the source chunk present or not):
# measured max |extracted - on the fly| / max |on the fly| = 0 on both families (bit-identical here). Bound: float64
# rounding of other GEMM blockings over 4 steps stays orders below 1e-9, while one wrong field or source input moves
# the result by >= 1e-2 (tests/FP_THRESHOLDS.md).
SAME_EDIT_SHARE = 1e-9

log = logging.getLogger(__name__)


@pytest.fixture(scope="module", params=list(tiny_dit_models.DIT_FAMILIES))
def world(request):
    world = tiny_dit_models.dit_world(request.param, FRAMES)
    world["inversion"] = run_flow_inversion(world["model"], {"samples": world["frames"]}, world["src"], STEPS,
                                            INVERSION_STEPS)
    world["corr"] = run_extraction(world["model"], world["inversion"], BATCH, "random", 1)
    return world


def _edit(world, editor: str, correspondences=None, **settings):
    settings = EditSettings.of(editor=editor, cfg=world["cfg"], batch_size=BATCH, seed=1, **settings)
    return run_flow_edit(world["model"], world["pos"], world["neg"], world["inversion"], settings,
                         correspondences=correspondences)["samples"]


def test_the_product_covers_every_declared_block_and_step(world):
    corr = world["corr"]
    tokens = (8 // 2) ** 2  # 8x8 latents, 2x2 patches
    assert all(f.shape == (STEPS, FRAMES, 2, tokens) for f in corr.fields.values())
    assert all(not f.is_floating_point() for f in corr.fields.values())
    expected = {("double_block", 0, 0), ("double_block", 1, 0)}
    expected |= {("single_block", 0, 0), ("single_block", 1, 0)} if world["family"] == "flux" else \
        {("double_block", 0, 1)}
    assert set(corr.fields) == expected


@pytest.fixture(scope="module")
def fixed_corr(world):
    return run_extraction(world["model"], world["inversion"], BATCH, "fixed", 1)


# PnP visits every step: its on-the-fly keyframe plan (drawn for the visited steps) is the extraction's (drawn for
# every step). SDEdit visits the last steps only, so a random on-the-fly plan is another draw: fixed keyframes.
@pytest.mark.parametrize("editor, keyframes", [("pnp", "random"), ("sdedit", "fixed"), ("pnp", "fixed")])
def test_extracted_edit_equals_the_on_the_fly_edit(world, fixed_corr, editor, keyframes):
    corr = world["corr"] if keyframes == "random" else fixed_corr
    on_the_fly = _edit(world, editor, keyframes=keyframes)
    extracted = _edit(world, editor, corr, keyframes=keyframes)
    scale = on_the_fly.abs().max()
    log.info("%s %s: extracted vs on the fly %.3g", world["family"], editor,
             float((extracted - on_the_fly).abs().max() / scale))
    torch.testing.assert_close(extracted, on_the_fly, rtol=0, atol=SAME_EDIT_SHARE * scale)


def test_other_fields_change_the_edit(world):
    """The fields are read: reversing every frame's matches changes the result (the equality above can fail)."""
    corr = world["corr"]
    flipped = dataclasses.replace(corr, fields={b: f.flip(-1) for b, f in corr.fields.items()})
    reference = _edit(world, "sdedit", corr)
    changed = _edit(world, "sdedit", flipped)
    assert (changed - reference).abs().max() > 1e-3 * reference.abs().max()


def test_correspondences_of_another_inversion_are_refused_before_any_model_call(world):
    other = run_flow_inversion(world["model"], {"samples": world["frames"][:3]}, world["src"], STEPS,
                               INVERSION_STEPS)
    corr = run_extraction(world["model"], other, BATCH, "random", 1)
    calls = []
    handle = world["model"].model.diffusion_model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="^correspondences: .*different inversion"):
            _edit(world, "sdedit", corr)
    finally:
        handle.remove()
    assert not calls


def test_fewer_steps_are_refused(world):
    short = run_flow_inversion(world["model"], {"samples": world["frames"]}, world["src"], 2, INVERSION_STEPS)
    with pytest.raises(ValueError, match="^correspondences: .*different inversion"):
        run_flow_edit(world["model"], world["pos"], world["neg"], short,
                      EditSettings.of(editor="sdedit", cfg=world["cfg"]), correspondences=world["corr"])


@pytest.fixture(scope="module")
def unet_products(tiny_sd15):
    from tokenflow_helpers import conds, extract, invert, random_latent

    src, _, _ = conds(tiny_sd15)
    inversion = invert(tiny_sd15, random_latent(3, seed=0), src, steps=STEPS, inversion_steps=INVERSION_STEPS)
    return dict(model=tiny_sd15, inversion=inversion, corr=extract(tiny_sd15, inversion), cond=conds(tiny_sd15))


def test_unet_correspondences_into_a_dit_edit_are_refused(world, unet_products):
    with pytest.raises(ValueError, match="^correspondences: .*different inversion.*connect the same"):
        _edit(world, "sdedit", unet_products["corr"])


def test_dit_correspondences_into_a_unet_edit_are_refused(world, unet_products):
    from tokenflow_helpers import edit

    _, pos, neg = unet_products["cond"]
    with pytest.raises(ValueError, match="^correspondences: .*different inversion"):
        edit(unet_products["model"], pos, neg, unet_products["inversion"], world["corr"], editor="sdedit")


def test_extraction_refuses_another_models_inversion(world, unet_products):
    with pytest.raises(ValueError, match="^inversion: it was made with a different model"):
        run_extraction(world["model"], dataclasses.replace(world["inversion"], model_fingerprint="other"), BATCH,
                       "random", 1)
    with pytest.raises(ValueError, match="^inversion: it was made with a different model"):  # a UNet, a DiT's
        run_extraction(unet_products["model"], world["inversion"], BATCH, "random", 1)


def _ksample(model, world, latent: torch.Tensor, steps: int = 3) -> torch.Tensor:
    """The core KSampler (euler, simple, denoise 0.5: from sigma < 1, so the frames show) on ``latent``, the same
    noise for every frame (batch_index 0 for all)."""
    import nodes

    batch = {"samples": latent.float(), "batch_index": [0] * latent.shape[0]}
    (out,) = nodes.KSampler().sample(model, 7, steps, world["cfg"], "euler", "simple", world["pos"], world["neg"],
                                     batch, denoise=0.5)
    return out["samples"].double()


def test_joint_edit_model_shares_every_frames_image_tokens(world):
    from comfyui_tokenflow.nodes.joint_edit_nodes import TokenFlowKeyframeJointEdit

    model = world["model"]
    joint = TokenFlowKeyframeJointEdit.execute(model).result[0]
    frame = world["frames"][:1]
    alone = _ksample(model, world, frame)
    scale = alone.abs().max()
    # Identical frames: each image query sees K copies of every key (and K copies of its text): the single frame.
    # float64 model, float32 sampler state: measured 0 on both families; bound: the float32 state's rounding (1e-5).
    static = _ksample(joint, world, frame.repeat(3, 1, 1, 1))
    log.info("%s joint: static vs single frame %.3g", world["family"], float((static - alone).abs().max() / scale))
    for i in range(3):
        torch.testing.assert_close(static[i], alone[0], rtol=0, atol=1e-5 * scale)
    # Different frames: each frame now depends on the others, which it does not with the plain model.
    video = world["frames"][:3]
    plain, shared = _ksample(model, world, video), _ksample(joint, world, video)
    torch.testing.assert_close(plain[0], alone[0], rtol=0, atol=1e-5 * scale)
    log.info("%s joint: shared vs plain %.3g", world["family"], float((shared - plain).abs().max() / scale))
    # sensitivity lower bound: measured 6.9e-3 (flux) / 4.2e-2 (sd3) x scale, 70x / 400x above it
    assert (shared[0] - plain[0]).abs().max() > 1e-4 * scale
    assert model.model_options.get("transformer_options", {}).get("optimized_attention_override") is None


def test_extraction_node_into_the_sampler_node(world, tmp_path):
    """The nodes in-process: Invert -> Extract Correspondences (saved and loaded) -> Sampler equals the sampler
    without them."""
    from comfyui_tokenflow.data import product_io
    from comfyui_tokenflow.nodes import correspondence_nodes, inversion_nodes, sampler_nodes

    model = world["model"]
    inversion, _ = inversion_nodes.TokenFlowInvert.execute(model, {"samples": world["frames"]}, world["src"], STEPS,
                                                           INVERSION_STEPS).args
    corr, preview = correspondence_nodes.TokenFlowExtractCorrespondences.execute(model, inversion, BATCH, "random",
                                                                                 1).args
    assert preview.shape == (1, 64, 3 * 64, 3) and torch.isfinite(preview).all()
    corr = product_io.load_correspondences(product_io.save_correspondences(corr, tmp_path / "corr.safetensors"),
                                           inversion)

    def sample(**extra):
        (latent,) = sampler_nodes.TokenFlowSampler.execute(model, world["pos"], world["neg"], inversion, "pnp",
                                                           world["cfg"], BATCH, "random", 1, pnp_attn_t=0.5,
                                                           **extra).args
        return latent["samples"]

    on_the_fly, extracted = sample(), sample(correspondences=corr)
    torch.testing.assert_close(extracted, on_the_fly, rtol=0, atol=SAME_EDIT_SHARE * on_the_fly.abs().max())


def test_joint_edit_refuses_reference_latents_before_the_diffusion_model_runs(world):
    from comfyui_tokenflow.nodes.joint_edit_nodes import TokenFlowKeyframeJointEdit

    if world["family"] != "flux":
        pytest.skip("reference latents are a Flux (Kontext) conditioning")
    joint = TokenFlowKeyframeJointEdit.execute(world["model"]).result[0]
    pos = [[world["pos"][0][0], {**world["pos"][0][1], "reference_latents": [torch.zeros(1, 16, 8, 8)]}]]
    calls = []
    handle = world["model"].model.diffusion_model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="reference latents .*remove the ReferenceLatent node"):
            _ksample(joint, {**world, "pos": pos}, world["frames"][:2])
    finally:
        handle.remove()
    assert not calls


def test_extraction_split_for_memory_gives_the_same_fields(world, monkeypatch):
    """Propagation calls of 2 frames (a small memory budget) instead of one call of all frames: the same product."""
    from comfyui_tokenflow.engine.plan import call_sizing

    per_frame = call_sizing.call_bytes(world["model"].model, 1, world["inversion"].latent_shape)
    monkeypatch.setattr(call_sizing, "CPU_BUDGET_BYTES", int(per_frame * 2.5))
    batches: list[int] = []
    handle = world["model"].model.diffusion_model.register_forward_pre_hook(
        lambda module, args: batches.append(args[0].shape[0]))
    try:
        split = run_extraction(world["model"], world["inversion"], BATCH, "random", 1)
    finally:
        handle.remove()
    assert batches[:4] == [len(world["corr"].keyframes[0]), 2, 2, 1]  # the keyframe call, then 5 frames in 3 calls
    assert set(split.fields) == set(world["corr"].fields)
    for block, fields in world["corr"].fields.items():
        assert torch.equal(split.fields[block], fields), block


def test_the_dit_joint_edit_model_is_refused_by_the_tokenflow_stages(world):
    from comfyui_tokenflow.nodes.joint_edit_nodes import TokenFlowKeyframeJointEdit

    joint = TokenFlowKeyframeJointEdit.execute(world["model"]).result[0]
    with pytest.raises(ValueError, match="^model: this model comes from TokenFlow Keyframe Joint Edit"):
        run_extraction(joint, world["inversion"], BATCH, "random", 1)
    with pytest.raises(ValueError, match="^model: this model comes from TokenFlow Keyframe Joint Edit"):
        run_flow_edit(joint, world["pos"], world["neg"], world["inversion"], EditSettings.of(cfg=world["cfg"]))


@pytest.fixture(scope="module")
def odd_clip(world):
    """A static 3-frame clip of 72x80 px (a 9x10 latent: 2x2 patches pad it to 5x5 tokens), inverted, its frames."""
    from comfyui_tokenflow.nodes import inversion_nodes

    latent = world["frames"][:1, :, :, :].repeat(3, 1, 1, 1)
    latent = torch.nn.functional.interpolate(latent, size=(9, 10), mode="bilinear")
    inversion, _ = inversion_nodes.TokenFlowInvert.execute(world["model"], {"samples": latent}, world["src"], STEPS,
                                                           INVERSION_STEPS).args
    images = torch.rand(1, 72, 80, 3, generator=torch.Generator().manual_seed(3)).repeat(3, 1, 1, 1)
    return inversion, images


def test_the_preview_lays_out_the_padded_tokens_of_an_odd_latent_side(world, odd_clip, caplog):
    """Through the node: the field's 25 tokens cover the 9x10 latent padded to 10x10; on a static clip every token
    matches itself, so the rebuilt frame is the real one, pixel for pixel."""
    from comfyui_tokenflow.nodes import correspondence_nodes

    inversion, images = odd_clip
    node = correspondence_nodes.TokenFlowExtractCorrespondences
    with caplog.at_level(logging.WARNING):
        corr, preview = node.execute(world["model"], inversion, BATCH, "random", 1, source_images=images).args
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert all(f.shape[-1] == 25 for f in corr.fields.values())
    assert preview.shape == (1, 72, 3 * 80, 3)
    real, rebuilt, key = preview[0, :, :80], preview[0, :, 80:160], preview[0, :, 160:]
    assert torch.equal(rebuilt, real) and torch.equal(key, real)
    _, latent_preview = node.execute(world["model"], inversion, BATCH, "random", 1).args
    assert latent_preview.shape == (1, 72, 3 * 80, 3) and torch.isfinite(latent_preview).all()


def test_a_failing_preview_keeps_the_product(world, odd_clip, monkeypatch, caplog):
    """Whatever breaks the picture, the extraction's product comes out whole, with a black preview and one warning."""
    from comfyui_tokenflow.nodes import correspondence_nodes

    inversion, _ = odd_clip
    expected = run_extraction(world["model"], inversion, BATCH, "random", 1)

    def broken(*args, **kwargs):
        raise ValueError("cannot lay out 25 tokens")

    monkeypatch.setattr(correspondence_nodes, "preview_image", broken)
    with caplog.at_level(logging.WARNING):
        corr, preview = correspondence_nodes.TokenFlowExtractCorrespondences.execute(world["model"], inversion, BATCH,
                                                                                     "random", 1).args
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "no preview (ValueError: cannot lay out 25 tokens)" in warnings[0], warnings
    assert preview.shape == (1, 72, 3 * 80, 3) and not preview.any()
    assert set(corr.fields) == set(expected.fields)
    assert all(torch.equal(corr.fields[b], expected.fields[b]) for b in expected.fields)
    assert torch.equal(corr.keyframes, expected.keyframes)
