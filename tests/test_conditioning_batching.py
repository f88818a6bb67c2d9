"""Conditioning that changes how ComfyUI batches conds, through the real core nodes on a tiny SD1.x UNet.

PnP and the on-the-fly correspondences need the source branch to run before the edit branches of every pass:
in the same model call (ComfyUI batches it with them) or in calls of its own, first. The guider mirrors the
host's ``calc_cond_batch`` (``get_area_and_mult`` + ``can_concat_cond``, grouped by hooks) to tell which:

- GLIGEN boxes (``GLIGENTextBoxApply``) give every cond a patch of its own, so nothing batches with it;
- masks without bounds (``ConditioningSetMask`` "default") weight a prompt over whole frames: honoured;
- timestep ranges (``ConditioningSetTimestepRange``) on the edit prompts change which conds exist at a step:
  honoured; on the inversion prompt they would leave steps without a source branch: refused;
- areas (``ConditioningSetArea``, its percentage form, mask bounds) crop the frames and copy the cond into the
  other prompts: refused, even over the whole frame (a full-frame area is a no-op to the host, but not to
  TokenFlow before this refusal).

Each refusal is one line raised before any UNet call.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import nodes as comfy_nodes
import tiny_models
from comfyui_tokenflow.engine.patches import contract
from reliability_tools import UNetCalls
from tokenflow_helpers import conds, edit, extract, invert, random_latent

N = 3


@pytest.fixture(scope="module")
def world(tiny_sd15, tiny_clip):
    src, pos, neg = conds(tiny_sd15)
    latent = random_latent(N, size=16, seed=7)  # 128 px: a quarter mask's box (8 latent px) is a real crop
    gligen = tiny_models.make_gligen(tiny_sd15)
    return dict(src=src, pos=pos, neg=neg, latent=latent, inversion=invert(tiny_sd15, latent, src), gligen=gligen,
                clip=tiny_clip)


def _gligen(world, conditioning):
    (out,) = comfy_nodes.GLIGENTextBoxApply().append(conditioning, world["clip"], world["gligen"], "a red car",
                                                     64, 64, 0, 0)
    return out


def _ranged(conditioning, start, end):
    return comfy_nodes.ConditioningSetTimestepRange().set_range(conditioning, start, end)[0]


def _mask(conditioning, set_cond_area="default", whole=False):
    """ConditioningSetMask with a mask of the top-left quarter (or of the whole frame)."""
    mask = torch.ones(1, 128, 128) if whole else torch.zeros(1, 128, 128)
    mask[:, :64, :64] = 1.0
    return comfy_nodes.ConditioningSetMask().append(conditioning, mask, set_cond_area, 1.0)[0]


class PassOrder:
    """Records every UNet call's pass (bank, phase, frames) and whether the source branch is in it, in order."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def hook(self, module, args, kwargs):
        options = kwargs.get("transformer_options") or {}
        ctx = options.get(contract.KEY)
        if ctx is None:
            return
        order = list(options.get("cond_or_uncond", [0]))
        has_source = ctx.source_index is not None and ctx.source_index in order
        self.calls.append(((id(ctx.bank), ctx.phase, tuple(ctx.frames.tolist())), has_source))

    def first_calls_without_source(self) -> list[tuple]:
        """Passes that hold a source call but whose first call is an edit-only one."""
        passes: dict = {}
        for key, has_source in self.calls:
            passes.setdefault(key, []).append(has_source)
        return [key for key, calls in passes.items() if any(calls) and not calls[0]]


def _run_recorded(model, *args, **kwargs):
    order = PassOrder()
    handle = model.model.diffusion_model.register_forward_pre_hook(order.hook, with_kwargs=True)
    try:
        out = edit(model, *args, **kwargs)
    finally:
        handle.remove()
    return out, order


# -- what TokenFlow honours ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings", [dict(editor="pnp"), dict(editor="sdedit"), dict(editor="pnp", extracted=True)],
                         ids=["pnp", "sdedit", "pnp-extracted"])
def test_gligen_boxes_run_the_source_branch_first(tiny_sd15, world, settings):
    """GLIGEN's patch keeps its cond out of every batch: the source runs in calls of its own, before the edits
    (before: the edit ran first, KeyError on the PnP features or 'no correspondences')."""
    settings = dict(settings)
    corr = extract(tiny_sd15, world["inversion"]) if settings.pop("extracted", False) else None
    boxed = _gligen(world, world["pos"])
    out, order = _run_recorded(tiny_sd15, boxed, world["neg"], world["inversion"], correspondences=corr, **settings)
    plain = edit(tiny_sd15, world["pos"], world["neg"], world["inversion"], correspondences=corr, **settings)
    assert torch.isfinite(out).all()
    assert (out - plain).abs().max() > 1e-3 * plain.abs().max(), "the GLIGEN boxes changed nothing"
    assert order.calls and not order.first_calls_without_source()


