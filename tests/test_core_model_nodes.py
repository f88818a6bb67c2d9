"""Core ComfyUI model nodes with the TokenFlow Sampler: each works as with a plain sampler, or is refused by name
before any model call.

The real core nodes (comfy_extras, V3 ``execute`` as a graph runs them) on the tiny models, float64. The edits
are ONE step long, so the edited latent is an affine map of the step's CFG result whose weights sum to one (flow:
Euler to sigma 0 returns it; DDPM: one DDIM step, then the VAE scaling): a guidance formula on the branch
predictions holds the same on the edits. The branch predictions are TokenFlow edits at cfg 1 (the positive
branch alone), and a perturbed pass's reference is the TokenFlow edit at cfg 1 of the clone with the same
perturbation installed on it (``perturbed``), i.e. TokenFlow's prediction of the perturbed model.

SDEdit with extracted correspondences runs no source branch, so the cfg-1 edits are exactly the branches of the
guided one. The models run in float64, but the host's sampler hands the edit back in float32: combinations of edits
agree to float32 rounding (measured <= 2.5e-7 of the largest value); ``SAME`` allows 1e-6, while a wrong cond or a
pass on no cond moves them by >= 1e-3.
"""
from __future__ import annotations

import inspect

import pytest
import torch

import comfy.patcher_extension
import tiny_dit_models
import tiny_models
from comfy_extras import (nodes_apg, nodes_context_windows, nodes_easycache, nodes_fresca, nodes_pag, nodes_sag,
                          nodes_sd3, nodes_slg)
from comfy_extras.nodes_torch_compile import TorchCompileModel
from comfyui_tokenflow.engine.ddpm import edit as ddpm_edit
from comfyui_tokenflow.engine.flow import edit as flow_edit
from comfyui_tokenflow.engine.flow.invert import run_inversion as run_flow_inversion
from comfyui_tokenflow.engine.plan.settings import EditSettings
from comfyui_tokenflow.engine.sampling_paths import run_extraction
from reliability_tools import UNetCalls
from tokenflow_helpers import conds, double, extract, invert, random_latent

try:
    from comfy_extras import nodes_tcfg
except ImportError:  # not on every host
    nodes_tcfg = None

SAME = 1e-6
# PnP on the fly (no exact reference: a perturbed model would perturb the source branch too): the guidance moves the
# edit by about what it does on SDEdit (measured 0.3% PAG, 0.7% SLG); a pass on no cond moved it by 88% and 300%.
CORRECTION = 0.03
CFG, SCALE = 4.0, 3.0


def close(a: torch.Tensor, b: torch.Tensor, rel: float = SAME) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=rel * b.abs().max().item())


def differs(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-3) -> bool:
    return (a - b).abs().max().item() > rel * b.abs().max().item()


def node(module, name: str, model, **inputs):
    """The patched MODEL of core node ``name``, as a graph runs its V3 ``execute``."""
    return getattr(module, name).execute(model, **inputs).args[0]


@pytest.fixture
def perturbed(monkeypatch):
    """``perturbed(rule, patch)``: the rule's edits run on its TokenFlow clone with ``patch(clone)`` applied after
    TokenFlow's own patches (ComfyUI's ModelPatcher API), i.e. TokenFlow on the perturbed model."""
    def install(rule, patch):
        original = rule.patched_clone
        monkeypatch.setattr(rule, "patched_clone", lambda model, layout: patch(original(model, layout)))
    return install


# ---------------------------------------------------------------------------------------------- SD3 (flow)

def float64(model):
    """``model`` (a fresh tiny model of its own) in float64, in place: a deepcopy of a model fails on 0.8.0, whose
    model config answers every unknown attribute (``__setstate__`` too) with None."""
    model.model.diffusion_model.to(torch.float64)
    model.model.diffusion_model.dtype = torch.float64
    return model


@pytest.fixture(scope="module")
def sd3():
    src, pos, neg = (tiny_dit_models.sd3_conditioning(seed=s, dtype=torch.float64) for s in (1, 2, 3))
    frames = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    world = dict(model=float64(tiny_dit_models.make_sd3_model(seed=0)), src=src, pos=pos, neg=neg, frames=frames)
    world["inversion"] = run_flow_inversion(world["model"], {"samples": world["frames"]}, world["src"], 1, 2)
    world["corr"] = run_extraction(world["model"], world["inversion"], 2, "random", 1)
    world["plain"] = sd3_edit(world, world["model"])
    world["cond"] = sd3_edit(world, world["model"], cfg=1.0)
    world["uncond"] = sd3_edit(world, world["model"], cfg=1.0, positive=world["neg"])
    return world


