"""The memory plan: TokenFlow's own bytes counted per family, the bank's placement, calls split by the budget.

The budget (``call_sizing.budget``, the public knob) and the bank's placement (``memory_plan.bank_placement``) only
change how a step's calls are split and where the bank lives: the results stay those of the unsplit step with the
bank on the device (float64 models: the nearest-neighbour search is not decided by rounding). A keyframe count whose
keyframe pass cannot fit even with the bank in host memory is refused, before any model call, by one line naming
max_keyframes and a count that fits. The planner's byte counts are the bytes the banks hold.
"""
from __future__ import annotations

import re

import pytest
import torch

import tiny_dit_models
import tiny_models
from comfyui_tokenflow.engine.families.base import DDPM, FLOW
from comfyui_tokenflow.engine.families.registry import check_supported
from comfyui_tokenflow.engine.flow.edit import run_edit as run_flow_edit
from comfyui_tokenflow.engine.flow.invert import run_inversion as run_flow_inversion
from comfyui_tokenflow.engine.ddpm.edit import DDPMTokenFlowGuider
from comfyui_tokenflow.engine.patches import contract
from comfyui_tokenflow.engine.plan import call_sizing, memory_plan
from comfyui_tokenflow.engine.plan.settings import EditSettings
from comfyui_tokenflow.engine.sampling.edit_guider import TokenFlowGuider
from test_call_plan import UNetEntry
from tokenflow_helpers import conds, double, edit, float64_copy, invert, random_latent

UNET_FRAMES, FLUX_FRAMES = 12, 6


@pytest.fixture(scope="module")
def unet(tiny_sd15):
    model = float64_copy(tiny_sd15)
    src, pos, neg = (double(c) for c in conds(model))
    inversion = invert(model, random_latent(UNET_FRAMES, size=16, seed=4), src)
    return dict(rule=DDPM, model=model, src=src, pos=pos, neg=neg, inversion=inversion, cfg=7.5, batch_size=4)


@pytest.fixture(scope="module")
def flux():
    world = tiny_dit_models.dit_world("flux", FLUX_FRAMES)
    inversion = run_flow_inversion(world["model"], {"samples": world["frames"]}, world["src"], 4, 8)
    return dict(world, rule=FLOW, inversion=inversion, batch_size=2)


def _edit(world, **settings):
    settings = {"batch_size": world["batch_size"], "cfg": world["cfg"], **settings}
    if world["rule"] == DDPM:  # one step (t = 801) unless said: PnP injects there
        return edit(world["model"], world["pos"], world["neg"], world["inversion"], **{"steps": 1, **settings})
    return run_flow_edit(world["model"], world["pos"], world["neg"], world["inversion"],
                         EditSettings.of(**settings))["samples"]


