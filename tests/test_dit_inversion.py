"""Flow inversion (Euler on the model's own ascending sigmas, the pack's loop) on tiny real Flux and SD3 models."""
from __future__ import annotations

import pytest
import torch

import tiny_dit_models
from comfyui_tokenflow.engine.flow.invert import run_inversion as run_flow_inversion
from comfyui_tokenflow.engine.flow.samplers import sample_flow
from comfyui_tokenflow.tokenflow_ops.flow_inversion import sigma_at
from comfyui_tokenflow.tokenflow_ops.schedule import inversion_timesteps

MAKERS = {"flux": (tiny_dit_models.make_flux_model, tiny_dit_models.flux_conditioning),
          "sd3": (tiny_dit_models.make_sd3_model, tiny_dit_models.sd3_conditioning)}


def _latent(n: int = 2, seed: int = 0) -> dict:
    return {"samples": torch.randn(n, 16, 8, 8, generator=torch.Generator().manual_seed(seed)) * 0.5}


def _reconstruction_error(model, cond, latent, steps: int) -> float:
    inversion = run_flow_inversion(model, latent, cond, steps, steps)
    table = model.get_model_object("model_sampling").sigmas.float().cpu()
    levels = [sigma_at(table, t) for t in reversed(inversion_timesteps(steps))] + [0.0]
    out = sample_flow(model, cond, inversion.inverted, levels)
    return float((out - inversion.x0).abs().max() / inversion.x0.abs().max())


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_inversion_then_sampling_returns_the_source_and_the_error_falls_with_steps(family):
    make, conditioning = MAKERS[family]
    model, cond = make(seed=0), conditioning(seed=1)
    errors = [_reconstruction_error(model, cond, _latent(), steps) for steps in (4, 8, 16)]
    # Euler is first order: each doubling of the steps about halves the error (measured: x0.4-0.63 per
    # doubling on these tiny random models, whose velocity fields are far rougher than a trained model's).
    assert errors[1] < 0.7 * errors[0] and errors[2] < 0.7 * errors[1], errors
    assert errors[2] < 0.35 * errors[0], errors


def test_trajectory_keeps_x_sigma_at_every_editing_level():
    model, cond = tiny_dit_models.make_flux_model(seed=0), tiny_dit_models.flux_conditioning(seed=1)
    inversion = run_flow_inversion(model, _latent(), cond, steps=5, inversion_steps=10)
    table = model.get_model_object("model_sampling").sigmas.float().cpu()
    assert inversion.timesteps == [801, 601, 401, 201, 1] and inversion.trajectory.shape == (5, 2, 16, 8, 8)
    assert inversion.sigmas[:-1].tolist() == pytest.approx([sigma_at(table, t) for t in inversion.timesteps])
    assert float(inversion.sigmas[-1]) == 0.0 and inversion.family == "flux"
    assert torch.isfinite(inversion.trajectory).all() and torch.isfinite(inversion.inverted).all()
    # the last inversion step (t = 901) goes past the first editing level (t = 801): the rows differ
    assert not torch.equal(inversion.trajectory[0], inversion.inverted)


def test_the_inversion_prompt_matters():
    model = tiny_dit_models.make_flux_model(seed=0)
    a = run_flow_inversion(model, _latent(), tiny_dit_models.flux_conditioning(seed=1), 4, 4)
    b = run_flow_inversion(model, _latent(), tiny_dit_models.flux_conditioning(seed=2), 4, 4)
    assert (a.inverted - b.inverted).abs().max() > 1e-3


def test_sd_text_embeddings_into_flux_are_refused_before_any_model_call():
    model = tiny_dit_models.make_flux_model(seed=0)
    calls = []
    handle = model.model.diffusion_model.register_forward_pre_hook(lambda *a: calls.append(1))
    sd_cond = [[torch.randn(1, 77, 768), {"pooled_output": torch.randn(1, 768)}]]
    try:
        with pytest.raises(ValueError, match=r"conditioning: its text embeddings are 768 wide.*DualCLIPLoader"):
            run_flow_inversion(model, _latent(), sd_cond, 4, 4)
    finally:
        handle.remove()
    assert not calls
