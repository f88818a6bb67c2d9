"""Other nodes' attention patches on the blocks TokenFlow patches: chained where both can run, refused by name
where they cannot, never overwritten silently; the input model is never changed.

- UNet ``attn1_patch`` entries (the core Hypernetwork Loader's) are a list: TokenFlow's runs after them;
- a UNet ``attn1`` replacement on a TokenFlow block (core Self-Attention Guidance's, on the middle block) and a
  node's pair of ``attn1_patch`` and ``attn1_output_patch`` (core HyperTile's and ToMe's, re-laying the tokens
  around attention) are refused in one line naming the block or the patches, before any model call (a lone
  ``attn1_output_patch`` stays chained: tests/test_errors_in_pass.py runs one);
- a DiT block patch (``patches_replace["dit"]``) runs inside TokenFlow's block patch, on tiny Flux and SD3.
"""
from __future__ import annotations

import pytest
import torch

import folder_paths
import tiny_dit_models
from comfy_extras.nodes_hypernetwork import HypernetworkLoader
from comfy_extras.nodes_hypertile import HyperTile
from comfy_extras.nodes_sag import SelfAttentionGuidance
from comfy_extras.nodes_tomesd import TomePatchModel
from comfyui_tokenflow.engine.families.registry import check_supported
from comfyui_tokenflow.engine.flow.edit import run_edit as run_flow_edit
from comfyui_tokenflow.engine.flow.invert import run_inversion as run_flow_inversion
from comfyui_tokenflow.engine.patches import dit, install, unet
from comfyui_tokenflow.engine.plan.settings import EditSettings
from comfyui_tokenflow.nodes.joint_edit_nodes import TokenFlowKeyframeJointEdit
from reliability_tools import UNetCalls
from tokenflow_helpers import conds, edit, extract, invert, random_latent

N = 3


def _model(output):
    """The MODEL of a core node's output (V1 tuple or V3 NodeOutput)."""
    return (output.result if hasattr(output, "result") else output)[0]


@pytest.fixture(scope="module")
def world(tiny_sd15):
    src, pos, neg = conds(tiny_sd15)
    latent = random_latent(N, size=16, seed=7)  # 128 px: HyperTile's and ToMe's token re-laying takes effect
    return dict(src=src, pos=pos, neg=neg, inversion=invert(tiny_sd15, latent, src))


def _hypernetwork_file(folder, seed=3):
    """A tiny hypernetwork in the format the core loader reads: per attention width, a k and a v network."""
    g = torch.Generator().manual_seed(seed)

    def layers(width):
        return {"linear.0.weight": torch.randn(width, width, generator=g) / width ** 0.5,
                "linear.0.bias": torch.zeros(width)}

    torch.save({width: [layers(width), layers(width)] for width in (32, 64)}, folder / "tiny_hn.pt")
    return "tiny_hn.pt"


def test_hypernetwork_attn1_patch_is_chained_before_tokenflows(tiny_sd15, world, tmp_path):
    folder_paths.add_model_folder_path("hypernetworks", str(tmp_path))
    (patched,) = HypernetworkLoader().load_hypernetwork(tiny_sd15, _hypernetwork_file(tmp_path), 1.0)
    (hypernet,) = patched.model_options["transformer_options"]["patches"]["attn1_patch"]
    out = edit(patched, world["pos"], world["neg"], world["inversion"])
    plain = edit(tiny_sd15, world["pos"], world["neg"], world["inversion"])
    assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-3 * plain.abs().max(), "no hypernetwork"
    clone = install.patched_clone(patched, check_supported(patched, sampling="ddpm"))
    # (ModelPatcher.clone deep-copies the options: the hypernetwork comes as a copy)
    chain = clone.model_options["transformer_options"]["patches"]["attn1_patch"]
    assert [type(p) for p in chain[:-1]] == [type(hypernet)] and chain[-1] is unet.tokenflow_attn1_patch
    assert patched.model_options["transformer_options"]["patches"]["attn1_patch"] == [hypernet]  # input untouched


def _sag(model):
    return _model(SelfAttentionGuidance.execute(model, 0.5, 2.0))


def _hypertile(model):
    return _model(HyperTile.execute(model, 32, 1, 0, False))


def _tome(model):
    return _model(TomePatchModel.execute(model, 0.5))


