"""Prompts carrying weight hooks (comfy.hooks: Create Hook LoRA, then the hooks set on the conditioning) on tiny real
models: the hooks' weights are in place while the model runs, yet the inversion names the base model, so an edit with
that model is accepted and one with another model is refused."""
from __future__ import annotations

import pytest
import torch

import comfy.hooks
import tiny_dit_models
import tiny_models
from comfyui_tokenflow.engine.families.fingerprints import model_fingerprint
from comfyui_tokenflow.nodes import inversion_nodes, sampler_nodes

# family: (model of a seed, conditioning of a seed, latent channels, cfg)
FAMILIES = {
    "sd15": (lambda seed: tiny_models.make_unet_model("sd15", seed=seed),
             lambda model, seed: tiny_models.make_conditioning(model, seed=seed), 4, 7.5),
    "flux": (lambda seed: tiny_dit_models.make_flux_model(seed=seed),
             lambda model, seed: tiny_dit_models.flux_conditioning(seed=seed), 16, 1.0),
}
STEPS, INVERSION_STEPS = 2, 4


def hook_lora(model, rank: int = 2, scale: float = 0.05) -> comfy.hooks.HookGroup:
    """Create Hook LoRA's hook group for a small random LoRA on every linear weight of ``model``."""
    generator = torch.Generator().manual_seed(7)
    lora = {}
    for key, weight in model.model.diffusion_model.state_dict().items():
        if key.endswith(".weight") and weight.ndim == 2:
            base = f"diffusion_model.{key[:-len('.weight')]}"
            lora[f"{base}.lora_up.weight"] = torch.randn(weight.shape[0], rank, generator=generator) * scale
            lora[f"{base}.lora_down.weight"] = torch.randn(rank, weight.shape[1], generator=generator) * scale
    return comfy.hooks.create_hook_lora(lora, strength_model=1.0, strength_clip=1.0)


def _sample(model, positive, negative, inversion, cfg):
    (latent,) = sampler_nodes.TokenFlowSampler.execute(model, positive, negative, inversion, editor="pnp", cfg=cfg,
                                                       pnp_attn_t=0.5, pnp_f_t=0.8, sdedit_start=0.9, batch_size=2,
                                                       keyframes="random", seed=1).args
    return latent["samples"]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_hooked_inversion_prompt_binds_the_inversion_to_the_base_model(family):
    make, conditioning, channels, cfg = FAMILIES[family]
    model, other = make(0), make(1)
    src, pos, neg = (conditioning(model, seed) for seed in (1, 2, 3))
    hooks = hook_lora(model)
    frames = {"samples": torch.randn(3, channels, 8, 8, generator=torch.Generator().manual_seed(0))}
    base = model_fingerprint(model)

    running: list[str] = []  # the fingerprint of the weights in place whenever the model runs
    handle = model.model.diffusion_model.register_forward_pre_hook(
        lambda *args: running.append(model_fingerprint(model)))
    try:
        inversion, _ = inversion_nodes.TokenFlowInvert.execute(
            model, frames, comfy.hooks.set_hooks_for_conditioning(src, hooks), STEPS, INVERSION_STEPS).args
    finally:
        handle.remove()
    plain, _ = inversion_nodes.TokenFlowInvert.execute(model, frames, src, STEPS, INVERSION_STEPS).args
    assert running and base not in running  # the hook's weights were in place during the inversion
    # sensitivity lower bound: the hook moves the inverted latent by O(1) of its size
    assert (inversion.inverted - plain.inverted).abs().max() > 1e-2 * plain.inverted.abs().max()
    assert inversion.model_fingerprint == base == plain.model_fingerprint

    edited = _sample(model, comfy.hooks.set_hooks_for_conditioning(pos, hooks), neg, inversion, cfg)
    assert torch.isfinite(edited).all() and model_fingerprint(model) == base

    calls: list[int] = []
    handle = other.model.diffusion_model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match="^inversion: it was made with a different model"):
            _sample(other, pos, neg, inversion, cfg)
    finally:
        handle.remove()
    assert not calls
