"""torch.compile of the UNet under the pack's patches (issue 16, item 4).

The host's ``TorchCompileModel`` node compiles ``diffusion_model`` through
``comfy_api.torch_helpers.set_torch_compile_wrapper``; the TokenFlow patches then run inside the
traced region. These tests compile a tiny float64 UNet with ``aot_eager`` (fast: no code
generation; dynamo's ``eager`` backend for the guard-filter run) and check that a 4-step PnP edit (on the fly) equals the eager edit, that the UNet
has no graph break, that it compiles at most once per distinct call (its ``call_key``), and that a
``guard_filter_fn`` that drops every guard on ``transformer_options`` (what newer hosts pass)
still gives the eager result: no stale branch is replayed, also for a post-CFG guidance pass that replaces a
block's self-attention per call (PerturbedAttentionGuidance). One inductor run through the core
node itself is marked ``slow`` (``TOKENFLOW_COMPILE_INDUCTOR=1`` runs it).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import tiny_models
from comfy_api.torch_helpers import set_torch_compile_wrapper
from comfyui_tokenflow.engine.patches import contract
from tokenflow_helpers import conds, double, edit, extract, float64_copy, invert, random_latent

FRAMES, STEPS = 4, 4
# float64: compiled and eager differ by reordered float64 rounding only (measured below 1e-9 on a
# latent of scale ~100); float32 would turn that rounding into visible noise in the tiny UNet.
TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def setup(tiny_sd15):
    model = float64_copy(tiny_sd15)
    pos, neg, src = [double(c) for c in conds(model)]
    inversion = invert(model, random_latent(FRAMES, seed=3), src, steps=STEPS, inversion_steps=2 * STEPS)
    eager = edit(model, pos, neg, inversion, editor="pnp", steps=STEPS)
    return model, pos, neg, inversion, eager


def skip_transformer_options(guard_entries):
    """Newer hosts' guard filter (comfy_extras/nodes_torch_compile.py): no guard on transformer_options."""
    return [("transformer_options" not in entry.name) for entry in guard_entries]


def compiled_edit(setup, monkeypatch, **compile_kwargs):
    """A PnP edit through a compiled UNet: (result, distinct call keys, compiled graphs, graph breaks)."""
    model, pos, neg, inversion, _ = setup
    keys: set[str] = set()
    original = contract.PassContext.call_key

    def recording(self, options):
        key = original(self, options)
        keys.add(key)
        return key

    monkeypatch.setattr(contract.PassContext, "call_key", recording)
    compiled = model.clone()
    set_torch_compile_wrapper(compiled, **compile_kwargs)
    torch._dynamo.reset()
    counters.clear()
    try:
        out = edit(compiled, pos, neg, inversion, editor="pnp", steps=STEPS)
        graphs = int(counters["stats"]["unique_graphs"])
        breaks = int(sum(counters["graph_break"].values()))
    finally:
        torch._dynamo.reset()
    return out, keys, graphs, breaks


def test_compiled_pnp_edit_equals_eager_without_graph_breaks(setup, monkeypatch):
    out, keys, graphs, breaks = compiled_edit(setup, monkeypatch, backend="aot_eager")
    eager = setup[-1]
    assert (out - eager).abs().max().item() < TOLERANCE
    assert breaks == 0  # none anywhere in the UNet, so none inside a transformer block
    # One graph per distinct call (keyframe / propagation pass x PnP stage): recompiles = graphs - 1.
    assert 1 <= graphs <= len(keys)


def test_guard_filter_on_transformer_options_replays_no_stale_branch(setup, monkeypatch):
    # Guards are dynamo's: its "eager" backend (the captured graphs run as they are) checks them at
    # half aot_eager's tracing cost.
    out, keys, graphs, breaks = compiled_edit(setup, monkeypatch, backend="eager",
                                              options={"guard_filter_fn": skip_transformer_options})
    assert (out - setup[-1]).abs().max().item() < TOLERANCE
    assert breaks == 0
    assert graphs == len(keys)  # every distinct call still gets its own graph


@pytest.mark.skipif(os.environ.get("TOKENFLOW_COMPILE_INDUCTOR") != "1",
                    reason="inductor on CPU compiles C++ for minutes; TOKENFLOW_COMPILE_INDUCTOR=1 runs it")
def test_core_torch_compile_node_with_inductor(setup, monkeypatch):
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    model, pos, neg, inversion, eager = setup
    compiled = TorchCompileModel.execute(model, "inductor").args[0]
    torch._dynamo.reset()
    counters.clear()
    try:
        out = edit(compiled, pos, neg, inversion, editor="pnp", steps=STEPS)
        breaks = int(sum(counters["graph_break"].values()))
    finally:
        torch._dynamo.reset()
    assert (out - eager).abs().max().item() < TOLERANCE
    assert breaks == 0


def test_a_guidance_pass_with_its_own_attention_replacement_replays_no_stale_branch():
    """PerturbedAttentionGuidance's extra pass adds a replacement of the middle block's self-attention per call: that
    is part of the call key, so under the guard filter it does not replay the edit branch's graph (cfg 1, extracted
    SDEdit: both calls are one positive chunk of the same frames; measured without it, PAG's effect vanished)."""
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance

    model = tiny_models.make_unet_model("sd15", seed=0)  # a fresh one, made float64 in place (no deepcopy: 0.8.0)
    model.model.diffusion_model.to(torch.float64)
    model.model.diffusion_model.dtype = torch.float64
    pos, _, src = [double(c) for c in conds(model)]
    inversion = invert(model, random_latent(3, seed=3), src, steps=2, inversion_steps=4)
    corr = extract(model, inversion)
    guided = PerturbedAttentionGuidance.execute(model, scale=3.0).args[0]
    eager = edit(guided, pos, pos, inversion, corr, editor="sdedit", cfg=1.0)
    assert (eager - edit(model, pos, pos, inversion, corr, editor="sdedit", cfg=1.0)).abs().max() > 1e-3
    compiled = guided.clone()
    set_torch_compile_wrapper(compiled, backend="eager", options={"guard_filter_fn": skip_transformer_options})
    torch._dynamo.reset()
    counters.clear()
    try:
        out = edit(compiled, pos, pos, inversion, corr, editor="sdedit", cfg=1.0)
        breaks = int(sum(counters["graph_break"].values()))
    finally:
        torch._dynamo.reset()
    assert (out - eager).abs().max().item() < TOLERANCE
    assert breaks == 0