def sd3_edit(world, model, cfg: float = CFG, positive=None, editor: str = "sdedit") -> torch.Tensor:
    settings = EditSettings.of(editor=editor, cfg=cfg, batch_size=2, seed=1)
    corr = world["corr"] if editor == "sdedit" else None
    return flow_edit.run_edit(model, positive or world["pos"], world["neg"], world["inversion"], settings,
                              corr)["samples"].double()


def skip_block(layer: int):
    def patch(clone):
        clone.set_model_patch_replace(lambda args, extra: args, "dit", "double_block", layer)  # SLG's skip
        return clone
    return patch


def test_fresca_gets_the_frames_conds(sd3):
    identity = node(nodes_fresca, "FreSca", sd3["model"], scale_low=1.0, scale_high=1.0, freq_cutoff=20)
    close(sd3_edit(sd3, identity), sd3["plain"])  # the identity filter (FreSca's FFT runs in float32)
    strong = node(nodes_fresca, "FreSca", sd3["model"], scale_low=1.0, scale_high=3.0, freq_cutoff=1)
    guidance = nodes_fresca.Fourier_filter(sd3["cond"] - sd3["uncond"], scale_low=1.0, scale_high=3.0, freq_cutoff=1)
    expected = sd3["uncond"] + CFG * guidance
    out = sd3_edit(sd3, strong)
    assert differs(out, sd3["plain"])
    close(out, expected)


@pytest.mark.skipif(nodes_tcfg is None, reason="this host has no TCFG node")
def test_tcfg_gets_the_frames_conds(sd3):
    model = node(nodes_tcfg, "TCFG", sd3["model"])
    out = sd3_edit(sd3, model)
    assert torch.isfinite(out).all() and differs(out, sd3["plain"])
    close(sd3_edit(sd3, model, cfg=1.0), sd3["cond"])  # no negative branch at cfg 1: TCFG steps aside


@pytest.mark.parametrize("which", ["SkipLayerGuidanceDiT", "SkipLayerGuidanceSD3"])
def test_skip_layer_guidance_is_tokenflow_of_the_skipped_model(sd3, perturbed, which):
    if which == "SkipLayerGuidanceDiT":
        model = node(nodes_slg, which, sd3["model"], scale=SCALE, start_percent=0.0, end_percent=1.0,
                     double_layers="1", single_layers="")
    else:
        model = node(nodes_sd3, which, sd3["model"], layers="1", scale=SCALE, start_percent=0.0, end_percent=1.0)
    guided = sd3_edit(sd3, model)
    perturbed(flow_edit, skip_block(1))
    skipped = sd3_edit(sd3, sd3["model"], cfg=1.0)
    assert differs(skipped, sd3["cond"])
    close(guided, sd3["plain"] + SCALE * (sd3["cond"] - skipped))


def test_skip_layer_guidance_simple_skips_in_the_uncond_branch(sd3, perturbed):
    model = node(nodes_slg, "SkipLayerGuidanceDiTSimple", sd3["model"], start_percent=0.0, end_percent=1.0,
                 double_layers="1", single_layers="")
    guided = sd3_edit(sd3, model)
    perturbed(flow_edit, skip_block(1))
    skipped_uncond = sd3_edit(sd3, sd3["model"], cfg=1.0, positive=sd3["neg"])
    assert differs(guided, sd3["plain"])
    close(guided, sd3["plain"] + (1 - CFG) * (skipped_uncond - sd3["uncond"]))


def test_skip_layer_guidance_with_pnp_on_the_fly(sd3):
    """With the source branch in every call (PnP, fields on the fly) the guidance pass reuses its features."""
    model = node(nodes_slg, "SkipLayerGuidanceDiT", sd3["model"], scale=SCALE, start_percent=0.0, end_percent=1.0,
                 double_layers="1", single_layers="")
    plain = sd3_edit(sd3, sd3["model"], editor="pnp")
    guided = sd3_edit(sd3, model, editor="pnp")
    assert torch.isfinite(guided).all() and differs(guided, plain)
    assert not differs(guided, plain, CORRECTION)


# ---------------------------------------------------------------------------------------------- SD1.5 (DDPM)

@pytest.fixture(scope="module")
def sd15():
    model = float64(tiny_models.make_unet_model("sd15", seed=0))
    src, pos, neg = (double(c) for c in conds(model))
    inversion = invert(model, random_latent(3, seed=3), src, steps=1, inversion_steps=2)
    world = dict(model=model, src=src, pos=pos, neg=neg, inversion=inversion, corr=extract(model, inversion))
    world["plain"] = sd15_edit(world, model)
    world["cond"] = sd15_edit(world, model, cfg=1.0)
    return world


