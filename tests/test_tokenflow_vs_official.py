"""Inversion and editing agree with an independent restatement of the official code.

Random-weight UNets amplify rounding from step to step, so "agree to precision" is measured
against the model's own sensitivity: the reference is run a second time with its input perturbed
by one part in 10^7, and our result must lie within a small multiple of that spread (a semantic
difference, e.g. a missing injection, is thousands of times larger). The UNet runs in float64
here: in float32 the tiny UNet's 1x1-pixel GroupNorms turn batch-layout-dependent rounding (which
frames and branches share a call) into nearest-neighbour flips, so a float32 comparison would
test the batch layout's luck, not the algorithm.
"""
from __future__ import annotations

import pytest
import torch

from comfyui_tokenflow.engine import model_support
from comfyui_tokenflow.tokenflow_ops import keyframes, schedule
from official_reference import reference_edit, reference_inversion
from tokenflow_helpers import INVERSION_STEPS, STEPS, conds, double, edit, float64_copy, invert, random_latent

SLACK = 20.0


def _perturbed(x: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return x * (1 + 1e-7 * torch.randn(x.shape, generator=g))


def _assert_within_precision(ours: torch.Tensor, ref: torch.Tensor, ref_perturbed: torch.Tensor) -> None:
    spread = (ref_perturbed - ref).abs().max().item()
    tolerance = max(SLACK * spread, 1e-5 * ref.abs().max().item())
    diff = (ours - ref).abs().max().item()
    assert diff <= tolerance, f"max |ours - official| = {diff:.3g} > {tolerance:.3g} (rounding spread {spread:.3g})"


@pytest.fixture(scope="module")
def setup(tiny_sd15):
    model = float64_copy(tiny_sd15)
    src, pos, neg = (double(c) for c in conds(model))
    latent = random_latent(5)
    inversion = invert(model, latent, src)
    unet = model.model.diffusion_model
    sigmas = model.get_model_object("model_sampling").sigmas
    return dict(model=model, src=src, pos=pos, neg=neg, inversion=inversion, unet=unet, sigmas=sigmas,
                x0=model.model.process_latent_in(latent["samples"]).double(), layout=model_support.check_supported(model))


def test_inversion_follows_the_spec_formula(setup):
    inv, sigmas = setup["inversion"], setup["sigmas"]
    assert inv.timesteps == schedule.editing_timesteps(STEPS) == [801, 601, 401, 201, 1]
    assert torch.equal(inv.sigmas[:-1], sigmas[inv.timesteps].float()) and inv.sigmas[-1] == sigmas[0]
    keep = set(inv.timesteps)
    args = (setup["unet"], sigmas)
    saved, final, final_t = reference_inversion(*args, setup["x0"], setup["src"][0][0], INVERSION_STEPS, keep)
    saved_p, final_p, _ = reference_inversion(*args, _perturbed(setup["x0"]), setup["src"][0][0], INVERSION_STEPS, keep)
    assert inv.inverted_timestep == final_t == 901
    torch.testing.assert_close(inv.x0.double(), setup["x0"])
    for k, t in enumerate(inv.timesteps):
        _assert_within_precision(inv.trajectory[k], saved[t], saved_p[t])
    _assert_within_precision(inv.inverted, final, final_p)


@pytest.mark.parametrize("editor,pnp_attn_t,pnp_f_t", [
    ("pnp", 0.5, 0.8), ("pnp", 0.5, 0.0), ("pnp", 0.0, 0.8), ("sdedit", 0.5, 0.8), ("controlnet", 0.5, 0.8)])
def test_edit_matches_official_restatement(setup, editor, pnp_attn_t, pnp_f_t):
    """Same inversion products and keyframe plan in on-the-fly mode: the official loop's latents."""
    model, layout, inv = setup["model"], setup["layout"], setup["inversion"]
    out = edit(model, setup["pos"], setup["neg"], inv, editor=editor, batch_size=2, seed=1,
               pnp_attn_t=pnp_attn_t, pnp_f_t=pnp_f_t)
    timesteps = schedule.sdedit_timesteps(STEPS, 0.9) if editor == "sdedit" else schedule.editing_timesteps(STEPS)
    plan = keyframes.keyframe_plan(5, 2, len(timesteps), 1)
    saved = {t: inv.trajectory[k].double() for k, t in enumerate(inv.timesteps)}
    ref_editor = "pnp" if editor != "sdedit" else "sdedit"
    attn_t, f_t = (pnp_attn_t, pnp_f_t) if editor == "pnp" else (0.0, 0.0)
    runs = [reference_edit(setup["unet"], setup["sigmas"], layout.transformer_blocks, x0, saved, inv.inverted.double(),
                           inv.inverted_timestep, setup["src"][0][0], setup["pos"][0][0], setup["neg"][0][0], plan,
                           steps=STEPS, editor=ref_editor, batch_size=2, pnp_blocks=layout.default_pnp_attention,
                           pnp_attn_t=attn_t, pnp_f_t=f_t)
            for x0 in (inv.x0.double(), _perturbed(inv.x0.double()))]
    ours = model.model.process_latent_in(out)
    assert torch.isfinite(ours).all()
    _assert_within_precision(ours, *runs)
