"""Extension points: an editor is one module plus one registration line, a UNet family one adapter; the engine plans from what they declare."""
from __future__ import annotations

import pytest
import torch

from comfyui_tokenflow.engine import editors
from comfyui_tokenflow.nodes.sampler_nodes import TokenFlowSampler
from editor_plugins.attention_only import AttentionOnlyEditor
from tokenflow_helpers import STEPS, conds, edit, invert, random_latent


@pytest.fixture
def registered():
    editors.register_editor(AttentionOnlyEditor())  # the one registration line
    yield
    editors.unregister_editor(AttentionOnlyEditor.name)


def test_a_registered_editor_runs_with_its_own_injections(tiny_sd15, registered):
    src, pos, neg = conds(tiny_sd15)
    inversion = invert(tiny_sd15, random_latent(3), src)
    trace: list = []
    out = edit(tiny_sd15, pos, neg, inversion, editor="pnp_attention_only", trace=trace,
               editor_options={"attention_only_t": 0.4})
    injected_steps = {t for t, kind, *_ in trace if kind == "attention"}
    assert len(injected_steps) == int(STEPS * 0.4) and not [e for e in trace if e[1] == "residual"]
    assert not torch.equal(out, edit(tiny_sd15, pos, neg, inversion, editor="pnp"))  # residuals made a difference


def test_a_registered_editor_appears_in_the_sampler_after_its_stable_inputs(registered):
    schema = TokenFlowSampler.define_schema()
    names = [inp.id for inp in schema.inputs]
    editor_widget = next(inp for inp in schema.inputs if inp.id == "editor")
    assert "pnp_attention_only" in editor_widget.options
    assert names[-1] == "attention_only_t" and names.index("pnp_residual_blocks") == len(names) - 2


def test_a_unet_family_is_one_adapter(tiny_sd15, monkeypatch):
    from comfyui_tokenflow.engine.families import registry

    custom = registry.UNetFamily("custom", lambda unet: True, pnp_residual=lambda unet: ("output_blocks.5.0",))
    monkeypatch.setattr(registry, "FAMILIES", [custom, *registry.FAMILIES])
    layout = registry.check_supported(tiny_sd15)
    assert layout.family == "custom" and layout.default_pnp_residual == ("output_blocks.5.0",)
    assert layout.default_pnp_attention == tuple(("output", i, 0) for i in range(4, 12))  # the shared default