def test_source_call_follows_the_host_batching_at_each_step(tiny_sd15, world):
    """A positive prompt of 78 tokens for the first half of the steps only: then ComfyUI cannot batch it with the
    77-token source (their padding would exceed its limit) and the source gets calls of its own; at the other
    steps the host batches the source with the edit conds, one call per pass."""
    long = tiny_models.make_conditioning(tiny_sd15, seed=12, n_tokens=78)
    positive = comfy_nodes.ConditioningCombine().combine(_ranged(long, 0.0, 0.5), _ranged(world["pos"], 0.5, 1.0))[0]
    out, order = _run_recorded(tiny_sd15, positive, world["neg"], world["inversion"], editor="pnp")
    assert torch.isfinite(out).all() and not order.first_calls_without_source()
    calls_per_pass: dict = {}
    for key, _ in order.calls:
        calls_per_pass[key] = calls_per_pass.get(key, 0) + 1
    counts = set(calls_per_pass.values())
    assert 1 in counts and max(counts) > 1, f"expected shared and separate source calls, got {counts}"


def test_edit_prompt_timestep_ranges_are_honoured(tiny_sd15, world):
    """A range over every step is no range; two prompts that take turns give an edit of their own."""
    src, pos, neg, inversion = world["src"], world["pos"], world["neg"], world["inversion"]
    base = edit(tiny_sd15, pos, neg, inversion)
    assert torch.equal(edit(tiny_sd15, _ranged(pos, 0.0, 1.0), neg, inversion), base)
    turns = comfy_nodes.ConditioningCombine().combine(_ranged(pos, 0.0, 0.5), _ranged(src, 0.5, 1.0))[0]
    out, order = _run_recorded(tiny_sd15, turns, _ranged(neg, 0.3, 1.0), inversion)
    assert torch.isfinite(out).all() and not order.first_calls_without_source()
    for other in (base, edit(tiny_sd15, src, neg, inversion)):
        assert (out - other).abs().max() > 1e-3 * other.abs().max()


def test_a_mask_without_bounds_weights_the_prompt_over_whole_frames(tiny_sd15, world):
    pos, neg, inversion = world["pos"], world["neg"], world["inversion"]
    base = edit(tiny_sd15, pos, neg, inversion)
    # A mask of ones weights nothing: the host's own arithmetic gives the same result.
    assert torch.equal(edit(tiny_sd15, _mask(pos, whole=True), neg, inversion), base)
    regional = comfy_nodes.ConditioningCombine().combine(_mask(pos), neg)[0]
    out, order = _run_recorded(tiny_sd15, regional, neg, inversion)
    assert torch.isfinite(out).all() and not order.first_calls_without_source()
    assert (out - base).abs().max() > 1e-3 * base.abs().max()


# -- what it refuses, before any UNet call ------------------------------------------------------------------------

def _area(conditioning):
    return comfy_nodes.ConditioningSetArea().append(conditioning, 128, 128, 0, 0, 1.0)[0]  # the whole frame


def _area_percentage(conditioning):
    return comfy_nodes.ConditioningSetAreaPercentage().append(conditioning, 0.5, 0.5, 0.0, 0.0, 1.0)[0]


REFUSED = [
    ("mask-bounds", lambda m, w: edit(m, _mask(w["pos"], "mask bounds"), w["neg"], w["inversion"]),
     ["positive:", "Conditioning Set Mask", "'mask bounds'", "Set set_cond_area to 'default'"]),
    ("full-frame-area", lambda m, w: edit(m, w["pos"], _area(w["neg"]), w["inversion"]),
     ["negative:", "Conditioning Set Area", "even over the whole frame", "Remove the Set Area node"]),
    ("area-percentage", lambda m, w: edit(m, _area_percentage(w["pos"]), w["neg"], w["inversion"]),
     ["positive:", "Conditioning Set Area"]),
    ("inversion-timestep-range", lambda m, w: invert(m, w["latent"], _ranged(w["src"], 0.0, 0.5)),
     ["conditioning:", "Conditioning Set Timestep Range", "from 50%", "remove the Set Timestep Range node"]),
    ("inversion-ranges-with-a-gap", lambda m, w: invert(m, w["latent"], comfy_nodes.ConditioningCombine().combine(
        _ranged(w["src"], 0.0, 0.4), _ranged(w["src"], 0.6, 1.0))[0]),
     ["conditioning:", "Conditioning Set Timestep Range", "from 40%"]),
    ("edit-on-a-ranged-inversion", lambda m, w: edit(m, w["pos"], w["neg"], dataclasses.replace(
        w["inversion"], conditioning=_ranged(w["src"], 0.2, 1.0))),
     ["inversion:", "Conditioning Set Timestep Range", "from 0%", "invert the video again"]),
    ("extract-on-an-inversion-with-an-area", lambda m, w: extract(m, dataclasses.replace(
        w["inversion"], conditioning=_area(w["src"]))), ["inversion:", "Conditioning Set Area"]),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_refused_in_one_line_before_any_unet_call(tiny_sd15, world, case):
    _, run, fragments = case
    with UNetCalls(tiny_sd15) as calls, pytest.raises(ValueError) as info:
        run(tiny_sd15, world)
    message = str(info.value)
    assert calls.count == 0, f"{calls.count} UNet calls before the refusal"
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_inversion_ranges_that_cover_every_step_are_accepted(tiny_sd15, world):
    turns = comfy_nodes.ConditioningCombine().combine(_ranged(world["src"], 0.0, 0.5),
                                                      _ranged(world["src"], 0.5, 1.0))[0]
    inversion = invert(tiny_sd15, world["latent"], turns)
    assert torch.isfinite(edit(tiny_sd15, world["pos"], world["neg"], inversion)).all()
