"""Flux and SD3.x are adapters of the same family registry as the UNet families (tiny real host models)."""
from __future__ import annotations

import pytest

import tiny_dit_models
from comfyui_tokenflow.engine.families import registry
from comfyui_tokenflow.engine.families import FLOW, dit


@pytest.fixture(scope="module")
def flux():
    return tiny_dit_models.make_flux_model(seed=0)


@pytest.fixture(scope="module")
def sd3():
    return tiny_dit_models.make_sd3_model(seed=0)


def test_flux_layout_declares_its_image_attention_and_rf_solver_blocks(flux):
    layout = registry.check_supported(flux, sampling=FLOW)
    assert layout.family == "flux" and layout.sampling == FLOW and layout.prediction == "flow"
    assert layout.transformer_blocks == (("double_block", 0, 0), ("double_block", 1, 0),
                                         ("single_block", 0, 0), ("single_block", 1, 0))
    assert layout.default_pnp_attention == (("single_block", 1, 0),)  # the last half of the single blocks
    assert layout.default_pnp_residual == () and layout.adapter.pnp_injects == "v"
    assert layout.adapter.image_token_count(flux, (16, 8, 10)) == 4 * 5


def _flux_keys(double: int, single: int) -> tuple:
    return (tuple(("double_block", i, 0) for i in range(double))
            + tuple(("single_block", i, 0) for i in range(single)))


def test_flux_dev_default_pnp_is_rf_solver_edits_single_blocks_20_to_37():
    """RF-Solver-Edit shares V in single blocks ``info['id'] > 19`` of Flux-dev's 38 (none in the double blocks)."""
    chosen = dit.FLUX.pnp_attention(_flux_keys(19, 38))
    assert chosen == tuple(("single_block", i, 0) for i in range(20, 38))
    assert dit.FLUX.pnp_injects == "v"
    for single, first in ((1, 0), (2, 1), (10, 5)):  # scaled to smaller models: the same fraction, never empty
        assert dit.FLUX.pnp_attention(_flux_keys(2, single)) == tuple(("single_block", i, 0) for i in range(first, single))
    assert dit.FLUX.pnp_attention(_flux_keys(3, 0)) == ()


def test_sd3_layout_includes_the_image_only_second_attention(sd3):
    layout = registry.check_supported(sd3, sampling=FLOW)
    assert layout.family == "sd3"
    assert layout.transformer_blocks == (("double_block", 0, 0), ("double_block", 0, 1), ("double_block", 1, 0))
    assert layout.adapter.pnp_injects == "kv"


@pytest.mark.parametrize("which", ["flux", "sd3"])
def test_the_ddim_path_refuses_a_flow_family_naming_it(which, request):
    model = request.getfixturevalue(which)
    with pytest.raises(ValueError, match=rf"DiT of family '{which}'.*Load an SD1.x/SD2.x/SDXL checkpoint"):
        registry.check_supported(model)


def test_the_flow_path_refuses_a_unet(tiny_sd15):
    with pytest.raises(ValueError, match="follows the ddpm rule"):
        registry.check_supported(tiny_sd15, sampling=FLOW)


def test_an_unclaimed_model_lists_the_supported_families(flux, monkeypatch):
    monkeypatch.setattr(registry, "FAMILIES", [f for f in registry.FAMILIES if f.name != "flux"])
    with pytest.raises(ValueError, match=r"supported: sdxl, sd1/sd2, sd3\)"):
        registry.check_supported(flux, sampling=FLOW)


def test_the_registry_holds_unet_and_dit_families_alike():
    names = [f.name for f in registry.FAMILIES]
    assert names == ["sdxl", "sd1/sd2", "flux", "sd3"]
    assert all(callable(f.claims) and callable(f.describe) for f in registry.FAMILIES)


@pytest.mark.parametrize("family", ["flux"])
def test_the_call_key_is_checked_inside_the_dit_too(family):
    """The key a compiled diffusion model guards on reaches the DiT's own DIFFUSION_MODEL wrapper, whatever position
    the family passes transformer_options in (Flux: 8th, after guidance / ref_latents / control): a call whose key
    was replaced between the APPLY_MODEL wrapper and the model is refused. (SD3's MMDiT has no DIFFUSION_MODEL
    wrapper point at v0.3.64: there the key is an unused keyword of the model and nothing can check it.)"""
    import comfy.patcher_extension
    import torch

    from comfyui_tokenflow.engine.patches.wrappers import CALL_KEY
    from comfyui_tokenflow.engine.plan.settings import EditSettings
    from comfyui_tokenflow.engine.flow.edit import run_edit as run_flow_edit
    from comfyui_tokenflow.engine.flow.invert import run_inversion as run_flow_inversion

    make = tiny_dit_models.make_flux_model if family == "flux" else tiny_dit_models.make_sd3_model
    cond = tiny_dit_models.flux_conditioning if family == "flux" else tiny_dit_models.sd3_conditioning
    model = make(seed=0)
    frames = {"samples": torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))}
    inversion = run_flow_inversion(model, frames, cond(1), 2, 2)
    seen: list[str] = []

    def stale_key(executor, *args, **kwargs):  # outside the pack's DIFFUSION_MODEL wrapper
        if CALL_KEY in kwargs:
            seen.append(kwargs[CALL_KEY])
            kwargs[CALL_KEY] = "stale"
        return executor(*args, **kwargs)

    tampered = model.clone()
    tampered.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "0_test_stale_key", stale_key)
    with pytest.raises(RuntimeError, match="not prepared by the TokenFlow wrapper"):
        run_flow_edit(tampered, cond(2), cond(3), inversion, EditSettings.of(editor="pnp", cfg=1.0, batch_size=2))
    assert seen  # the tampering wrapper ran outside the check, on a call that carried a key