def _bytes(world, editor: str = "pnp") -> tuple[memory_plan.TokenFlowBytes, memory_plan.StepShape]:
    """The planner's count for a step of ``world``'s edit (its keyframes, branches and PnP blocks)."""
    model, inversion = world["model"], world["inversion"]
    layout = check_supported(model, sampling=world["rule"])
    keyframes = -(-inversion.n_frames // world["batch_size"])
    pnp = frozenset(layout.default_pnp_attention) if editor == "pnp" else frozenset()
    shape = memory_plan.StepShape(keyframes, 1 if world["cfg"] == 1.0 else 2, editor == "pnp", True, pnp)
    sizes = memory_plan.attention_sizes(model, layout, inversion.latent_shape,
                                        memory_plan.text_tokens_of(world["pos"], world["neg"], world["src"]))
    element = torch.empty((), dtype=memory_plan.compute_dtype(model.model)).element_size()
    return memory_plan.tokenflow_bytes(sizes, shape, layout.sampling, element), shape


@pytest.fixture(params=["unet", "flux"])
def world(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("source_apart", [False, True], ids=["shared", "source_apart"])
def test_the_bank_in_host_memory_gives_the_result_of_the_bank_on_the_device(world, source_apart, monkeypatch):
    """Also with the source branch in calls of its own: a propagation call then reads the blocks' records in another
    order than the source's call before it (a prefetched record is not the one read)."""
    if source_apart:
        monkeypatch.setattr(TokenFlowGuider, "_source_shares_calls", lambda self, names, x, timestep: False)
    with memory_plan.bank_placement(memory_plan.DEVICE):
        on_device = _edit(world, editor="pnp")
    record = memory_plan.latest_record()
    assert set(record.placements) == {memory_plan.DEVICE} and not any(record.transfer_bytes)
    with memory_plan.bank_placement(memory_plan.HOST):
        on_host = _edit(world, editor="pnp")
    record = memory_plan.latest_record()
    assert set(record.placements) == {memory_plan.HOST}
    # Every step: the bank goes to the host once and comes back at least once per propagation call.
    assert all(moved >= 2 * held > 0 for moved, held in zip(record.transfer_bytes, record.bank_bytes)), record
    assert torch.equal(on_host, on_device)  # copies only: bit for bit


def _split_budget(world, keyframe_images: int, frame_images: int) -> int:
    """A budget in which the keyframe pass's edit branches fit but not with the source, and a propagation call
    holds 2 frames (``frame_images`` images each) beside the bank."""
    model, shape = world["model"].model, tuple(world["inversion"].latent_shape)
    tf, _ = _bytes(world)
    return int(call_sizing.call_bytes(model, max(keyframe_images + 1, 2 * frame_images), shape)
               + max(tf.bank, tf.staging) + tf.joint_kv + tf.pnp_store + 2 * tf.fields_per_frame)


@pytest.mark.parametrize("placement", [memory_plan.DEVICE, memory_plan.HOST])
def test_a_small_budget_splits_the_calls_and_gives_the_unsplit_result(world, placement):
    whole = _edit(world, editor="pnp")
    branches = 1 if world["cfg"] == 1.0 else 2
    keyframes = -(-world["inversion"].n_frames // world["batch_size"])
    frames = world["inversion"].n_frames
    with UNetEntry(world["model"]) as calls, memory_plan.bank_placement(placement), \
            call_sizing.budget(_split_budget(world, branches * keyframes, branches + 1)):
        split = _edit(world, editor="pnp")
    steps = len(memory_plan.latest_record().placements)
    # the keyframe pass: the source apart, first; the propagation pass: calls of 2 frames x (edit branches + source)
    per_step = [keyframes, branches * keyframes] + [2 * (branches + 1)] * (frames // 2)
    assert calls.batches == per_step * steps, calls.batches
    # float64 UNet: summation order only; the flow edit's state is float32 whatever the model's dtype
    tolerance = 1e-9 if world["rule"] == DDPM else 1e-6
    torch.testing.assert_close(split, whole, rtol=0, atol=tolerance * whole.abs().max().item())


@pytest.mark.parametrize("editor", ["pnp", "sdedit"])
def test_the_host_running_an_edit_branch_first_reruns_the_pass_with_the_source_apart(tiny_sd15, monkeypatch, editor):
    """A shared call the host splits with an edit branch first (as it would where its split differs from the
    guider's prediction): what the edit branch needs from the source is missing, the pass runs again with the source
    branch in calls of its own, and the result is that of a run that put it there from the start."""
    model = float64_copy(tiny_sd15)
    src, _, neg = (double(c) for c in conds(model))
    long_positive = double(tiny_models.make_conditioning(model, seed=12, n_tokens=5 * 77))  # batched with no other
    inversion = invert(model, random_latent(4, seed=4), src)
    apart = edit(model, long_positive, neg, inversion, editor=editor, batch_size=4)
    monkeypatch.setattr(DDPMTokenFlowGuider, "_source_shares_calls", lambda self, names, x, timestep: True)
    with UNetEntry(model) as calls:
        shared = edit(model, long_positive, neg, inversion, editor=editor, batch_size=4)
    # float64: only the first keyframe pass's layout differs (sdedit: the negative and the source shared a call)
    torch.testing.assert_close(shared, apart, rtol=0, atol=1e-9 * apart.abs().max().item())
    steps = len(memory_plan.latest_record().placements)
    if editor == "pnp":  # the keyframe pass's positive stops at the first PnP block; then source, positive, negative
        first = [1, 1, 1, 1, 4, 4, 4]
    else:  # the keyframe pass reads nothing of the source; the first propagation call does
        first = [1, 2, 4, 4, 4, 4]
    assert calls.batches == first + [1, 1, 1, 4, 4, 4] * (steps - 1), calls.batches


def test_keyframes_that_cannot_fit_are_refused_before_any_model_call_naming_a_count_that_fits(tiny_sd15):
    src, pos, neg = conds(tiny_sd15)
    inversion = invert(tiny_sd15, random_latent(12, size=16, seed=4), src)
    budget = int(call_sizing.call_bytes(tiny_sd15.model, 4, tuple(inversion.latent_shape)))  # 4 images' activations
    with UNetEntry(tiny_sd15) as calls, call_sizing.budget(budget):
        with pytest.raises(ValueError) as refused:  # batch_size 2: 6 keyframes per step
            edit(tiny_sd15, pos, neg, inversion, editor="pnp", batch_size=2, steps=1)
        assert calls.batches == [], "refused before any model call"
        line = str(refused.value)
        assert "\n" not in line
        fitting = re.fullmatch(r"max_keyframes: 6 keyframes per step need about [\d.]+ GiB on the device in the "
                               r"keyframe pass .*; set max_keyframes to (\d+) or less", line)
        assert fitting, line
        value = int(fitting.group(1))
        assert 1 <= value < 6
        edit(tiny_sd15, pos, neg, inversion, editor="pnp", batch_size=2, steps=1, max_keyframes=value)
        assert calls.batches, "the advised count runs"


def test_a_frame_size_where_one_keyframe_cannot_fit_is_refused_naming_a_size_that_fits(tiny_sd15):
    src, pos, neg = conds(tiny_sd15)
    inversion = invert(tiny_sd15, random_latent(4, size=16, seed=4), src)
    shape = tuple(inversion.latent_shape)
    budget = int(call_sizing.call_bytes(tiny_sd15.model, 1, shape)) + 1  # one frame's activations, no more
    with UNetEntry(tiny_sd15) as calls, call_sizing.budget(budget):
        with pytest.raises(ValueError, match=r"^inversion: at 128x128 px even 1 keyframe per step needs about [\d.]+ "
                                             r"GiB .*; lower the resolution to (\d+)x(\d+) px or less") as refused:
            edit(tiny_sd15, pos, neg, inversion, editor="pnp", batch_size=4, steps=1)
    assert calls.batches == []
    width, height = (int(v) for v in re.search(r"to (\d+)x(\d+) px", str(refused.value)).groups())
    assert width == height < 128
    smaller = invert(tiny_sd15, random_latent(4, size=width // 8, seed=4), src)
    with call_sizing.budget(budget):
        edit(tiny_sd15, pos, neg, smaller, editor="pnp", batch_size=4, steps=1)  # the advised size runs


def _storage_bytes(tensors) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def test_the_planner_counts_the_bytes_the_banks_hold(world, monkeypatch):
    """The bank's storages (keyframe outputs and source tokens at the end of a step; the PnP store at its fullest in
    the keyframe pass) measured on the tiny model equal the planner's count for it, byte for byte."""
    held: dict[str, int] = {"bank": 0, "pnp": 0}
    record, clear = contract.StepBank.record_output, contract.StepBank.clear

    def recording(bank, *args):
        record(bank, *args)
        held["pnp"] = max(held["pnp"], _storage_bytes(t for pair in bank.pnp_qk.values() for t in pair))

    def clearing(bank):
        if bank.keyframe_outputs:  # a step's bank (not the post-CFG functions' empty ones)
            tensors = [s[0] for segments in bank.keyframe_outputs.values() for s in segments]
            held["bank"] = max(held["bank"], _storage_bytes(tensors + list(bank.keyframe_tokens.values())))
        clear(bank)

    monkeypatch.setattr(contract.StepBank, "record_output", recording)
    monkeypatch.setattr(contract.StepBank, "clear", clearing)
    with memory_plan.bank_placement(memory_plan.DEVICE):
        _edit(world, editor="pnp", steps=0)  # every step: PnP injects in the first ones
    tf, shape = _bytes(world)
    assert shape.pnp_blocks and tf.pnp_store > 0
    assert held == {"bank": tf.bank, "pnp": tf.pnp_store}, (held, tf)