REFUSED = [
    # SAG's post-CFG function is recognised first and names the node; its attn1 replacement, the block
    ("sag-edit", _sag, lambda m, w: edit(m, w["pos"], w["neg"], w["inversion"]),
     ["model:", "Self-Attention Guidance", "middle block", "Remove the Self-Attention Guidance node"]),
    ("sag-extract", _sag, lambda m, w: extract(m, w["inversion"]), ["model:", "Self-Attention Guidance"]),
    ("sag-joint-edit", _sag, lambda m, w: TokenFlowKeyframeJointEdit.execute(m), ["model:", "('middle', 0, 0)"]),
    ("block-level-replace", lambda m: _with_block_replace(m), lambda m, w: edit(m, w["pos"], w["neg"], w["inversion"]),
     ["model:", "transformer block ('input', 1)", "halve_attention"]),
    ("hypertile", _hypertile, lambda m, w: edit(m, w["pos"], w["neg"], w["inversion"]),
     ["model:", "both the input and the output", "nodes_hypertile", "hypertile_in", "hypertile_out", "HyperTile"]),
    ("tome", _tome, lambda m, w: edit(m, w["pos"], w["neg"], w["inversion"]),
     ["model:", "both the input and the output", "nodes_tomesd", "tomesd_m", "tomesd_u", "ToMe"]),
]


def halve_attention(q, k, v, extra):  # another node's attn1 replacement for a whole block (every index)
    import comfy.ldm.modules.attention as attention

    return attention.optimized_attention(q, k, v, extra["n_heads"]) * 0.5


def _with_block_replace(model):
    patched = model.clone()
    patched.set_model_attn1_replace(halve_attention, "input", 1)
    return patched


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_unchainable_attention_patch_is_refused_by_name_before_any_model_call(tiny_sd15, world, case):
    _, apply, run, fragments = case
    model = apply(tiny_sd15)
    before = dict(model.model_options["transformer_options"].get("patches_replace", {}).get("attn1", {}))
    with UNetCalls(model) as calls, pytest.raises(ValueError) as info:
        run(model, world)
    message = str(info.value)
    assert calls.count == 0, f"{calls.count} UNet calls before the refusal"
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert model.model_options["transformer_options"].get("patches_replace", {}).get("attn1", {}) == before


# -- DiT: another node's block patch runs inside TokenFlow's ------------------------------------------------------

def block_scale(calls: list):
    """Another node's DiT block patch: runs the block and scales its image tokens, counting its calls in ``calls``
    (a function: ModelPatcher.clone deep-copies the options, and functions are kept as they are)."""
    def patch(args: dict, extra: dict) -> dict:
        calls.append(1)
        out = extra["original_block"](args)
        return {**out, "img": out["img"] * 1.25}
    return patch


@pytest.fixture(scope="module", params=list(tiny_dit_models.DIT_FAMILIES))
def dit_world(request):
    """A tiny float32 ``family`` DiT, its prompts and cfg, 3 frames (this test compares no two call layouts)."""
    make, conditioning, cfg = tiny_dit_models.DIT_FAMILIES[request.param]
    src, pos, neg = (conditioning(seed=s) for s in (1, 2, 3))
    frames = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5
    return dict(model=make(seed=0), src=src, pos=pos, neg=neg, cfg=cfg, frames=frames)


def _dit_edit(world, model, inversion):
    settings = EditSettings.of(cfg=world["cfg"], batch_size=2, editor="pnp")
    return run_flow_edit(model, world["pos"], world["neg"], inversion, settings)["samples"]


def test_another_dit_block_patch_runs_inside_tokenflows(dit_world):
    world = dit_world
    model = world["model"]
    inversion = run_flow_inversion(model, {"samples": world["frames"]}, world["src"], 4, 8)
    kind, block_id, _ = check_supported(model, sampling="flow").transformer_blocks[0]
    calls: list = []
    other = block_scale(calls)
    patched = model.clone()
    patched.set_model_patch_replace(other, "dit", kind, block_id)
    out = _dit_edit(world, patched, inversion)
    plain = _dit_edit(world, model, inversion)
    assert calls, "the other node's block patch was overwritten"
    assert torch.isfinite(out).all() and (out - plain).abs().max() > 1e-3 * plain.abs().max()
    clone = install.patched_clone(patched, check_supported(patched, sampling="flow"))
    ours = clone.model_options["transformer_options"]["patches_replace"]["dit"][(kind, block_id)]
    assert isinstance(ours, dit.DiTBlockReplace) and ours.previous is other
    again = install.patched_clone(clone, check_supported(clone, sampling="flow"))  # idempotent: no double
    assert again.model_options["transformer_options"]["patches_replace"]["dit"][(kind, block_id)].previous is other
    assert patched.model_options["transformer_options"]["patches_replace"]["dit"][(kind, block_id)] is other