def sd15_edit(world, model, cfg: float = CFG, editor: str = "sdedit", positive=None) -> torch.Tensor:
    settings = EditSettings.of(editor=editor, cfg=cfg, batch_size=2, seed=1)
    corr = world["corr"] if editor == "sdedit" else None
    return ddpm_edit.run_edit(model, positive or world["pos"], world["neg"], world["inversion"], settings,
                              corr)["samples"].double()


def test_perturbed_attention_guidance_is_tokenflow_of_the_perturbed_model(sd15, perturbed):
    guided = sd15_edit(sd15, node(nodes_pag, "PerturbedAttentionGuidance", sd15["model"], scale=SCALE))

    def middle_attention_is_v(clone):  # PAG's perturbation, installed on the clone itself
        clone.set_model_attn1_replace(lambda q, k, v, extra, mask=None: v, "middle", 0, 0)
        return clone

    perturbed(ddpm_edit, middle_attention_is_v)
    perturbed_cond = sd15_edit(sd15, sd15["model"], cfg=1.0)
    assert differs(perturbed_cond, sd15["cond"], 1e-4)  # the tiny UNet's middle block moves it by ~5e-4
    close(guided, sd15["plain"] + SCALE * (sd15["cond"] - perturbed_cond))


def test_perturbed_attention_guidance_with_pnp_on_the_fly(sd15):
    model = node(nodes_pag, "PerturbedAttentionGuidance", sd15["model"], scale=SCALE)
    plain = sd15_edit(sd15, sd15["model"], editor="pnp")
    guided = sd15_edit(sd15, model, editor="pnp")
    assert torch.isfinite(guided).all() and differs(guided, plain)
    assert not differs(guided, plain, CORRECTION)


def test_hooks_get_the_real_per_frame_conds(sd15):
    """Per-frame prompts: every hook sees the conds of the frames it combines, the host's arguments otherwise."""
    pos = double(tiny_models.make_conditioning(sd15["model"], seed=21, batch=3))
    seen: list[tuple] = []

    def pre_cfg(args):
        cond, uncond = args["conds"]
        rows = cond[0]["model_conds"]["c_crossattn"].cond
        seen.append(("pre", args["input"].shape[0], rows, uncond is not None))
        return args["conds_out"]

    def post_cfg(args):
        seen.append(("post", args["input"].shape[0], args["cond"][0]["model_conds"]["c_crossattn"].cond,
                     args["uncond"] is not None))
        return args["denoised"]

    model = sd15["model"].clone()
    model.set_model_sampler_pre_cfg_function(pre_cfg)
    model.set_model_sampler_post_cfg_function(post_cfg)
    out = sd15_edit(sd15, model, positive=pos)
    close(out, sd15_edit(sd15, sd15["model"], positive=pos))
    everything = pos[0][0]
    # per step: each chunk; the post-CFG functions first on the keyframes too (their own passes), the pre-CFG ones
    # not (a stateful pre-CFG hook sees every frame once a step)
    for kind in ("pre", "post"):
        calls = [(n, rows, has_uncond) for k, n, rows, has_uncond in seen if k == kind]
        assert all(rows.shape[0] == n and has_uncond for n, rows, has_uncond in calls)
        chunks = [rows for _, rows, _ in calls]
        if kind == "post":
            keyframe_rows = chunks.pop(0)
            assert all(any(torch.equal(row, frame) for frame in everything) for row in keyframe_rows)
        assert chunks and torch.equal(torch.cat(chunks), everything)
    seen.clear()
    sd15_edit(sd15, model, cfg=1.0, positive=pos)
    assert seen and not any(has_uncond for *_, has_uncond in seen)  # cfg 1: uncond None, as the host's


# ---------------------------------------------------------------------------------------------- refusals

def stand_in_animatediff_evolved(model):
    """What AnimateDiff-Evolved's Use Evolved Sampling installs on its clone (ModelPatcherHelper.set_all_properties
    in animatediff/model_injection.py): an OUTER_SAMPLE and a CALC_COND_BATCH wrapper keyed "ADE", the
    attachments "ADE_sample_settings" and "ADE_params", and with motion models their injection under "ADE"
    (which inserts the motion modules into the UNet). Here the wrappers pass through and nothing is injected."""
    wrappers = comfy.patcher_extension.WrappersMP
    m = model.clone()
    m.add_wrapper_with_key(wrappers.OUTER_SAMPLE, "ADE", lambda executor, *args, **kwargs: executor(*args, **kwargs))
    m.add_wrapper_with_key(wrappers.CALC_COND_BATCH, "ADE", lambda executor, *args, **kwargs: executor(*args, **kwargs))
    m.set_attachments("ADE_sample_settings", object())
    m.set_attachments("ADE_params", object())
    m.set_injections("ADE", [comfy.patcher_extension.PatcherInjection(inject=lambda patcher: None,
                                                                      eject=lambda patcher: None)])
    return m


