"""TokenFlow composes with an ``optimized_attention_override`` already on the model.

The host has one override slot per model (``transformer_options["optimized_attention_override"]``,
``wrap_attn`` in comfy/ldm/modules/attention.py); kernel-swapping nodes (SageAttention patches and the
like) put theirs there. The pack's DiT patch needs the slot too: it keeps the override it finds and sends
every attention it computes through it; on the UNet its self-attention calls carry the block's options,
so the override sees them as it sees the host's own calls.

The override here records each call's token counts and passes it on unchanged, so the edit must be
bit-identical to the edit without it, and the recorder must have seen TokenFlow's extended keyframe
attention: keys/values over several keyframes' tokens (more key tokens than query tokens), a shape plain
sampling never makes. Without the chaining the recorder sees no call on the DiT and no extended call on the
UNet (both assertions fail).
"""
from __future__ import annotations

import pytest
import torch

import tiny_dit_models
from comfyui_tokenflow.engine.plan.settings import EditSettings
from comfyui_tokenflow.engine.flow.edit import run_edit as run_flow_edit
from comfyui_tokenflow.engine.flow.invert import run_inversion as run_flow_inversion
from tokenflow_helpers import conds, double, edit, float64_copy, invert, random_latent

OVERRIDE = "optimized_attention_override"


class RecordingOverride:
    """A pass-through override: records (query tokens, key tokens) of every call it is handed."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __deepcopy__(self, memo: dict) -> "RecordingOverride":
        return self  # ModelPatcher.clone deep-copies model_options; a function would be kept as is too

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        in_heads = kwargs.get("skip_reshape", False)
        self.calls.append((q.shape[2], k.shape[2]) if in_heads else (q.shape[1], k.shape[1]))
        return func(q, k, v, heads, *args, **kwargs)

    def extended_calls(self, frame_tokens: int, text_tokens: int = -1) -> int:
        """Calls whose keys span more than one frame's ``frame_tokens`` tokens (several keyframes); cross-attention
        to ``text_tokens`` text tokens is not one of them."""
        return sum(1 for _, n_k in self.calls if n_k > frame_tokens and n_k != text_tokens)


def _with_override(model):
    clone = model.clone()
    recorder = RecordingOverride()
    clone.model_options.setdefault("transformer_options", {})[OVERRIDE] = recorder
    return clone, recorder


@pytest.fixture(scope="module", params=list(tiny_dit_models.DIT_FAMILIES))
def dit_world(request):
    return tiny_dit_models.dit_world(request.param, 3)


def test_dit_edit_goes_through_the_models_own_override(dit_world):
    world = dit_world
    inversion = run_flow_inversion(world["model"], {"samples": world["frames"]}, world["src"], 2, 4)
    settings = EditSettings.of(editor="pnp", cfg=world["cfg"], batch_size=2)

    def run(model):
        return run_flow_edit(model, world["pos"], world["neg"], inversion, settings)["samples"]

    plain = run(world["model"])
    model, recorder = _with_override(world["model"])
    chained = run(model)
    assert recorder.calls, "the override on the model was dropped: TokenFlow's attention never reached it"
    # plain joint attention: queries and keys are one frame's text + image tokens
    frame_tokens = max(n_q for n_q, _ in recorder.calls)
    assert recorder.extended_calls(frame_tokens) > 0, \
        f"no extended keyframe attention went through the override: {sorted(set(recorder.calls))}"
    assert torch.equal(chained, plain)  # a pass-through override changes nothing, bit for bit
    assert model.model_options["transformer_options"][OVERRIDE] is recorder  # the input model keeps its own


def test_unet_edit_sends_its_self_attention_through_the_models_override(tiny_sd15):
    model64 = float64_copy(tiny_sd15)
    _, pos, neg = [double(c) for c in conds(model64)]
    latent = random_latent(3, seed=4)
    inversion = invert(model64, latent, pos, steps=2, inversion_steps=4)
    plain = edit(model64, pos, neg, inversion, editor="pnp", batch_size=2)
    model, recorder = _with_override(model64)
    chained = edit(model, pos, neg, inversion, editor="pnp", batch_size=2)
    # one frame's self-attention has at most h*w tokens (the top level); the text has its own count
    text_tokens, frame_tokens = pos[0][0].shape[1], latent["samples"].shape[-2] * latent["samples"].shape[-1]
    assert recorder.extended_calls(frame_tokens, text_tokens) > 0, \
        f"TokenFlow's extended self-attention bypassed the model's override: {sorted(set(recorder.calls))}"
    assert torch.equal(chained, plain)
    assert model.model_options["transformer_options"][OVERRIDE] is recorder


def test_a_kept_override_that_changes_attention_changes_the_dit_edit(dit_world):
    """The kept override is really applied (not only called): one that scales attention outputs moves the edit."""
    world = dit_world
    # 4 steps: SDEdit keeps 2 of them (with 2 steps only the last one, too little noise for a visible move)
    inversion = run_flow_inversion(world["model"], {"samples": world["frames"][:2]}, world["src"], 4, 8)
    settings = EditSettings.of(editor="sdedit", cfg=world["cfg"], batch_size=2, steps=4)
    plain = run_flow_edit(world["model"], world["pos"], world["neg"], inversion, settings)["samples"]
    model = world["model"].clone()

    def scaled(func, *args, **kwargs):
        return func(*args, **kwargs) * 0.9

    model.model_options.setdefault("transformer_options", {})[OVERRIDE] = scaled
    moved = run_flow_edit(model, world["pos"], world["neg"], inversion, settings)["samples"]
    assert (moved - plain).abs().max() > 1e-3 * plain.abs().max()


def test_dit_keyframe_joint_edit_keeps_the_models_override(dit_world):
    """The Keyframe Joint Edit model, sampled by the core KSampler: its joint attention goes through the override."""
    import nodes
    from comfyui_tokenflow.nodes.joint_edit_nodes import TokenFlowKeyframeJointEdit

    world = dit_world
    batch = {"samples": world["frames"].float(), "batch_index": [0] * world["frames"].shape[0]}

    def ksample(model):
        (out,) = nodes.KSampler().sample(model, 7, 2, world["cfg"], "euler", "simple", world["pos"], world["neg"],
                                         batch, denoise=0.5)
        return out["samples"]

    plain = ksample(TokenFlowKeyframeJointEdit.execute(world["model"]).result[0])
    model, recorder = _with_override(world["model"])
    chained = ksample(TokenFlowKeyframeJointEdit.execute(model).result[0])
    frame_tokens = max(n_q for n_q, _ in recorder.calls) if recorder.calls else 0
    assert recorder.extended_calls(frame_tokens) > 0, f"joint attention bypassed the override: {recorder.calls[:8]}"
    assert torch.equal(chained, plain)
    assert model.model_options["transformer_options"][OVERRIDE] is recorder
