"""The pack's Flux / SD3 edit agrees with an independent restatement of TokenFlow for joint attention.

tests/dit_reference.py shares no code with the pack. As in test_tokenflow_vs_official.py, "agree"
is measured against the model's own sensitivity: the reference runs a second time with x0
perturbed by one part in 10^7 and ours must lie within SLACK times that spread (float64 models).
"""
from __future__ import annotations

import pytest
import torch

import tiny_dit_models
from comfyui_tokenflow.engine import model_support
from comfyui_tokenflow.engine.edit_plan import EditSettings
from comfyui_tokenflow.engine.flow_edit_runner import run_flow_edit
from comfyui_tokenflow.engine.flow_inversion_runner import run_flow_inversion
from comfyui_tokenflow.tokenflow_ops import keyframes, schedule
from comfyui_tokenflow.tokenflow_ops.flow_inversion import sigma_at
from dit_reference import reference_flow_edit

STEPS, INVERSION_STEPS, N, GROUP = 4, 8, 5, 2
SLACK = 20.0
@pytest.fixture(scope="module", params=list(tiny_dit_models.DIT_FAMILIES))
def setup(request):
    world = tiny_dit_models.dit_world(request.param, N)
    model, src, pos, neg, cfg, frames = (world[k] for k in ("model", "src", "pos", "neg", "cfg", "frames"))
    inversion = run_flow_inversion(model, {"samples": frames}, src, STEPS, INVERSION_STEPS)
    layout = model_support.check_supported(model, sampling=model_support.FLOW)
    return dict(model=model, src=src, pos=pos, neg=neg, cfg=cfg, inversion=inversion, layout=layout)


def _perturbed(x: torch.Tensor) -> torch.Tensor:
    return x * (1 + 1e-7 * torch.randn(x.shape, generator=torch.Generator().manual_seed(123)))


@pytest.mark.parametrize("editor,pnp_attn_t", [("pnp", 0.5), ("pnp", 0.0), ("sdedit", 0.0)])
def test_edit_matches_the_independent_restatement(setup, editor, pnp_attn_t):
    model, inv, layout = setup["model"], setup["inversion"], setup["layout"]
    out = run_flow_edit(model, setup["pos"], setup["neg"], inv, EditSettings.of(
        editor=editor, cfg=setup["cfg"], batch_size=GROUP, seed=1, pnp_attn_t=pnp_attn_t))["samples"]
    ours = model.model.process_latent_in(out).double()
    timesteps = schedule.sdedit_timesteps(STEPS, 0.9) if editor == "sdedit" else schedule.editing_timesteps(STEPS)
    plan = keyframes.keyframe_plan(N, GROUP, len(timesteps), 1)
    table = model.get_model_object("model_sampling").sigmas.float().cpu()
    kwargs = dict(
        inverted=inv.inverted, sigma_inv=sigma_at(table, inv.inverted_timestep),
        trajectory={t: inv.trajectory[k] for k, t in enumerate(inv.timesteps)}, timesteps=timesteps,
        sigmas={t: sigma_at(table, t) for t in inv.timesteps}, src=setup["src"], pos=setup["pos"],
        neg=setup["neg"], cfg=setup["cfg"], keyframe_plan=plan, group=GROUP,
        n_img=layout.adapter.image_token_count(model, inv.latent_shape),
        blocks=list(dict.fromkeys((b[0], b[1]) for b in layout.transformer_blocks)),
        pnp=set(layout.default_pnp_attention), pnp_t=pnp_attn_t if editor == "pnp" else 0.0,
        injects=layout.adapter.pnp_injects)
    ref = reference_flow_edit(model, x0=inv.x0, **kwargs)
    ref_perturbed = reference_flow_edit(model, x0=_perturbed(inv.x0.double()), **kwargs)
    spread = (ref_perturbed - ref).abs().max().item()
    tolerance = max(SLACK * spread, 1e-5 * ref.abs().max().item())
    diff = (ours - ref).abs().max().item()
    print(f"\n[dit-vs-reference] diff {diff:.3g} tolerance {tolerance:.3g} spread {spread:.3g}")
    assert diff <= tolerance, f"max |ours - reference| = {diff:.3g} > {tolerance:.3g} (spread {spread:.3g})"