REFUSED = {
    "Self-Attention Guidance": lambda m: node(nodes_sag, "SelfAttentionGuidance", m, scale=0.5, blur_sigma=2.0),
    "EasyCache": lambda m: node(nodes_easycache, "EasyCacheNode", m, reuse_threshold=0.2, start_percent=0.0,
                                end_percent=1.0, verbose=False),
    "LazyCache": lambda m: node(nodes_easycache, "LazyCacheNode", m, reuse_threshold=0.2, start_percent=0.0,
                                end_percent=1.0, verbose=False),
    "AnimateDiff-Evolved": stand_in_animatediff_evolved,
}


def refusal(run, model) -> str:
    with UNetCalls(model) as calls, pytest.raises(ValueError) as error:
        run()
    assert calls.count == 0, "the refusal came after a model call"
    message = str(error.value)
    assert "\n" not in message and message.startswith("model: ")
    return message


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_by_name_before_any_model_call(sd15, name):
    model = REFUSED[name](sd15["model"])
    message = refusal(lambda: sd15_edit(sd15, model), model)
    assert name in message and ("Remove" in message or "without" in message)


@pytest.mark.parametrize("name", ["EasyCache", "LazyCache", "AnimateDiff-Evolved"])
def test_step_caches_and_animatediff_are_refused_at_every_stage(sd15, sd3, name):
    model = REFUSED[name](sd15["model"])
    assert name in refusal(lambda: invert(model, random_latent(3, seed=3), sd15["src"], 1, 2), model)
    assert name in refusal(lambda: extract(model, sd15["inversion"]), model)
    flow_model = REFUSED[name](sd3["model"])
    assert name in refusal(lambda: sd3_edit(sd3, flow_model), flow_model)
    assert name in refusal(lambda: run_flow_inversion(flow_model, {"samples": sd3["frames"]}, sd3["src"], 1, 2),
                           flow_model)


def apg(model, momentum: float):
    return node(nodes_apg, "APG", model, eta=1.0, norm_threshold=5.0, momentum=momentum)


def test_apg_momentum_is_refused_by_name_and_without_momentum_apg_guides(sd15, sd3):
    """APG's momentum is one running tensor for the frames of its last call, which TokenFlow's subsets would mix;
    without momentum APG is per frame and guides the edit."""
    for world, edit in ((sd15, sd15_edit), (sd3, sd3_edit)):
        model = apg(world["model"], -0.5)
        message = refusal(lambda: edit(world, model), model)
        assert "Adaptive Projected Guidance" in message and "momentum -0.5" in message and "to 0" in message
        assert differs(edit(world, apg(world["model"], 0.0)), world["plain"])


def test_self_attention_guidance_is_refused_on_a_dit_too(sd3):
    model = REFUSED["Self-Attention Guidance"](sd3["model"])
    assert "Self-Attention Guidance" in refusal(lambda: sd3_edit(sd3, model), model)


# ---------------------------------------------------------------------------------------------- still working

def test_core_context_windows_still_run_and_change_nothing(sd15):
    """TokenFlow batches frames itself: the context handler is set aside (on 0.8.0 also with FreeNoise, which
    shuffles the sampler's noise: TokenFlow's is zero)."""
    inputs = dict(context_length=2, context_overlap=1, context_schedule="standard_static", context_stride=1,
                  closed_loop=False, fuse_method="pyramid", dim=0)
    execute = nodes_context_windows.ContextWindowsManualNode.execute
    if "freenoise" in inspect.signature(execute).parameters:
        inputs["freenoise"] = True
    model = execute(sd15["model"], **inputs).args[0]
    with UNetCalls(model) as calls:
        out = sd15_edit(sd15, model)
    assert calls.count > 0
    assert torch.equal(out, sd15["plain"])


@pytest.mark.parametrize("rule", ["ddpm", "flow"])
def test_torch_compile_model_passes_the_checks(sd15, sd3, rule):
    """The core node's wrapper is no refusal (tests/test_torch_compile.py runs its compiled edits)."""
    world = sd15 if rule == "ddpm" else sd3
    model = TorchCompileModel.execute(world["model"], "inductor").args[0]
    prepare = ddpm_edit.prepare_edit if rule == "ddpm" else flow_edit.prepare_edit
    settings = EditSettings.of(editor="sdedit", cfg=CFG, batch_size=2, seed=1)
    with UNetCalls(model) as calls:
        prepare(model, world["pos"], world["neg"], world["inversion"], settings, world["corr"])
    assert calls.count == 0
