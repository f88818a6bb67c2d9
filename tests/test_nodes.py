"""Node-level behaviour: schemas and tooltips, the joint-edit model, the correspondence preview, LoRA-style patches."""
from __future__ import annotations

import asyncio

import pytest
import torch

import comfy.sample
from tokenflow_helpers import conds, edit, extract, invert, random_latent

EXPECTED_IDS = {
    "TokenFlowLoadVideo", "TokenFlowInvert", "TokenFlowExtractCorrespondences", "TokenFlowKeyframeJointEdit",
    "TokenFlowSampler", "TokenFlowSaveInversion", "TokenFlowLoadInversion", "TokenFlowSaveCorrespondences",
    "TokenFlowLoadCorrespondences", "TokenFlowTemporalConsistency",
}


@pytest.fixture(scope="module")
def node_classes(tokenflow_package):
    extension = asyncio.run(tokenflow_package.comfy_entrypoint())
    return {cls.GET_SCHEMA().node_id: cls for cls in asyncio.run(extension.get_node_list())}


def test_every_node_is_registered_with_tooltips_everywhere(node_classes):
    assert set(node_classes) == EXPECTED_IDS
    for node_id, cls in node_classes.items():
        info = cls.GET_NODE_INFO_V1()  # ComfyUI's own validation of the V3 schema
        assert info["category"] == "TokenFlow" and info["description"], node_id
        for section in ("required", "optional"):
            for name, spec in info["input"].get(section, {}).items():
                assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert all(info["output_tooltips"]), f"{node_id} has an output without tooltip"


def test_stable_input_contract(node_classes):
    def inputs(node_id):
        info = node_classes[node_id].GET_NODE_INFO_V1()["input"]
        return list(info["required"]) + list(info.get("optional", {}))

    assert inputs("TokenFlowInvert")[:5] == ["model", "latent", "conditioning", "steps", "inversion_steps"]
    assert inputs("TokenFlowExtractCorrespondences")[:5] == ["model", "inversion", "batch_size", "keyframes", "seed"]
    assert inputs("TokenFlowKeyframeJointEdit") == ["model"]
    assert set(inputs("TokenFlowSampler")) >= {"model", "positive", "negative", "inversion", "editor", "cfg", "pnp_attn_t",
                                               "pnp_f_t", "sdedit_start", "batch_size", "keyframes", "seed",
                                               "correspondences"}


def test_step_widgets_stop_at_the_largest_count_that_works(node_classes):
    """The UI cannot offer a step count the nodes then refuse: the widgets' max is schedule.MAX_STEPS (999)."""
    from comfyui_tokenflow.tokenflow_ops.schedule import MAX_STEPS, check_step_count

    check_step_count(MAX_STEPS, "steps")  # the max itself works
    with pytest.raises(ValueError):
        check_step_count(MAX_STEPS + 1, "steps")
    invert = node_classes["TokenFlowInvert"].GET_NODE_INFO_V1()["input"]["required"]
    sampler = node_classes["TokenFlowSampler"].GET_NODE_INFO_V1()["input"]["optional"]
    for spec in (invert["steps"], invert["inversion_steps"], sampler["steps"]):
        assert spec[1]["max"] == MAX_STEPS == 999, spec
    assert sampler["steps"][1]["min"] == 0 and invert["steps"][1]["min"] == invert["inversion_steps"][1]["min"] == 1

def _sample(model, pos, neg, latent, seed=3):
    # The same noise for every frame, so that identical frames stay comparable.
    noise = torch.randn((1,) + tuple(latent.shape[1:]), generator=torch.Generator().manual_seed(seed))
    noise = noise.repeat(latent.shape[0], 1, 1, 1)
    return comfy.sample.sample(model, noise, 2, 4.0, "euler", "normal", pos, neg, latent, seed=seed)


def test_joint_edit_model_extends_attention_across_the_batch(tiny_sd15, node_classes):
    _, pos, neg = conds(tiny_sd15)
    joint = node_classes["TokenFlowKeyframeJointEdit"].execute(tiny_sd15).result[0]
    frame = random_latent(1, seed=2)["samples"]
    plain_one = _sample(tiny_sd15, pos, neg, frame)
    # One frame: extended attention is ordinary attention.
    # one keyframe: the same attention call as the plain model, observed exactly 0 (bound: float32 rounding)
    torch.testing.assert_close(_sample(joint, pos, neg, frame), plain_one, rtol=1e-4, atol=1e-4 * plain_one.abs().max())
    # Identical frames attend to duplicated keys: same result as the single frame.
    static = _sample(joint, pos, neg, frame.repeat(3, 1, 1, 1))
    for i in range(3):
        # float32: softmax over 3 copies of each key sums in another order; observed <= 0.002 of the bound
        torch.testing.assert_close(static[i], plain_one[0], rtol=1e-3, atol=1e-3 * plain_one.abs().max())
    # Different frames: each frame now depends on the others (it does not with the plain model).
    video = random_latent(3, seed=4)["samples"]
    changed = video.clone()
    changed[2] = -changed[2]
    # must differ: observed 6e4 x allclose's default bound
    assert not torch.allclose(_sample(joint, pos, neg, video)[0], _sample(joint, pos, neg, changed)[0])
    torch.testing.assert_close(_sample(tiny_sd15, pos, neg, video)[0], _sample(tiny_sd15, pos, neg, changed)[0])
    assert tiny_sd15.model_options.get("transformer_options", {}).get("patches_replace") is None


def test_correspondence_preview_rebuilds_a_static_frame_exactly(tiny_sd15, node_classes):
    src, _, _ = conds(tiny_sd15)
    frame = random_latent(1, seed=6)["samples"]
    inversion = invert(tiny_sd15, {"samples": frame.repeat(4, 1, 1, 1)}, src)
    images = torch.rand(1, 64, 64, 3).repeat(4, 1, 1, 1)
    node = node_classes["TokenFlowExtractCorrespondences"]
    corr, preview = node.execute(tiny_sd15, inversion, 2, "random", 1, source_images=images).result
    assert preview.shape == (1, 64, 3 * 64, 3)
    real, rebuilt, key = preview[0, :, :64], preview[0, :, 64:128], preview[0, :, 128:]
    assert torch.equal(rebuilt, real) and torch.equal(key, real)
    _, latent_preview = node.execute(tiny_sd15, inversion, 2, "random", 1).result
    assert latent_preview.shape[0] == 1 and latent_preview.shape[-1] == 3 and torch.isfinite(latent_preview).all()


def test_lora_style_weight_patches_apply_and_leave_the_input_alone(tiny_sd15):
    src, pos, neg = conds(tiny_sd15)
    inversion = invert(tiny_sd15, random_latent(3), src)
    plain = edit(tiny_sd15, pos, neg, inversion)
    patched = tiny_sd15.clone()
    key = "diffusion_model.output_blocks.9.1.transformer_blocks.0.attn1.to_v.weight"
    weight = tiny_sd15.model.state_dict()[key]
    diff = torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * weight.std()
    patched.add_patches({key: ("diff", (diff,))}, 1.0)
    lora = edit(patched, pos, neg, inversion)  # same base weights: the inversion is accepted
    assert (lora - plain).abs().max() > 1e-3 * plain.abs().max()  # sensitivity lower bound: the patch moves the edit by O(1)
    assert torch.equal(edit(tiny_sd15, pos, neg, inversion), plain)
