"""Another DiT family is one adapter: a made-up joint-attention DiT (tests/dit_plugin.py) runs through the
TokenFlow nodes once its DiTFamily is registered, with no engine change; its edit keeps TokenFlow's invariances."""
from __future__ import annotations

import pytest
import torch

import dit_plugin
from comfyui_tokenflow.engine.families import registry
from comfyui_tokenflow.nodes import inversion_nodes, sampler_nodes


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setattr(registry, "FAMILIES", [*registry.FAMILIES, dit_plugin.TINY_DIT])  # one entry


def _edit(model, pos, neg, inversion, **overrides):
    args = dict(editor="pnp", cfg=3.0, pnp_attn_t=0.5, pnp_f_t=0.8, sdedit_start=0.9, batch_size=2,
                keyframes="random", seed=1)
    args.update(overrides)
    return sampler_nodes.TokenFlowSampler.execute(model, pos, neg, inversion, **args).args[0]["samples"]


def test_unregistered_the_model_is_refused_naming_the_supported_families():
    with pytest.raises(ValueError, match=r"no TokenFlow family adapter claims it \(supported: sdxl, sd1/sd2, flux, sd3\)"):
        registry.check_supported(dit_plugin.make_tiny_dit())


def test_a_registered_dit_family_edits_a_static_video_consistently(registered):
    model = dit_plugin.make_tiny_dit()
    src, pos, neg = (dit_plugin.conditioning(s) for s in (1, 2, 3))
    frame = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    video_inv, _ = inversion_nodes.TokenFlowInvert.execute(model, {"samples": frame.repeat(4, 1, 1, 1)}, src, 4, 8).args
    single_inv, _ = inversion_nodes.TokenFlowInvert.execute(model, {"samples": frame}, src, 4, 8).args
    assert video_inv.family == "tinydit"
    video = _edit(model, pos, neg, video_inv)
    alone = _edit(model, pos, neg, single_inv, batch_size=1)
    for i in range(4):
        torch.testing.assert_close(video[i], alone[0], rtol=0, atol=1e-6 * alone.abs().max())
    other_prompt = _edit(model, neg, pos, single_inv, batch_size=1)
    assert (other_prompt - alone).abs().max() > 1e-3 * alone.abs().max(), "the prompt did not matter"
    moving = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    moving_inv, _ = inversion_nodes.TokenFlowInvert.execute(model, {"samples": moving}, src, 4, 8).args
    assert torch.isfinite(_edit(model, pos, neg, moving_inv)).all()
