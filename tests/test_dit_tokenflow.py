"""TokenFlow on tiny real Flux and SD3 models: invariances of the edit on joint (text + image) attention.

float64 copies of the tiny models: the nearest-neighbour search must not be decided by rounding.
Flux runs at cfg 1 (guidance-distilled: two branches per step, source and edit, the negative unused);
SD3 at cfg 4 with a negative prompt (three branches).
"""
from __future__ import annotations

import pytest
import torch

import tiny_dit_models
from comfyui_tokenflow.engine.patches import dit
from comfyui_tokenflow.engine.plan.settings import EditSettings
from comfyui_tokenflow.engine.flow.edit import prepare_edit as prepare_flow_edit, run_edit as run_flow_edit
from comfyui_tokenflow.engine.flow.invert import run_inversion as run_flow_inversion
from comfyui_tokenflow.engine.flow.samplers import sample_flow

STEPS, INVERSION_STEPS = 4, 8
@pytest.fixture(scope="module", params=list(tiny_dit_models.DIT_FAMILIES))
def world(request):
    return tiny_dit_models.dit_world(request.param, 4)


def _invert(world, samples):
    return run_flow_inversion(world["model"], {"samples": samples}, world["src"], STEPS, INVERSION_STEPS)


def _edit(world, inversion, trace=None, **settings):
    settings = {"cfg": world["cfg"], "batch_size": 2, **settings}
    return run_flow_edit(world["model"], world["pos"], world["neg"], inversion, EditSettings.of(**settings),
                         trace=trace)["samples"]


@pytest.mark.parametrize("editor", ["pnp", "sdedit"])
def test_static_video_gives_identical_frames_equal_to_the_single_frame_edit(world, editor):
    frame = world["frames"][:1]
    video = _edit(world, _invert(world, frame.repeat(5, 1, 1, 1)), editor=editor)
    alone = _edit(world, _invert(world, frame), editor=editor, batch_size=1)
    scale = alone.abs().max()
    for i in range(video.shape[0]):
        torch.testing.assert_close(video[i], alone[0], rtol=0, atol=1e-6 * scale)


def test_one_frame_clip_equals_a_plain_edit_without_tokenflow(world):
    """SDEdit on one frame: one keyframe, extended attention over itself, propagation from itself = plain sampling."""
    inversion = _invert(world, world["frames"][:1])
    out = _edit(world, inversion, editor="sdedit", batch_size=1)
    settings = EditSettings.of(editor="sdedit", cfg=world["cfg"], batch_size=1)
    _, levels, start = prepare_flow_edit(world["model"], world["pos"], world["neg"], inversion, settings)
    plain = sample_flow(world["model"], world["pos"], start.double(), levels, world["neg"], world["cfg"]).double()
    ours = world["model"].model.process_latent_in(out).double()
    torch.testing.assert_close(ours, plain, rtol=0, atol=1e-5 * plain.abs().max())


def test_pnp_injects_in_the_declared_blocks_for_the_first_fraction_of_steps(world):
    inversion = _invert(world, world["frames"])
    trace: list = []
    injected = _edit(world, inversion, trace=trace, editor="pnp", pnp_attn_t=0.5)
    blocks = {event[2] for event in trace}
    steps = {event[0] for event in trace}
    layout_blocks = {("single_block", 1, 0)} if world["family"] == "flux" else {("double_block", 1, 0)}
    assert blocks == layout_blocks and len(steps) == int(STEPS * 0.5)
    assert {event[3] for event in trace} == {"edit_keyframes"}
    none = _edit(world, inversion, editor="pnp", pnp_attn_t=0.0)
    assert (injected - none).abs().max() > 1e-3 * none.abs().max(), "disabling the injection changed nothing"


def test_pnp_blocks_are_an_input(world):
    inversion = _invert(world, world["frames"][:2])
    trace: list = []
    _edit(world, inversion, trace=trace, editor="pnp", pnp_attention_blocks="double_block:0")
    expected = {("double_block", 0, 0)} | ({("double_block", 0, 1)} if world["family"] == "sd3" else set())
    assert {event[2] for event in trace} == expected  # all attentions of the named block (SD3.5: both)


def test_disabling_propagation_changes_the_result(world, monkeypatch):
    inversion = _invert(world, world["frames"])
    with_propagation = _edit(world, inversion, editor="sdedit")

    def keyframe_attention_everywhere(q, k, v, kernel, options, ctx, block, n_img):
        return kernel(q, k, v)  # every frame attends to itself only: no propagation

    monkeypatch.setattr(dit, "_propagated_attention", keyframe_attention_everywhere)
    without = _edit(world, inversion, editor="sdedit")
    assert (with_propagation - without).abs().max() > 1e-3 * without.abs().max()


def test_every_frame_a_keyframe_needs_no_propagation(world, monkeypatch):
    """batch_size 1: every frame is a keyframe; with the paper's blend (a keyframe takes its own output
    with weight 1; the official blend mixes in the previous keyframe even then) the propagation pass
    only copies each frame's own keyframe output: the result is the joint keyframe edit's."""
    inversion = _invert(world, world["frames"][:3])
    out = _edit(world, inversion, editor="pnp", batch_size=1, blend="paper")
    recorded: dict = {}
    original = dit._keyframe_attention

    def record(q, k, v, kernel, options, ctx, block, n_img):
        result = original(q, k, v, kernel, options, ctx, block, n_img)
        recorded[block] = result
        return result

    def replay(q, k, v, kernel, options, ctx, block, n_img):
        return recorded[block]  # the joint keyframe edit's outputs, every frame its own keyframe

    monkeypatch.setattr(dit, "_keyframe_attention", record)
    monkeypatch.setattr(dit, "_propagated_attention", replay)
    joint = _edit(world, inversion, editor="pnp", batch_size=1, blend="paper")
    torch.testing.assert_close(out, joint, rtol=0, atol=1e-6 * joint.abs().max())


def test_the_input_model_is_untouched(world):
    model = world["model"]
    before = (dict(model.model_options.get("transformer_options", {})), dict(model.patches))
    _edit(world, _invert(world, world["frames"][:2]), editor="pnp")
    assert (dict(model.model_options.get("transformer_options", {})), dict(model.patches)) == before
    assert "optimized_attention_override" not in model.model_options.get("transformer_options", {})


def test_source_in_calls_of_its_own_gives_the_same_edit(world, monkeypatch):
    """The call layout a ControlNet on the prompts forces (ComfyUI batches only conds with the same ControlNet):
    the source branch runs first in calls of its own, the edit branches then read what it recorded."""
    from comfyui_tokenflow.engine.flow import edit as flow_edit

    inversion = _invert(world, world["frames"])
    shared = _edit(world, inversion, editor="pnp")
    monkeypatch.setattr(flow_edit.FlowTokenFlowGuider, "_source_shares_calls", lambda self, names, x, timestep: False)
    separate = _edit(world, inversion, editor="pnp")
    torch.testing.assert_close(separate, shared, rtol=0, atol=1e-6 * shared.abs().max())


def test_a_pnp_block_list_typo_names_this_familys_blocks(world):
    """The example in the message is the model's own default list (a UNet's 'output:4-11' means nothing on a DiT)."""
    inversion = _invert(world, world["frames"][:2])
    example = "single_block:1" if world["family"] == "flux" else "double_block:1"  # the tiny models' defaults
    with pytest.raises(ValueError, match=f"^pnp_attention_blocks: cannot read 'decoder 4-11'; write e.g. '{example}'"):
        _edit(world, inversion, editor="pnp", pnp_attention_blocks="decoder 4-11")
